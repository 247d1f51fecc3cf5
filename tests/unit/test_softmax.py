"""Model properties, parametrized over every registered position scheme and attention kind,
so a new variant is tested the moment it is registered."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmtrain.config import load_config
from lmtrain.generate import generate
from lmtrain.model import build_model
from lmtrain.model.attention import ATTENTION
from lmtrain.model.layer import KVCache
from lmtrain.model.outputs import Aux
from lmtrain.model.positions import POSITIONS, PositionOutOfRange, alibi_slopes, build_position
from tests.conftest import CONFIGS

POSITION_KINDS = sorted(POSITIONS)
ATTENTION_KINDS = sorted(ATTENTION)
V = 97


def make_model(position: str, kind: str = "softmax", *extra: str, dtype=torch.float64, seed: int = 0):
    cfg = load_config(CONFIGS / "debug.yaml", [
        f"model.position={position}", f"model.attention.kind={kind}", "model.n_layers=2", "model.d_model=32",
        "model.n_heads=4", "model.d_ff=64", f"data.vocab_size={max(V, 257)}", "data.seq_len=48", *extra])
    torch.manual_seed(seed)
    return build_model(cfg).to(dtype).eval()


def combos():
    for kind in ATTENTION_KINDS:
        for pos in POSITION_KINDS:
            cfg = load_config(CONFIGS / "debug.yaml", [f"model.attention.kind={kind}", "model.position=none"])
            cfg.model.position = pos
            cfg_errors = ATTENTION.get(kind).check(cfg.model)
            if not cfg_errors:
                yield kind, pos


COMBOS = list(combos())
IDS = [f"{k}-{p}" for k, p in COMBOS]


# ---- ALiBi slopes -------------------------------------------------------------------------


@pytest.mark.parametrize("n", [8, 12, 16])
def test_alibi_slopes_follow_the_formula(n):
    def pow2(m):  # geometric sequence starting at 2^(-8/m) with that ratio
        return [2 ** (-8 * (i + 1) / m) for i in range(m)]

    c = 2 ** int(math.floor(math.log2(n)))
    expected = pow2(c) + pow2(2 * c)[0::2][: n - c]
    assert alibi_slopes(n) == pytest.approx(expected, rel=1e-12)
    if n == 8:
        assert alibi_slopes(8) == pytest.approx([1 / 2 ** k for k in range(1, 9)])
    if n == 12:  # 8-head slopes, then slopes 0, 2, 4, 6 of the 16-head sequence
        assert alibi_slopes(12)[8:] == pytest.approx([2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5])


def test_alibi_bias_sign_and_shape():
    pos = build_position("alibi", d_model=32, n_heads=4, max_len=0, rope_theta=1e4)
    q, k = torch.arange(5, 8), torch.arange(8)
    bias = pos.score_bias(q, k)
    assert bias.shape == (4, 3, 8)
    slopes = torch.tensor(alibi_slopes(4))
    # slope * (k - q): zero on the diagonal, more negative the farther back the key.
    torch.testing.assert_close(bias[:, 0, 5], torch.zeros(4))
    torch.testing.assert_close(bias[:, 0, 2], -3 * slopes)
    assert (bias[:, :, :5] < 0).all()


def test_rope_scores_depend_only_on_distance():
    pos = build_position("rope", d_model=32, n_heads=2, max_len=0, rope_theta=1e4)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def score(i, j):
        return (pos.rotate(q, torch.tensor([i])) * pos.rotate(k, torch.tensor([j]))).sum()

    torch.testing.assert_close(score(7, 3), score(104, 100))
    assert not torch.allclose(score(7, 3), score(7, 4))


def test_learned_positions_refuse_beyond_their_table():
    model = make_model("learned", "softmax", "model.max_position=16", "data.seq_len=16")
    model(torch.randint(0, V, (1, 16)))
    with pytest.raises(PositionOutOfRange):
        model(torch.randint(0, V, (1, 17)))


def test_sinusoidal_uses_vaswanis_embedding_recipe():
    """Token embeddings N(0, d^-1/2) times sqrt(d) (about 1 per dimension), plus sinusoids of
    amplitude 1; the other schemes keep GPT-2's embeddings."""
    model = make_model("sinusoidal", dtype=torch.float32)
    d = model.cfg.d_model
    assert model.embed_scale == pytest.approx(math.sqrt(d))
    assert float(model.embed.weight.detach().std()) == pytest.approx(d ** -0.5, rel=0.1)
    pe = model.position.embed(torch.zeros(1, 48, d), torch.arange(48))
    assert float(pe.abs().max()) == pytest.approx(1.0, abs=1e-3)
    other = make_model("learned", dtype=torch.float32)
    assert other.embed_scale == 1.0 and float(other.embed.weight.detach().std()) == pytest.approx(0.02, rel=0.1)


