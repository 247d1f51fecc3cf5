"""Optimizer groups, learning-rate schedule, FLOPs accounting, atomic checkpoint writes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmtrain.config import load_config
from lmtrain.model import build_model
from lmtrain.model.flops import matmul_params, training_flops_per_token
from lmtrain.train.optim import lr_at, param_groups
from tests.helpers import CONFIGS


@pytest.mark.parametrize("position", ["alibi", "learned"])
def test_no_weight_decay_on_norms_biases_embeddings(position):
    model = build_model(load_config(CONFIGS / "debug.yaml", [f"model.position={position}"]))
    decay, rest = param_groups(model, 0.1)
    decayed = {id(p) for p in decay["params"]}
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            is_matrix = isinstance(module, nn.Linear) and pname == "weight" and p is not model.embed.weight
            assert (id(p) in decayed) == is_matrix, f"{name}.{pname}"
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    n_all = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(rest["params"]) == n_all


def test_lr_schedule_warmup_then_cosine():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)
    steps = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))


def test_decay_steps_sets_the_cosine_not_the_stop():
    """optim.decay_steps stretches the schedule past trainer.max_steps; null decays at max_steps."""
    from lmtrain.train.module import LMModule

    def lrs(*overrides):
        cfg = load_config(CONFIGS / "debug.yaml", ["optim.lr=1.0", "optim.min_lr=0.1", "optim.warmup_steps=10",
                                                   "trainer.max_steps=110", *overrides])
        sched = LMModule(cfg).configure_optimizers()["lr_scheduler"]["scheduler"]
        return [sched.lr_lambdas[0](s) for s in (60, 110)]

    assert lrs() == pytest.approx([0.55, 0.1])
    assert lrs("optim.decay_steps=210") == pytest.approx([lr_at(s, lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=210)
                                                          for s in (60, 110)])
    assert lrs("optim.decay_steps=210")[1] == pytest.approx(0.55)


def test_flops_formula():
    cfg = load_config(CONFIGS / "debug.yaml")
    model = build_model(cfg)
    m = cfg.model
    # Per layer: qkv + proj + up + down weights and biases, two norms; the tied head counts once more.
    per_layer = (3 * m.d_model**2 + 3 * m.d_model) + (m.d_model**2 + m.d_model) + \
        (m.d_model * m.d_ff + m.d_ff) + (m.d_ff * m.d_model + m.d_model) + 4 * m.d_model
    expected = m.n_layers * per_layer + 2 * m.d_model + cfg.data.vocab_size * m.d_model
    assert matmul_params(model) == expected
    L = cfg.data.seq_len
    assert training_flops_per_token(model, L) == 6 * expected + 12 * m.n_layers * m.d_model * L


def test_atomic_checkpoint_survives_a_failed_save(tmp_path, monkeypatch):
    from lmtrain.train.checkpoint_io import AtomicCheckpointIO, clean_partial

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def torn_save(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["step"] == 1  # the old file is intact
    assert list(tmp_path.glob(".*.tmp*"))
    clean_partial(tmp_path)
    assert not list(tmp_path.glob(".*.tmp*"))


def test_resume_picks_the_newest_checkpoint(tmp_path):
    """A kill between the save of stepN.ckpt and of last.ckpt leaves the step file newer."""
    from lmtrain.train.checkpoint import last_checkpoint

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    assert last_checkpoint(tmp_path) is None
    torch.save(checkpoint_at(15), ckpts / "step000015.ckpt")
    assert last_checkpoint(tmp_path) == ckpts / "step000015.ckpt"
    torch.save(checkpoint_at(15), ckpts / "last.ckpt")
    assert last_checkpoint(tmp_path) == ckpts / "last.ckpt"
    torch.save(checkpoint_at(30), ckpts / "step000030.ckpt")
    assert last_checkpoint(tmp_path) == ckpts / "step000030.ckpt"
    torch.save(checkpoint_at(31), ckpts / "last.ckpt")  # a final save after the last period
    assert last_checkpoint(tmp_path) == ckpts / "last.ckpt"


def checkpoint_at(step: int) -> dict:
    """The smallest dict that reads as an lmtrain checkpoint."""
    return {"global_step": step, "hyper_parameters": {"config": {}}, "state_dict": {}}
