"""LSH and causal low-rank attention end to end (issue 22): `lmtrain train` with the Reformer
recipe in small (LSH, reversible layers, chunked feed-forward) resumes exactly (the hash seed
is in the checkpoint), logs bucket occupancy per step and the recovered attention mass in
validation to TensorBoard, and `inspect` prints them; lowrank_causal trains, resumes and
generates with its cache of summaries."""

from __future__ import annotations

import json

from tests.helpers import CONFIGS, TINY_MODEL, run_cli, train_twice_from_a_checkpoint

COMMON = ["trainer.max_steps=8", "checkpoint.every_n_steps=4", "trainer.val_every_n_steps=4",
          "trainer.log_every_n_steps=2", "trainer.progress_bar=false"]


def test_the_reformer_recipe_resumes_exactly_and_reports_its_buckets(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = [str(CONFIGS / "debug.yaml"), *tiny_data, *TINY_MODEL, "model.position.kind=sinusoidal",
            "model.attention.kind=lsh", "model.attention.chunk=16", "model.attention.rounds=2",
            "model.attention.mass_sample=32", "model.residual.kind=reversible", "model.ffn_chunk=24",
            f"run.root={tmp_path}", *COMMON]
    run = train_twice_from_a_checkpoint(args, tmp_path)
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"stats/lsh/layer0/largest_bucket_over_chunk", "stats/lsh/layer1/queries_beyond_window"} <= tags
    assert {"val_stats/lsh/layer0/mass_round1", "val_stats/lsh/layer0/mass_round2",
            "val_stats/lsh/layer1/mass_all_rounds"} <= tags
    assert "val_stats/lsh/layer0/largest_bucket_over_chunk" in tags
    mass = acc.Scalars("val_stats/lsh/layer0/mass_all_rounds")[-1].value
    assert 0 < mass <= 1
    out = run_cli("inspect", str(run), check=True).stdout
    assert "forward statistics" in out and "mass_all_rounds" in out and "| lsh/layer1 |" in out
    # Evaluated with more hash rounds than trained (Reformer's LSH-n evaluation): its own report
    # beside the plain one, named by the change.
    ev = ["eval-length", str(run), "--lengths", "64", "--max-tokens", "256", "--no-tensorboard"]
    plain = run_cli(*ev, check=True).stdout
    more = run_cli(*ev, "--set", "model.attention.rounds=4", check=True).stdout
    assert "[attention.rounds=4]" in more and "[attention" not in plain
    ppl = [json.loads((run / "eval" / f"length_nonoverlap{s}.json").read_text())["runs"][0]["results"][0]["ppl"]
           for s in ("", "_rounds-4")]
    assert ppl[0] != ppl[1]  # the model computed with 4 rounds, not its trained 2


def test_lowrank_causal_trains_resumes_and_generates(tiny_data, tmp_path):
    args = [str(CONFIGS / "debug.yaml"), *tiny_data, *TINY_MODEL, "model.position.kind=rope",
            "model.attention.kind=lowrank_causal", "model.attention.segment=16", "model.attention.slots=4",
            f"run.root={tmp_path}", *COMMON]
    run = train_twice_from_a_checkpoint(args, tmp_path)
    out = run_cli("generate", str(run), "--prompt", "def ", "--max-new-tokens", "40", "--temperature", "0",
                  check=True).stdout
    assert out.strip()
