"""The fast dense path: the fused chunked LM loss, the folded ALiBi bias (see also
tests/test_model.py), torch.compile, and `lmtrain bench train` against peers."""

from __future__ import annotations

import json

import pytest
import torch

from lmtrain.config import ConfigError, load_config
from lmtrain.train.loss import chunked_lm_loss, lm_loss, loss_chunk
from tests.conftest import CONFIGS, TINY_MODEL, run_cli


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_loss_equals_the_plain_loss(chunk):
    """Loss and gradients of hidden states and head weight, float64, for chunk sizes that do
    and do not divide the 3 x 37 tokens."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (3, 37), generator=g)
    plain = lm_loss(h @ w.T, y)
    plain_grads = torch.autograd.grad(2.5 * plain, [h, w])
    fused = chunked_lm_loss(h, w, y, chunk)
    fused_grads = torch.autograd.grad(2.5 * fused, [h, w])
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_chunked_loss_keeps_no_full_logits():
    """What autograd keeps, and the largest tensor it sees, is far below N x V: the logits of
    one chunk at a time."""
    N, V, M, chunk = 512, 4000, 16, 64
    h = torch.randn(1, N, M, requires_grad=True)
    w = torch.randn(V, M, requires_grad=True)
    y = torch.randint(0, V, (1, N))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        chunked_lm_loss(h, w, y, chunk).backward()
    assert max(saved) <= max(N * M, V * M) and max(saved) < N * V / 10, saved
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        lm_loss(h @ w.T, y).backward()
    assert max(saved) >= N * V  # the plain path keeps them


def test_loss_chunk_rule():
    assert loss_chunk(0, 10**6, 50_000) == 0 and loss_chunk(512, 10, 10) == 512
    assert loss_chunk(-1, 4 * 1024, 4096) == 0  # 64 MiB of logits: not above the budget
    assert loss_chunk(-1, 16 * 4096, 50_000) == (64 << 20) // (50_000 * 4)


def test_training_loss_is_the_same_with_and_without_chunks(tiny_cfg):
    from lmtrain.train.module import LMModule

    results = []
    for chunk in (0, 24):
        cfg = tiny_cfg(f"trainer.loss_chunk_tokens={chunk}", "data.seq_len=32")
        torch.manual_seed(0)
        module = LMModule(cfg).double()
        batch = torch.randint(0, cfg.data.vocab_size, (3, 33))
        loss, _ = module._loss(batch[:, :-1], batch[:, 1:])
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters()}))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-10, atol=1e-12, msg=name)


def test_chunked_loss_is_refused_under_zero3():
    with pytest.raises(ConfigError, match="trainer.loss_chunk_tokens"):
        load_config(CONFIGS / "debug.yaml", ["trainer.strategy=deepspeed", "deepspeed.zero_stage=3",
                                             "trainer.loss_chunk_tokens=128"])


@pytest.mark.slow
def test_compiled_training_runs(tiny_data, tmp_path):
    run_cli("train", str(CONFIGS / "debug.yaml"), *tiny_data, *TINY_MODEL, "trainer.compile=true",
            "trainer.max_steps=3", f"run.root={tmp_path}", "run.name=c", check=True, timeout=1200)
    assert (tmp_path / "c" / "summary.json").exists()


BENCH_MODEL = ["model.n_layers=1", "model.d_model=64", "model.n_heads=2", "model.d_ff=256", "model.bias=false",
               "data.seq_len=64", "data.batch_size=2"]


def test_bench_train_against_peers_with_the_same_parameter_count(tiny_data, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("x_transformers")
    out = tmp_path / "bench.json"
    proc = run_cli("bench", "train", str(CONFIGS / "debug.yaml"), *tiny_data, *BENCH_MODEL, "--vs", "mpt,xtransformers",
                   "--variant", "model.position=none", "--steps", "2", "--warmup", "1", "--rounds", "1",
                   "--threads", "1", "--out", str(out), check=True)
    results = json.loads(out.read_text())["results"]
    assert [r["impl"] for r in results] == ["lmtrain", "lmtrain model.position=none", "mpt", "xtransformers"]
    assert len({r["params"] for r in results}) == 1  # the same model everywhere
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] and 0 <= r["data_wait"] < 1 for r in results)
    assert "the faster peer" in proc.stdout and "MFU against" in proc.stdout


def test_bench_train_refuses_what_a_peer_cannot_build(tiny_data):
    bad = run_cli("bench", "train", str(CONFIGS / "debug.yaml"), *tiny_data, "model.bias=true", "--vs", "mpt")
    assert bad.returncode == 2 and "model.bias=true" in bad.stderr
    bad = run_cli("bench", "train", str(CONFIGS / "debug.yaml"), "--vs", "gpt5")
    assert bad.returncode == 2 and "unknown peer" in bad.stderr
