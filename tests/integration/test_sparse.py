"""Sparse attention and document masking end to end: `lmtrain train` with a per-layer pattern
(BigBird's random blocks included) and packed documents masked, an exact resume, generation,
statistics and pattern pictures, passkey retrieval; the copy probe as a data source."""

from __future__ import annotations

from tests.helpers import CONFIGS, TINY_MODEL, run_cli, train_twice_from_a_checkpoint


def test_sparse_with_document_masks_trains_resumes_exactly_and_generates(tiny_data, tmp_path):
    import json

    args = [str(CONFIGS / "debug.yaml"), *tiny_data, *TINY_MODEL, f"run.root={tmp_path}", "model.dropout=0.1",
            "model.attention.kind=sparse", "model.attention.block=16", "model.attention.window=32",
            "model.attention.layer_patterns=[window|bigbird,window+globals]", "model.attention.global_every=16",
            "data.document_mask=true", "trainer.max_steps=8", "checkpoint.every_n_steps=4",
            "trainer.val_every_n_steps=4", "trainer.log_every_n_steps=2"]
    run = train_twice_from_a_checkpoint(args, tmp_path)

    out = run_cli("generate", str(run), "--prompt", "def ", "--max-new-tokens", "8", check=True)
    assert out.stdout.strip()

    # The density of every layer and head: TensorBoard and inspect.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert {"density/layer0/head0", "density/layer1/head3"} <= set(acc.Tags()["scalars"])
    assert "density/heatmap" in acc.Tags()["images"]
    assert "density per layer and head" in run_cli("inspect", str(run), check=True).stdout

    # A picture of each layer's pattern: TensorBoard, the run's PNG and inspect's.
    assert "attention/pattern" in acc.Tags()["images"]
    assert (run / "attention_patterns.png").stat().st_size > 1000
    png = tmp_path / "patterns.png"
    out = run_cli("inspect", str(run), "--pattern-png", str(png), check=True).stdout
    assert f"attention patterns at L=64: {png}" in out and png.stat().st_size > 1000

    # Passkey retrieval on the trained run: every length and depth, table, heatmap and JSON.
    out = run_cli("eval-retrieval", str(run), "--lengths", "160,256", "--depths", "3", "--trials", "2",
                  "--out", str(tmp_path / "cmp"), check=True)
    assert "depth 0.50" in out.stdout and "L=256" in out.stdout
    rep = json.loads((run / "eval" / "retrieval_passkey.json").read_text())
    assert [(c["length"], c["depth"]) for c in rep["runs"][0]["cells"]] == \
        [(L, d) for L in (160, 256) for d in (0.0, 0.5, 1.0)]
    assert all(0 <= c["accuracy"] <= 1 and c["logprob"] < 0 for c in rep["runs"][0]["cells"])
    assert (tmp_path / "cmp" / "retrieval_passkey.png").stat().st_size > 1000
    # Real text as the filler; a length too short for the prompt is refused in one line.
    run_cli("eval-retrieval", str(run), "--lengths", "200", "--depths", "1", "--trials", "1", "--filler", "data",
            "--no-tensorboard", check=True)
    bad = run_cli("eval-retrieval", str(run), "--lengths", "20")
    assert bad.returncode == 2 and "cannot hold the passkey prompt" in bad.stderr
    bad = run_cli("eval-retrieval", str(run), "--task", "copy")
    assert bad.returncode == 2 and "not on the copy task" in bad.stderr


def test_copy_probe_trains_reports_copy_accuracy_and_evaluates_at_other_lengths(tmp_path):
    import json

    args = [str(CONFIGS / "debug.yaml"), *TINY_MODEL, f"run.root={tmp_path}", "run.name=c", "data.source=copy",
            f"data.dir={tmp_path / 'copy'}", "data.vocab_size=257", "data.seq_len=64", "data.batch_size=4",
            "data.copy.train_documents=64", "data.copy.val_documents=8", "data.val_batches=2", "trainer.max_steps=4",
            "trainer.val_every_n_steps=2", "model.attention.kind=sparse", "model.attention.pattern=window",
            "model.attention.window=16", "model.attention.block=8"]
    out = run_cli("train", *args, check=True)
    assert "copy accuracy" in out.stdout
    run = tmp_path / "c"
    summary = json.loads((run / "summary.json").read_text())
    assert 0 <= summary["val_copy_acc"] <= 1 and summary["val_copy_loss"] > 0
    assert any("val/copy_acc" in json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    out = run_cli("eval-retrieval", str(run), "--task", "copy", "--lengths", "32,64", "--trials", "3", check=True)
    rep = json.loads((run / "eval" / "retrieval_copy.json").read_text())
    assert [c["length"] for c in rep["runs"][0]["cells"]] == [32, 64] and "chance accuracy" in out.stdout
    bad = run_cli("eval-retrieval", str(run), "--task", "copy", "--lengths", "33")
    assert bad.returncode == 2 and "even lengths" in bad.stderr
