"""Softmax attention's own paths (the mask budget, ALiBi folded into the dot product,
FlexAttention on CPU, the KV cache), and decoder-level behaviour: sampling, the aux structure,
tied embeddings, activation checkpointing. Causality, batching and fast = reference for every
kind run in tests/unit/test_axes.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmtrain.config import ConfigError
from lmtrain.generate import generate
from lmtrain.model.attention import reference_paths
from lmtrain.model.layer import KVCache
from lmtrain.model.outputs import Aux
from lmtrain.model.positions import POSITIONS
from tests.helpers import V, fast_vs_reference, flex_vs_reference_logits, make_model, property_config

POSITION_KINDS = sorted(POSITIONS)


def test_softmax_masks_are_chunked_to_the_budget(monkeypatch):
    """At long lengths no L x S x H mask exists at once: queries are chunked to fit the budget."""
    model = make_model("model.position=alibi", "model.attention.mask_budget_mb=1",
                       "model.attention.fold_linear_bias=false", dtype=torch.float32)
    seen = []
    real = F.scaled_dot_product_attention

    keys = []

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(None if attn_mask is None else attn_mask.numel() * attn_mask.element_size())
        keys.append(k.shape[-2])
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    L = 1024  # a full fp32 bias would be 4 heads x 1024 x 1024 x 4 B = 16 MiB
    x = torch.randint(0, V, (1, L))
    with torch.no_grad():
        fast = model(x).logits_BLV
        with reference_paths():
            ref = model(x).logits_BLV
    assert len(seen) > 2 * model.cfg.n_layers and max(s for s in seen if s) <= 1 << 20
    # each block of queries attends to the causal prefix of keys only, not to all L keys
    per_layer = keys[: len(keys) // model.cfg.n_layers]  # the reference path does not call SDPA
    assert per_layer == sorted(per_layer) and per_layer[0] < L and per_layer[-1] == L
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)], ids=["f32", "f64"])
def test_alibi_is_folded_into_the_dot_product_at_long_lengths(monkeypatch, dtype, tol):
    """ALiBi in training (aligned positions, fp32/fp64): SDPA runs with is_causal=True and no
    mask at all, and the outputs and gradients match the reference at L = 1024."""
    model = make_model("model.position=alibi", dtype=dtype, train=True)
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((attn_mask is None, is_causal, q.shape[-1]))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    x = torch.randint(0, V, (2, 1024))
    (fast, fast_grads), (ref, ref_grads) = fast_vs_reference(model, x)
    assert calls and all(no_mask and causal and dim % 8 == 0 for no_mask, causal, dim in calls), calls
    assert all(k.path_counts["folded"] >= 1 for k in model.attention_kernels())
    torch.testing.assert_close(fast, ref, rtol=tol, atol=tol)
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=tol, atol=tol, msg=name)


def test_folded_bias_is_exact_in_bf16_at_any_distance():
    """With content-free queries and keys the folded scores are the bias alone. In bf16 (products
    accumulated in fp32, as SDPA does) they equal c_h / sqrt(D) (k - q) + a per-query constant
    exactly, c_h the slope rounded once, at positions far past bf16's 256 exact integers; one
    dimension holding the position (the fp32 fold) would be off by up to m_h x 4 there."""
    import math

    from lmtrain.model.attention.paths import fold_linear_bias
    from lmtrain.model.positions import alibi_slopes

    H, D, L = 6, 64, 5000  # 6 heads: slopes that are not powers of two
    slopes = torch.tensor(alibi_slopes(H))
    zeros = torch.zeros(1, H, L, D, dtype=torch.bfloat16)
    pos = torch.arange(L) + 12345
    q, k, _ = fold_linear_bias(zeros, zeros, zeros, slopes, pos)
    scores = (q.float() @ k.float().transpose(-1, -2))[0] / math.sqrt(D)  # H L L
    c = (slopes * math.sqrt(D)).to(torch.bfloat16).float() / math.sqrt(D)
    want = c[:, None, None] * (pos[None, :] - pos[:, None]).float()
    got = scores - scores[:, :, :1]
    torch.testing.assert_close(got, want - want[:, :, :1], rtol=0, atol=1e-3)  # fp32 rounding of ~1e3 only
    assert (c / slopes - 1).abs().max() < 2**-8  # the slopes, rounded once to bf16


def test_alibi_folds_in_bf16_and_matches_the_reference():
    """bf16 training with ALiBi takes the folded path (no mask) and stays within the kernel's
    declared bf16 tolerance of the fp32 reference at L = 2048."""
    from lmtrain.model.attention import AttentionInputs
    from lmtrain.model.positions import build_position

    model = make_model("model.position=alibi", dtype=torch.float32)
    kernel = model.attention_kernels()[0]
    position = build_position(model.cfg.position, d_model=32, n_heads=4, seq_len=2048)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 2048, 8, generator=g) for _ in range(3))
    pos = torch.arange(2048)

    def run(dtype, reference=False):
        qs, ks, vs = (t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v))
        inp = AttentionInputs(position=position, q_pos=pos, k_pos=pos, aux=Aux())
        with reference_paths(reference):
            out = kernel(qs, ks, vs, inp)
        out.float().square().sum().backward()
        return out.float(), [t.grad.float() for t in (qs, ks, vs)]

    kernel.path_counts.clear()
    fast, fast_grads = run(torch.bfloat16)
    assert kernel.path_counts["folded"] == 1
    ref, ref_grads = run(torch.float32, reference=True)
    tol = kernel.tolerances[torch.bfloat16]
    torch.testing.assert_close(fast, ref, rtol=tol.rtol, atol=tol.atol)
    for a, b in zip(fast_grads, ref_grads):  # gradients summed over 2048 queries: relative to their scale
        assert (a - b).abs().max() <= tol.rtol * b.abs().max() + tol.atol


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on CPU, on purpose
@pytest.mark.parametrize("position", ["alibi", "none"])
def test_flex_forward_matches_reference_on_cpu(position):
    pytest.importorskip("torch.nn.attention.flex_attention")
    model = make_model(f"model.position={position}", "model.attention.backend=flex", dtype=torch.float32)
    flex_vs_reference_logits(model, torch.randint(0, V, (2, 32)))


def test_flex_with_a_kv_cache_falls_back_to_sdpa():
    """A block mask needs aligned queries and keys: decoding with a cache takes SDPA."""
    model = make_model("model.position=alibi", "model.attention.backend=flex")
    prompt = torch.randint(0, V, (1, 4))
    cached = generate(model, prompt, 3, temperature=0.0, use_cache=True)
    assert torch.equal(cached, generate(model, prompt, 3, temperature=0.0, use_cache=False))
    # the prompt through the block mask, the 2 later forwards (one new token each) through SDPA
    assert all(k.path_counts["flex"] >= 1 and k.path_counts["sdpa"] >= 2 for k in model.attention_kernels())


def test_flex_refuses_dropout():
    with pytest.raises(ConfigError, match="flex does not support dropout"):
        property_config("model.attention.backend=flex", "model.dropout=0.1")


@pytest.mark.parametrize("position", POSITION_KINDS)
def test_kv_cache_equals_full_recompute(position):
    model = make_model(f"model.position={position}")
    prompt = torch.randint(0, V, (2, 5))
    with_cache = generate(model, prompt, 12, temperature=0.0, use_cache=True)
    without = generate(model, prompt, 12, temperature=0.0, use_cache=False)
    assert torch.equal(with_cache, without)
    # Incremental logits equal the full forward's logits position by position.
    seq = with_cache[:1]
    cache = KVCache()
    steps = [model(seq[:, :5], cache=cache).logits_BLV]
    steps += [model(seq[:, i : i + 1], cache=cache).logits_BLV for i in range(5, seq.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), model(seq).logits_BLV, rtol=1e-10, atol=1e-10)


def test_sampling_is_seeded_and_respects_top_k():
    model = make_model("model.position=alibi")
    prompt = torch.randint(0, V, (1, 4))
    a = generate(model, prompt, 10, temperature=1.0, top_k=5, seed=3)
    b = generate(model, prompt, 10, temperature=1.0, top_k=5, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, generate(model, prompt, 10, temperature=1.0, top_k=5, seed=4))
    # top_k = 1 leaves only the most likely token: greedy, whatever the temperature and seed.
    greedy = generate(model, prompt, 10, temperature=0.0)
    assert torch.equal(generate(model, prompt, 10, temperature=5.0, top_k=1, seed=9), greedy)


def test_aux_structure_is_returned_empty():
    out = make_model("model.position=alibi")(torch.randint(0, V, (1, 8)))
    assert isinstance(out.aux, Aux) and out.aux.losses == {} and out.aux.total_loss() is None


def test_tied_embeddings_share_storage():
    model = make_model("model.position=alibi")
    assert model.head.weight is model.embed.weight
    untied = make_model("model.position=alibi", "model.tie_embeddings=false")
    assert untied.head.weight is not untied.embed.weight


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    """Recomputing each layer in backward (dropout replayed from the saved RNG state) changes
    nothing but memory: same loss, same gradients."""
    results = []
    for enabled in (False, True):
        model = make_model("model.position=alibi", "model.dropout=0.2", train=True)
        model.set_activation_checkpointing(enabled)
        idx = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(7)
        loss = F.cross_entropy(model(idx).logits_BLV.flatten(0, 1), idx.roll(-1, 1).flatten())
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_depth_modules_read_predictions_through_the_readout(monkeypatch):
    """`ctx.readout` applies the decoder's final norm and LM head to any state: on the depth
    module's output it gives the model's own logits (what exit classifiers build on)."""
    model = make_model("model.position=alibi")
    seen = {}
    forward = type(model.depth).forward

    def spy(depth, x, ctx):
        out = forward(depth, x, ctx)
        seen["logits"] = ctx.readout.logits(out)
        return out

    monkeypatch.setattr(type(model.depth), "forward", spy)
    logits = model(torch.randint(0, V, (2, 12))).logits_BLV
    torch.testing.assert_close(seen["logits"], logits, rtol=0, atol=0)
    assert not any(k.startswith("readout") for k in model.state_dict())  # references: no new checkpoint keys
