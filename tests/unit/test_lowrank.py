"""Causal low-rank attention (lmtrain/model/attention/lowrank.py): the identity oracle, the
segments path against the dense reference, the KV cache of summaries, and the counterexample
that keeps Linformer out of decoders."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmtrain.model.attention import ATTENTION, build_attention
from lmtrain.model.attention.lowrank import pooling
from tests.helpers import call_kernel, make_model

H, D = 2, 8


def lowrank(**opts):
    torch.manual_seed(0)
    return build_attention(ATTENTION.config("lowrank_causal", **opts), d_model=H * D, n_heads=H, dropout=0.0)


def qkv(L, B=2, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(B, H, L, D, generator=g, dtype=dtype) for _ in range(3)]
    return [t.requires_grad_(grad) for t in out]


def causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("segment, L, block", [(8, 40, 16), (5, 37, 10), (16, 16, 64), (3, 50, 3)])
def test_slots_equal_to_the_segment_with_identity_compression_is_full_causal_attention(segment, L, block):
    kernel = lowrank(segment=segment, slots=segment, block=block)
    torch.testing.assert_close(kernel.proj.detach(), torch.eye(segment, dtype=torch.float32).expand(H, -1, -1))
    kernel = kernel.double()
    q, k, v = qkv(L)
    for reference in (False, True):
        torch.testing.assert_close(call_kernel(kernel, q, k, v, reference=reference), causal(q, k, v),
                                   rtol=0, atol=1e-10)
    assert kernel.path_counts["segments"] == 1


@pytest.mark.parametrize("compress", ["static", "dynamic"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_the_segments_path_equals_the_reference(compress, dtype):
    kernel = lowrank(segment=6, slots=2, block=12, compress=compress).to(dtype)
    with torch.no_grad():
        kernel.proj.normal_()  # learned values, not the initial pooling
    tol = kernel.tolerances[dtype]
    results = []
    for reference in (False, True):
        kernel.zero_grad()
        q, k, v = qkv(41, dtype=dtype, grad=True)
        out = call_kernel(kernel, q, k, v, reference=reference)
        (out * torch.linspace(-1, 1, D, dtype=dtype)).sum().backward()
        results.append((out.detach(), q.grad, k.grad, v.grad, kernel.proj.grad.clone()))
    for fast, ref in zip(*results):
        torch.testing.assert_close(fast, ref, rtol=tol.rtol, atol=tol.atol)


def test_pooling_initialisation():
    torch.testing.assert_close(pooling(2, 6), torch.tensor([[1 / 3] * 3 + [0] * 3, [0] * 3 + [1 / 3] * 3],
                                                           dtype=torch.float64))
    assert torch.equal(pooling(4, 4), torch.eye(4, dtype=torch.float64))


def test_a_query_sees_summaries_of_completed_segments_only():
    """Changing keys and values of the query's own segment after it, or of any later segment,
    leaves it unchanged; changing an earlier segment changes it through the summaries."""
    kernel = lowrank(segment=4, slots=1).double()
    q, k, v = qkv(16, B=1)
    base = call_kernel(kernel, q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 6:], v2[:, :, 6:] = torch.randn_like(k2[:, :, 6:]), torch.randn_like(v2[:, :, 6:])
    torch.testing.assert_close(call_kernel(kernel, q, k2, v2)[:, :, :6], base[:, :, :6], rtol=0, atol=0)
    v3 = v.clone()
    v3[:, :, 1] += 1.0  # segment 0: seen exactly by queries 1..3, through its summary by 4..15
    changed = (call_kernel(kernel, q, k, v3) - base).abs().amax(dim=(0, 1, 3)) > 0
    assert changed.tolist() == [False] + [True] * 15


def naive_causal_linformer(q, k, v, E):
    """Linformer with a causal-looking mask applied to nothing: K' = E K projects all L
    positions into r slots, so every slot carries future keys (the public 'causal' versions)."""
    kp, vp = E @ k, E @ v  # B H r D
    return torch.softmax(q @ kp.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ vp


def test_naive_linformer_is_not_causal_and_this_kernel_is():
    L, t = 32, 10
    q, k, v = qkv(L, B=1)
    E = torch.randn(4, L, dtype=torch.float64) / L
    k2, v2 = k.clone(), v.clone()
    k2[:, :, t + 1:] += 1.0
    v2[:, :, t + 1:] += 1.0
    naive_a, naive_b = naive_causal_linformer(q, k, v, E), naive_causal_linformer(q, k2, v2, E)
    assert not torch.allclose(naive_a[:, :, : t + 1], naive_b[:, :, : t + 1])  # the past saw the future
    kernel = lowrank(segment=4, slots=2).double()
    a, b = call_kernel(kernel, q, k, v), call_kernel(kernel, q, k2, v2)
    torch.testing.assert_close(a[:, :, : t + 1], b[:, :, : t + 1], rtol=0, atol=0)


@pytest.mark.parametrize("compress", ["static", "dynamic"])
def test_the_kv_cache_holds_summaries_and_the_open_segment(compress):
    from lmtrain.generate import generate
    from lmtrain.model.layer import KVCache

    c, r = 8, 2
    model = make_model("model.attention.kind=lowrank_causal", "model.position.kind=none",
                       f"model.attention.segment={c}", f"model.attention.slots={r}",
                       f"model.attention.compress={compress}")
    prompt = torch.randint(1, 97, (2, 11))
    cached = generate(model, prompt, 30, temperature=0.0)
    assert torch.equal(cached, generate(model, prompt, 30, temperature=0.0, use_cache=False))
    cache = KVCache()
    model(cached[:, :11], cache=cache)
    for t in range(11, 41):
        model(cached[:, t : t + 1], cache=cache)
    for key, (_, _, pos) in cache.entries.items():
        assert pos.tolist() == list(range(40, 41))  # position 40 opens segment 5: its raw key only
        state = cache.states[key]
        assert state["done"] == 5 and state["k"].shape[2] == 5 * r


def test_the_flop_count_grows_with_the_summaries():
    m = make_model("model.attention.kind=lowrank_causal", "model.position.kind=rope", "model.attention.segment=64",
                   "model.attention.slots=8").cfg
    cls = ATTENTION.get("lowrank_causal")
    assert cls.attention_flops(m, 64) == 12 * m.d_model * 64
    assert cls.attention_flops(m, 64 * 11) == 12 * m.d_model * (64 + 8 * 10)


def test_no_slots_is_attention_within_the_segment():
    kernel = lowrank(segment=8, slots=0, block=16).double()
    q, k, v = qkv(30)
    i = torch.arange(30)
    allowed = (i[None, :] // 8 == i[:, None] // 8) & (i[None, :] <= i[:, None])
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    for reference in (False, True):
        torch.testing.assert_close(call_kernel(kernel, q, k, v, reference=reference), want, rtol=0, atol=1e-12)
