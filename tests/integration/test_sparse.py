"""Sparse attention and document masking end to end: `lmtrain train` with a per-layer pattern
(BigBird's random blocks included) and packed documents masked, an exact resume, generation
and an export that a new run starts from."""

from __future__ import annotations

import shutil

from tests.helpers import CONFIGS, TINY_MODEL, run_cli


def test_sparse_with_document_masks_trains_resumes_exactly_and_generates(tiny_data, tmp_path):
    from lmtrain.train.callbacks.metrics_file import read_metrics

    args = [str(CONFIGS / "debug.yaml"), *tiny_data, *TINY_MODEL, f"run.root={tmp_path}", "model.dropout=0.1",
            "model.attention.kind=sparse", "model.attention.block=16", "model.attention.window=32",
            "model.attention.layer_patterns=[window|bigbird,window+globals]", "model.attention.global_every=16",
            "data.document_mask=true", "trainer.max_steps=8", "checkpoint.every_n_steps=4",
            "trainer.val_every_n_steps=4", "trainer.log_every_n_steps=2"]
    run_cli("train", *args, "run.name=a", check=True)
    run = tmp_path / "a"
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "checkpoints" / "step000004.ckpt", tmp_path / "b" / "checkpoints" / "step000004.ckpt")
    run_cli("train", *args, "run.name=b", check=True)
    want, got = read_metrics(run / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [got[s] for s in (6, 8)] == [want[s] for s in (6, 8)]

    out = run_cli("generate", str(run), "--prompt", "def ", "--max-new-tokens", "8", check=True)
    assert out.stdout.strip()

    # The density of every layer and head: TensorBoard and inspect.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert {"density/layer0/head0", "density/layer1/head3"} <= set(acc.Tags()["scalars"])
    assert "density/heatmap" in acc.Tags()["images"]
    assert "density per layer and head" in run_cli("inspect", str(run), check=True).stdout
