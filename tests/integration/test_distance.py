"""Distance-aware scores end to end (issue 21): `lmtrain train` with a learned position
scheme and with the DA-Transformer kind; the learned values resume exactly, survive both
export formats, and show in TensorBoard and `inspect`."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import CONFIGS, TINY_MODEL, run_cli, train_twice_from_a_checkpoint


@pytest.mark.parametrize("overrides, stat, profile", [
    (["model.position.kind=kerple_log"], "kerple_log.p", "kerple_log.bias"),
    (["model.position.kind=none", "model.attention.kind=distance_aware", "model.attention.init_w=-0.05"],
     "da.w", "da.rescale"),
], ids=["kerple_log", "distance_aware"])
def test_learned_distance_values_resume_exactly_and_survive_export(overrides, stat, profile, tiny_data, tmp_path):
    from lmtrain.train.checkpoint import load_trained

    args = [str(CONFIGS / "debug.yaml"), *tiny_data, *TINY_MODEL, *overrides, f"run.root={tmp_path}",
            "trainer.max_steps=8", "checkpoint.every_n_steps=4", "trainer.val_every_n_steps=4",
            "trainer.log_every_n_steps=2", "trainer.progress_bar=false"]
    run = train_twice_from_a_checkpoint(args, tmp_path)
    a, b = load_trained(run).model.state_dict(), load_trained(tmp_path / "b").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The learned values are trained: they moved between the two checkpoints.
    mid = load_trained(run / "checkpoints" / "step000004.ckpt").model.head_stats()[0][stat][0]
    assert not torch.equal(mid, load_trained(run).model.head_stats()[0][stat][0])

    # Both export formats keep the learned values: lmtrain's safetensors and transformers' remote code.
    transformers = pytest.importorskip("transformers")
    ours = load_trained(run).model
    native = tmp_path / "exp"
    run_cli("export", str(run), "--out", str(native), check=True)
    assert all(torch.equal(v, load_trained(native).model.state_dict()[k]) for k, v in ours.state_dict().items())
    hf_dir = tmp_path / "hf"
    run_cli("export", str(run), "--format", "hf", "--out", str(hf_dir), check=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    ids = torch.randint(0, 512, (1, 200))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits_BLV, rtol=1e-5, atol=1e-5)

    # Statistics: per-head scalars and the profile heatmap in TensorBoard, both tables in inspect.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert {f"{stat}/layer0/head0", f"{stat}/mean"} <= set(acc.Tags()["scalars"])
    assert {f"{stat}/heatmap", f"{profile}/distance"} <= set(acc.Tags()["images"])
    out = run_cli("inspect", str(run), check=True).stdout
    assert f"{stat} per layer and head" in out and f"{profile} against the distance" in out and "d=2048" in out
