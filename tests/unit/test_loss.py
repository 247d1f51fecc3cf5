"""The loss: the fused chunked LM head + cross-entropy against the plain loss, its memory, its
rule, its refusal under ZeRO-3, and perplexity. Training speed (`lmtrain bench train`,
torch.compile) is tested in tests/integration/test_speed.py."""

from __future__ import annotations

import math

import pytest
import torch

from lmtrain.config import ConfigError, load_config
from lmtrain.train.loss import chunked_lm_loss, lm_loss, loss_chunk, perplexity
from tests.helpers import CONFIGS


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


def test_perplexity_is_one_function_for_floats_and_tensors_and_stays_finite():
    assert perplexity(2.0) == pytest.approx(math.exp(2.0))
    assert float(perplexity(torch.tensor(2.0))) == pytest.approx(math.exp(2.0), rel=1e-6)
    assert perplexity(1e6) == math.exp(50.0) and float(perplexity(torch.tensor(1e6))) == pytest.approx(math.exp(50.0))