# ---- registry-wide properties ----------------------------------------------------------------


@pytest.mark.parametrize("kind, position", COMBOS, ids=IDS)
def test_causality(kind, position):
    assert_causal(make_model(position, kind))


def assert_causal(model, t: int = 23, L: int = 40):
    """Changing the tokens after position t leaves the logits up to t unchanged (and changes
    later ones). Returns both outputs."""
    x = torch.randint(0, V, (2, L))
    y = x.clone()
    y[:, t + 1 :] = torch.randint(0, V, (2, L - t - 1))
    out_x, out_y = model(x), model(y)
    a, b = out_x.logits_BLV, out_y.logits_BLV
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-12)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])
    return out_x, out_y


@pytest.mark.parametrize("kind, position", COMBOS, ids=IDS)
def test_batch_equals_samples_one_by_one(kind, position):
    assert_batch_equals_one_by_one(make_model(position, kind))


def assert_batch_equals_one_by_one(model, x=None):
    """A batch's logits equal those of its samples run one by one; returns the batch's."""
    x = torch.randint(0, V, (3, 33)) if x is None else x
    batched = model(x).logits_BLV
    single = torch.cat([model(x[i : i + 1]).logits_BLV for i in range(x.shape[0])])
    torch.testing.assert_close(batched, single, rtol=1e-10, atol=1e-10)
    return batched


def _fast_vs_reference(model, x):
    """Logits and parameter gradients of the model's fast path, then of its reference path."""
    results = []
    for backend in ("fast", "reference"):
        for k in model.attention_kernels():
            k.force_reference = backend == "reference"
        model.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out.logits_BLV.flatten(0, 1).float(), x.roll(-1, 1).flatten())
        loss.backward()
        results.append((out.logits_BLV.detach().clone(),
                        {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}))
    for k in model.attention_kernels():
        k.force_reference = False
    return results


TOLERANCES = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=2e-4, atol=2e-5)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind, position", COMBOS, ids=IDS)
def test_fast_path_matches_reference(kind, position, dtype):
    model = make_model(position, kind, dtype=dtype).train()  # dropout is 0: train mode, grads on
    for k in model.attention_kernels():
        k.path_counts.clear()
    x = torch.randint(0, V, (2, 40))
    (fast_out, fast_grads), (ref_out, ref_grads) = _fast_vs_reference(model, x)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(fast_out, ref_out, **tol)
    assert fast_grads.keys() == ref_grads.keys() and fast_grads
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], **tol, msg=name)
    # The fast path really ran (no silent fallback to the reference).
    for k in model.attention_kernels():
        assert sum(v for p, v in k.path_counts.items() if p != "reference") >= 1, k.path_counts


# ---- softmax specifics -------------------------------------------------------------------------


