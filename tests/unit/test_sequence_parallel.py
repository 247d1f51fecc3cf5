"""Sequence parallelism (trainer.sequence_parallel, DeepSpeed Ulysses over gloo): two processes,
each computing half of every sequence, give the whole sequence's outputs and, with their
gradients averaged as DDP averages them, the whole sequence's gradients; for every attention
kind that can split its heads and every positional scheme. Kinds that cannot are refused at
load time with the reason."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from lmtrain.config import ConfigError, load_config
from lmtrain.model.attention import ATTENTION
from lmtrain.model.positions import POSITIONS
from tests.helpers import DEBUG, PROPERTY_MODEL, axis_overrides

N = 2
B = 2
SP = ["trainer.strategy=ddp", "trainer.devices=2", f"trainer.sequence_parallel={N}"]


def _position_cases() -> dict[str, list[str]]:
    return {f"softmax-{kind}": axis_overrides("position", kind) for kind in POSITIONS}


def _attention_cases() -> dict[str, list[str]]:
    cases = {}
    for kind, cls in ATTENTION.items():
        if not cls.caps.head_shards:
            continue
        opts = axis_overrides("attention", kind)
        if kind == "sparse":  # one layout for every head (per-head layouts are refused)
            opts = [o for o in opts if not o.startswith("model.attention.pattern=")] + [
                "model.attention.pattern=window+globals", "model.attention.global_token_ids=[5]"]
        position = "alibi" if cls.caps.score_bias else "none"
        cases[kind] = [*opts, f"model.position.kind={position}"]
    return cases


CASES = {
    **_position_cases(),
    **_attention_cases(),
    "softmax-alibi-documents": ["model.position.kind=alibi", "data.document_mask=true"],
    "softmax-rope-documents": ["model.position.kind=rope", "data.document_mask=true"],
    "universal": ["model.depth.kind=universal", "model.depth.steps=2"],
}
EOT = 3


def _config(overrides):
    return load_config(DEBUG, [*PROPERTY_MODEL, *overrides, *SP])


def _tokens(cfg) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    x = torch.randint(4, cfg.data.vocab_size, (B, cfg.data.seq_len), generator=g)
    x[0, [5, 20, 30]] = EOT  # documents end inside both halves of the sequence, and at different places per row
    x[1, 27] = EOT
    x[:, 11] = 5  # a global token (sparse `globals`) in the first half
    return x


def _model(cfg):
    from lmtrain.model import build_model

    torch.manual_seed(0)
    model = build_model(cfg).double().eval()
    if cfg.data.document_mask:
        model.document_eot.fill_(EOT)
    return model


def _loss(model, x, y):
    logits = model(x).logits_BLV
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()), logits


def _worker(rank: int, port: int, results):
    os.environ["DS_ACCELERATOR"] = "cpu"
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=N)
    from lmtrain.train.sequence import ulysses_shard

    shard = ulysses_shard(N, rank, N)
    out = {}
    for name, overrides in CASES.items():
        cfg = _config(overrides)
        x = _tokens(cfg)
        y = torch.roll(x, -1, 1)
        want_model, model = _model(cfg), _model(cfg)
        want, want_logits = _loss(want_model, x, y)
        want.backward()
        model.shard_sequence(shard)
        own = shard.positions(x.shape[1])
        got, got_logits = _loss(model, x, y[:, own])
        got.backward()
        worst_grad = 0.0
        for p, q in zip(model.parameters(), want_model.parameters()):
            if p.grad is None and q.grad is None:
                continue
            g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            torch.distributed.all_reduce(g)  # DDP's average over the ranks
            g /= N
            scale = q.grad.abs().max().clamp(min=1e-12)
            worst_grad = max(worst_grad, float((g - q.grad).abs().max() / scale))
        loss = got.detach().clone()
        torch.distributed.all_reduce(loss)
        out[name] = {
            "logits": float((got_logits - want_logits[:, own]).abs().max() / want_logits.abs().max()),
            "loss": float((loss / N - want).abs() / want.abs()),
            "grad": worst_grad,
            "paths": sorted({p for k in model.attention_kernels() for p in k.path_counts}),
        }
    results[rank] = out
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def split_vs_whole() -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(port, results), nprocs=N, join=True)
    return {rank: dict(results[rank]) for rank in range(N)}


@pytest.mark.parametrize("name", list(CASES))
def test_split_sequence_equals_whole_sequence(split_vs_whole, name):
    """fp64: logits, the mean loss and every parameter's gradient agree to 1e-9."""
    for rank in range(N):
        r = split_vs_whole[rank][name]
        assert r["logits"] < 1e-9 and r["loss"] < 1e-9 and r["grad"] < 1e-9, (rank, r)


def test_split_sequence_runs_the_fast_paths(split_vs_whole):
    """The comparisons above are not between two reference paths: ALiBi folds, documents mask."""
    r = split_vs_whole[0]
    assert "folded" in r["softmax-alibi"]["paths"], r["softmax-alibi"]
    assert "documents" in r["softmax-alibi-documents"]["paths"], r["softmax-alibi-documents"]


@pytest.mark.parametrize("overrides, message", [
    (["model.attention.kind=rfa", "model.position.kind=none"],
     "cannot attend over a split sequence (its per-head feature scales"),
    (["model.attention.kind=lowrank_causal", "model.position.kind=none"], "model.attention.kind=lowrank_causal"),
    (["model.attention.kind=lsh", "model.position.kind=none"], "model.attention.kind=lsh cannot attend over a split"),
    (["model.attention.kind=sparse", "model.attention.pattern=window|strided"], "differs by head"),
    (["model.depth.kind=act"], "model.depth.kind=act gives positions their own depth"),
    (["model.residual.kind=reversible"], "model.residual.kind=reversible reruns layers"),
    (["data.seq_len=47"], "must divide data.seq_len=47"),
    (["model.n_heads=1", "model.d_model=32"], "must divide model.n_heads=1"),
    (["trainer.strategy=auto"], "set trainer.strategy=ddp or deepspeed"),
    (["trainer.devices=3"], "must divide the 3 processes"),
])
def test_refusals_name_the_key_and_the_reason(overrides, message):
    with pytest.raises(ConfigError, match="trainer.sequence_parallel") as e:
        load_config(DEBUG, [*PROPERTY_MODEL, *SP, *overrides])
    assert message in str(e.value)
