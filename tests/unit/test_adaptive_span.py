"""Adaptive attention span: the mask formula, fast paths against the paper's dense form
(outputs and gradients, z included), the trimmed window, span loss and clamping, KV cache.
The training run (per-head statistics, `lmtrain inspect`, exact resume) and the benchmark
are in tests/integration/test_adaptive_span.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmtrain.model.attention.adaptive_span import AdaptiveSpanAttention, AdaptiveSpanConfig, log_span_mask
from lmtrain.model.positions import build_position
from tests.helpers import call_kernel, make_model

H, D = 4, 8


def kernel(spans, *, ramp=8, block=8, max_span=64, dtype=torch.float64, backend="auto"):
    k = AdaptiveSpanAttention(AdaptiveSpanConfig(max_span=max_span, ramp=ramp, block=block, backend=backend),
                              d_model=H * D, n_heads=H, dropout=0.0).to(dtype)
    with torch.no_grad():
        k.span_frac.copy_(torch.tensor(spans, dtype=dtype) / max_span)
    return k


def run(k, position, q, kk, v, q_pos, k_pos, reference: bool):
    for t in (q, kk, v, k.span_frac):
        t.grad = None
    out = call_kernel(k, q, kk, v, position=position, q_pos=q_pos, k_pos=k_pos, reference=reference)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach().clone(), [t.grad.clone() for t in (q, kk, v, k.span_frac)]


def test_mask_follows_the_paper():
    z = torch.tensor([10.0], dtype=torch.float64)
    dist = torch.tensor([-1, 0, 10, 26, 41, 42, 50])
    m = log_span_mask(z, dist, ramp=32).exp()[0]
    # m(x) = clamp((R + z - x) / R, 0, 1), and future keys (x < 0) masked.
    assert m.tolist() == pytest.approx([0.0, 1.0, 1.0, 0.5, 1 / 32, 0.0, 0.0])


# Spans shorter than L and longer than L (up to S), per head, not on integer ties.
SPANS = {"short": [0.0, 3.3, 7.7, 12.5], "long": [20.2, 45.6, 58.1, 64.0], "mixed": [0.0, 4.4, 33.3, 64.0]}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("position", ["none", "alibi", "rope"])
@pytest.mark.parametrize("spans", sorted(SPANS))
def test_fast_path_matches_dense_reference_with_z_gradients(spans, position, dtype):
    torch.manual_seed(0)
    L = 45  # not a multiple of the block
    k = kernel(SPANS[spans], dtype=dtype)
    pos_module = build_position(position, d_model=H * D, n_heads=H, seq_len=L).to(dtype)
    q, kk, v = (torch.randn(2, H, L, D, dtype=dtype) for _ in range(3))
    pos = torch.arange(L)
    q_rot, k_rot, v = (t.requires_grad_() for t in (pos_module.rotate(q, pos), pos_module.rotate(kk, pos), v))
    fast = run(k, pos_module, q_rot, k_rot, v, pos, pos, reference=False)
    assert k.path_counts["chunked"] >= 1
    ref = run(k, pos_module, q_rot, k_rot, v, pos, pos, reference=True)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(fast[0], ref[0], **tol)
    for name, a, b in zip(("q", "k", "v", "z"), fast[1], ref[1]):
        torch.testing.assert_close(a, b, **tol, msg=name)
    assert fast[1][3].abs().sum() > 0  # z really gets a gradient


def test_decoding_path_matches_reference():
    """With a KV cache the queries are the last few of the keys: the block loop path."""
    torch.manual_seed(1)
    k = kernel(SPANS["mixed"])
    none = build_position("none", d_model=H * D, n_heads=H, seq_len=64)
    q = torch.randn(1, H, 5, D, dtype=torch.float64, requires_grad=True)
    kk, v = (torch.randn(1, H, 50, D, dtype=torch.float64, requires_grad=True) for _ in range(2))
    k_pos = torch.arange(50)
    fast = run(k, none, q, kk, v, k_pos[-5:], k_pos, reference=False)
    ref = run(k, none, q, kk, v, k_pos[-5:], k_pos, reference=True)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-10, atol=1e-10)
    for a, b in zip(fast[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_keys_beyond_the_largest_span_are_never_computed(monkeypatch):
    k = kernel([1.0, 2.0, 9.5, 10.0], ramp=8, block=8)  # max z + R = 18 -> window 24
    assert k.window() == 24
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, kk, v, attn_mask=None, **kw):
        seen.append((q.shape[-2], kk.shape[-2]))
        return real(q, kk, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    L = 200
    x = torch.randn(1, H, L, D, dtype=torch.float64)
    call_kernel(k, x, x, x)
    # Every block of 8 queries sees at most 8 + 24 - 1 keys: O(L x window), not O(L^2).
    assert seen and all(nq == 8 * (nq // 8) and nk == 8 + 24 - 1 for nq, nk in seen)
    total = sum(nq * nk for nq, nk in seen)
    assert total <= L * (8 + 24)


def _model(*extra, dtype=torch.float64):
    return make_model("model.attention.kind=adaptive_span", "model.attention.max_span=64", "model.attention.ramp=8",
                      "model.attention.block=8", "data.vocab_size=300", *extra, dtype=dtype)


def test_span_loss_is_coef_times_mean_span_summed_over_layers_and_z_is_clamped():
    model = _model("model.attention.loss_coef=0.01").train()
    kernels = model.attention_kernels()
    with torch.no_grad():
        kernels[0].span_frac.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
        kernels[1].span_frac.copy_(torch.tensor([0.5, 0.5, 0.5, 0.5]))
    out = model(torch.randint(0, 300, (1, 20)))
    want = 0.01 * (64 * 0.25 + 64 * 0.5)  # coef * S * mean(z / S), per layer, summed
    assert float(out.aux.losses["span"].detach()) == pytest.approx(want)
    out.aux.losses["span"].backward()
    assert kernels[0].span_frac.grad is not None
    with torch.no_grad():
        kernels[0].span_frac.copy_(torch.tensor([-0.5, 0.2, 1.7, 1.0]))
    model.after_optimizer_step()
    assert kernels[0].span_frac.tolist() == pytest.approx([0.0, 0.2, 1.0, 1.0])
    # Evaluation adds no span loss.
    assert "span" not in model.eval()(torch.randint(0, 300, (1, 20))).aux.losses


def test_fixed_spans_are_not_learned():
    model = _model("model.attention.fixed=true", "model.attention.init_span=64").train()
    out = model(torch.randint(0, 300, (1, 20)))
    assert "span" not in out.aux.losses
    assert all(not k.span_frac.requires_grad and k.spans().tolist() == [64.0] * 4 for k in model.attention_kernels())


def test_kv_cache_equals_full_recompute():
    from lmtrain.generate import generate

    model = _model().eval()
    for k in model.attention_kernels():
        with torch.no_grad():
            k.span_frac.copy_(torch.tensor([0.0, 0.1, 0.3, 1.0]))
    prompt = torch.randint(0, 300, (2, 5))
    assert torch.equal(generate(model, prompt, 20, temperature=0.0, use_cache=True),
                       generate(model, prompt, 20, temperature=0.0, use_cache=False))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("position", ["none", "alibi"])
def test_flex_forward_matches_reference_on_cpu(position):
    pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(2)
    k = kernel(SPANS["mixed"], dtype=torch.float32, backend="flex")
    pos_module = build_position(position, d_model=H * D, n_heads=H, seq_len=64)
    x = [torch.randn(1, H, 64, D) for _ in range(3)]
    with torch.no_grad():
        flex = call_kernel(k, *x, position=pos_module)
        ref = call_kernel(k, *x, position=pos_module, reference=True)
    torch.testing.assert_close(flex, ref, rtol=1e-4, atol=1e-4)
    assert k.path_counts["flex"] == 1
