"""Early exit end to end (issue 23): `lmtrain train` with exits at every layer and halting units
resumes exactly and logs each exit's loss; `calibrate-exit` writes a threshold (and trains the
exit classifier) into the run; `generate --exit` uses it and marks the exits; `export` carries
the calibration, and a calibration of another step is refused."""

from __future__ import annotations

import json

from tests.helpers import CONFIGS, TINY_MODEL, run_cli, train_twice_from_a_checkpoint

COMMON = ["trainer.max_steps=8", "checkpoint.every_n_steps=4", "trainer.val_every_n_steps=4",
          "trainer.log_every_n_steps=2", "trainer.progress_bar=false"]


def test_early_exit_trains_resumes_calibrates_generates_and_exports(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = [str(CONFIGS / "debug.yaml"), *tiny_data, *TINY_MODEL, "model.n_layers=3",
            "model.depth.kind=early_exit", "model.depth.weighting=increasing", "model.depth.halting=true",
            "model.depth.measure=state", "model.depth.threshold=0.9", f"run.root={tmp_path}", *COMMON]
    run = train_twice_from_a_checkpoint(args, tmp_path)
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/exits", "train/halting", "val_stats/exit/loss_layer1", "val_stats/exit/loss_layer3"} <= tags
    assert "val_stats/exit/mean_layer" not in tags  # validation's loss is the full model's
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("exit_layer/hist" in m for m in metrics)  # the per-token exit histogram of validation

    cal = run_cli("calibrate-exit", str(run), "--measure", "state", "--prompts", "6", "--prompt-tokens", "8",
                  "--new-tokens", "6", "--delta", "0.5", "--epsilon", "0.2", check=True)
    rep = json.loads((run / "exit" / "state.json").read_text())
    assert rep["step"] == 8 and rep["threshold"] is not None and rep["risk"] <= 0.5
    assert rep["tested"][0]["threshold"] == 1.0 and f"threshold {rep['threshold']}" in cal.stdout
    # --exit-layers auto: at each threshold, the exits whose (cheap, state) check pays for itself.
    assert rep["exit_layers"] == "auto" and all(set(r["checked_exits"]) <= {1, 2} for r in rep["tested"])
    assert "exits checked:" in cal.stdout
    out = run_cli("generate", str(run), "--exit", "state", "--show-exits", "--max-new-tokens", "12",
                  "--temperature", "0", check=True).stdout
    assert "exit_layer per new token: mean" in out
    run_cli("generate", str(run), "--exit", "state", "--threshold", "0.5", "--exit-layers", "2", "--max-new-tokens",
            "4", "--temperature", "0", check=True)
    bad = run_cli("generate", str(run), "--exit", "state", "--threshold", "0.5", "--exit-layers", "3",
                  "--max-new-tokens", "4")
    assert bad.returncode == 2 and "--exit-layers: checked exits [3]: this model's exits before the last are at " \
        "layers [1, 2]" in bad.stderr

    # Quality against depth, and decode speed side by side.
    run_cli("eval-exit", str(run), "--measure", "state", "--thresholds", "0.999,0.5", "--max-tokens", "512",
            check=True)
    tradeoff = json.loads((run / "eval" / "exit_state.json").read_text())
    assert [r["threshold"] for r in tradeoff["thresholds"]] == [0.999, 0.5]
    assert set(tradeoff["exit_loss"]) == {"1", "2", "3"}
    assert tradeoff["thresholds"][1]["mean_exit_layer"] <= tradeoff["thresholds"][0]["mean_exit_layer"]
    bench = run_cli("bench", "decode", str(run), "--exit", "state", "--batches", "1,2", "--prompt-tokens", "8",
                    "--new-tokens", "4", "--rounds", "1", "--agreement-prompts", "5", "--timed-prompts", "3",
                    check=True).stdout
    assert "| 1 | full depth |" in bench and "| 2 | exit state" in bench
    assert "same-context agreement with full depth over 5 prompts: full depth 100.0%" in bench

    run_cli("calibrate-exit", str(run), "--measure", "classifier", "--classifier-steps", "5", "--batch-size", "2",
            "--prompts", "6", "--prompt-tokens", "8", "--new-tokens", "6", "--delta", "0.5", "--epsilon", "0.2",
            check=True)
    assert (run / "exit" / "classifier.safetensors").is_file()
    run_cli("generate", str(run), "--exit", "classifier", "--max-new-tokens", "8", "--temperature", "0", check=True)

    export = tmp_path / "export"
    run_cli("export", str(run), "--out", str(export), check=True)
    assert {p.name for p in (export / "exit").iterdir()} == {"state.json", "classifier.json",
                                                              "classifier.safetensors"}
    run_cli("generate", str(export), "--exit", "state", "--max-new-tokens", "8", "--temperature", "0", check=True)

    # A threshold calibrated on another step's model is not used.
    (run / "exit" / "state.json").write_text(json.dumps({**rep, "step": 4}))
    bad = run_cli("generate", str(run), "--exit", "state", "--max-new-tokens", "4")
    assert bad.returncode == 2 and "calibrated the model of step 4, not this one (step 8)" in bad.stderr