def test_softmax_masks_are_chunked_to_the_budget(monkeypatch):
    """At long lengths no L x S x H mask exists at once: queries are chunked to fit the budget."""
    model = make_model("alibi", "softmax", "model.attention.mask_budget_mb=1", "model.attention.fold_linear_bias=false",
                       dtype=torch.float32)
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
        for k in model.attention_kernels():
            k.force_reference = True
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
    model = make_model("alibi", "softmax", dtype=dtype).train()
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((attn_mask is None, is_causal, q.shape[-1]))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    x = torch.randint(0, V, (2, 1024))
    (fast, fast_grads), (ref, ref_grads) = _fast_vs_reference(model, x)
    assert calls and all(no_mask and causal and dim % 8 == 0 for no_mask, causal, dim in calls), calls
    assert all(k.path_counts["folded"] >= 1 for k in model.attention_kernels())
    torch.testing.assert_close(fast, ref, rtol=tol, atol=tol)
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=tol, atol=tol, msg=name)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on CPU, on purpose
@pytest.mark.parametrize("position", ["alibi", "none"])
def test_flex_forward_matches_reference_on_cpu(position):
    pytest.importorskip("torch.nn.attention.flex_attention")
    model = make_model(position, "softmax", "model.attention.backend=flex", dtype=torch.float32)
    x = torch.randint(0, V, (2, 32))
    with torch.no_grad():
        flex = model(x).logits_BLV
        for k in model.attention_kernels():
            k.force_reference = True
        ref = model(x).logits_BLV
    torch.testing.assert_close(flex, ref, rtol=1e-4, atol=1e-4)
    for k in model.attention_kernels():
        assert k.path_counts["flex"] >= 1


def test_flex_refuses_dropout():
    from lmtrain.config import ConfigError

    with pytest.raises(ConfigError, match="flex does not support dropout"):
        load_config(CONFIGS / "debug.yaml", ["model.attention.backend=flex", "model.dropout=0.1"])


@pytest.mark.parametrize("position", POSITION_KINDS)
def test_kv_cache_equals_full_recompute(position):
    model = make_model(position, "softmax")
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
    model = make_model("alibi")
    prompt = torch.randint(0, V, (1, 4))
    a = generate(model, prompt, 10, temperature=1.0, top_k=5, seed=3)
    b = generate(model, prompt, 10, temperature=1.0, top_k=5, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, generate(model, prompt, 10, temperature=1.0, top_k=5, seed=4))
    # top_k = 1 leaves only the most likely token: greedy, whatever the temperature and seed.
    greedy = generate(model, prompt, 10, temperature=0.0)
    assert torch.equal(generate(model, prompt, 10, temperature=5.0, top_k=1, seed=9), greedy)


def test_aux_structure_is_returned_empty():
    out = make_model("alibi")(torch.randint(0, V, (1, 8)))
    assert isinstance(out.aux, Aux) and out.aux.losses == {} and out.aux.total_loss() is None


def test_tied_embeddings_share_storage():
    model = make_model("alibi")
    assert model.head.weight is model.embed.weight
    untied = make_model("alibi", "softmax", "model.tie_embeddings=false")
    assert untied.head.weight is not untied.embed.weight


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    """Recomputing each layer in backward (dropout replayed from the saved RNG state) changes
    nothing but memory: same loss, same gradients."""
    results = []
    for enabled in (False, True):
        model = make_model("alibi", "softmax", "model.dropout=0.2").train()
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


def test_model_code_is_free_of_lightning_and_deepspeed():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "lmtrain" / "model"
    for path in root.rglob("*.py"):
        text = path.read_text()
        for banned in ("lightning", "deepspeed", "torch.distributed"):
            assert f"import {banned}" not in text and f"from {banned}" not in text, (path, banned)


def test_alibi_score_mod_is_one_function_that_follows_the_module():
    pos = build_position("alibi", d_model=32, n_heads=4, max_len=0, rope_theta=1e4)
    fn = pos.score_mod()
    assert pos.score_mod() is fn  # no new closure per call: no recompiles under torch.compile
    pos.to(torch.float64)
    score = fn(torch.tensor(0.0, dtype=torch.float64), 0, 1, torch.tensor(5), torch.tensor(2))
    assert score.dtype == torch.float64 and float(score) == pytest.approx(-3 * alibi_slopes(4)[1])
