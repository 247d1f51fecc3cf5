"""Distance-aware scores (issue 21): the learned position schemes exp_decay, gaussian,
kerple_log and rel_buckets, and the DA-Transformer kind `distance_aware`.

Each scheme's bias and the DA rescaling are checked against their paper formulas written out
per head and distance; fast paths against references in float64 at 1e-10, outputs and the
gradients of every parameter (the scheme's own included); exp_decay frozen at ALiBi's slopes
against ALiBi at 1e-12. Causality, batch-equals-one-by-one and KV-cache decoding run for every
kind in the pairwise property tests (test_axes.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmtrain.config import ConfigError
from lmtrain.model.positions import alibi_slopes, build_position, relative_buckets
from tests.helpers import V, call_kernel, fast_vs_reference, flex_vs_reference_logits, make_model, property_config

SCHEMES = ["exp_decay", "gaussian", "kerple_log", "rel_buckets"]


def randomise(module, seed: int = 0) -> None:
    """Every parameter of a scheme to positive random values (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 0.9 + 0.1)


def formula(pos, kind: str, h: int, d: int) -> float:
    """The paper's bias of head h at distance d >= 0, from the scheme's parameters."""
    pos = pos.requires_grad_(False)
    if kind == "exp_decay":
        return -alibi_slopes(len(pos.alibi))[h] * math.exp(float(pos.log_scale[h])) * d
    if kind == "gaussian":
        sigma = math.exp(float(pos.log_width[h]))
        return -d * d / (2 * sigma * sigma)
    if kind == "kerple_log":
        return -float(pos.p[h]) * math.log(1 + float(pos.a[h]) * d)
    return float(pos.table[h, t5_bucket(d, pos.cfg.buckets, pos.cfg.max_distance)])


def t5_bucket(d: int, buckets: int, max_distance: int) -> int:
    """T5's `_relative_position_bucket(-d, bidirectional=False)`, written out."""
    exact = buckets // 2
    if d < exact:
        return d
    return min(buckets - 1, exact + int(math.log(d / exact) / math.log(max_distance / exact) * (buckets - exact)))


@pytest.mark.parametrize("kind", SCHEMES)
def test_each_scheme_adds_its_papers_bias(kind):
    pos = build_position(kind, d_model=32, n_heads=4, seq_len=64).double()
    randomise(pos)
    q, k = torch.arange(60, 64), torch.arange(64)
    bias = pos.score_bias(q, k).detach()
    assert bias.shape == (4, 4, 64) and bias.dtype == torch.float64
    for h in range(4):
        for i, qi in enumerate(q.tolist()):
            for j in range(qi + 1):
                assert float(bias[h, i, j]) == pytest.approx(formula(pos, kind, h, qi - j), rel=1e-12, abs=1e-12)
    # Per-row query positions (ACT) give the rows' biases.
    rows = pos.score_bias(torch.stack([q, q - 3]), k).detach()
    assert rows.shape == (2, 4, 4, 64)
    torch.testing.assert_close(rows[0], bias, rtol=0, atol=0)


def test_t5_buckets_are_exact_then_log_spaced_then_one():
    d = torch.arange(0, 2000)
    b = relative_buckets(d, 32, 128)
    assert b.tolist() == [t5_bucket(x, 32, 128) for x in d.tolist()]
    assert b[:16].tolist() == list(range(16)) and int(b[16]) == 16 and int(b[32]) == 21 and int(b[64]) == 26
    assert (b[127:] == 31).all() and int(b[126]) == 31 and int(b[100]) < 31
    assert bool((b[1:] >= b[:-1]).all())
    assert relative_buckets(torch.tensor([-5]), 32, 128).tolist() == [0]  # future keys: bucket 0 (masked anyway)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("kind", SCHEMES)
def test_score_mod_equals_score_bias(kind):
    """The FlexAttention score_mod (GPU) adds the same bias as the CPU paths, element by element."""
    pos = build_position(kind, d_model=32, n_heads=4, seq_len=64).double()
    randomise(pos)
    pos.requires_grad_(False)
    fn = pos.score_mod()
    assert pos.score_mod() is fn  # one function per module: no recompiles
    bias = pos.score_bias(torch.arange(20), torch.arange(20)).detach()
    for h, i, j in [(0, 5, 2), (3, 19, 0), (2, 7, 7), (1, 19, 3)]:
        got = fn(torch.tensor(0.0, dtype=torch.float64), 0, torch.tensor(h), torch.tensor(i), torch.tensor(j))
        assert float(got) == pytest.approx(float(bias[h, i, j]), rel=1e-12, abs=1e-12)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("overrides", [*[[f"model.position={k}"] for k in SCHEMES],
                                       ["model.attention.kind=distance_aware", "model.position=none",
                                        "model.attention.init_w=-0.2", "model.attention.init_v=0.5"]],
                         ids=[*SCHEMES, "distance_aware"])
def test_flex_forward_matches_reference_on_cpu(overrides):
    pytest.importorskip("torch.nn.attention.flex_attention")
    model = make_model(*overrides, "model.attention.backend=flex", dtype=torch.float32)
    randomise(model.position)
    flex_vs_reference_logits(model, torch.randint(0, V, (2, 32)))
    if model.cfg.attention.kind == "distance_aware":  # one score_mod per kernel, as for the schemes: no recompiles
        kernel = model.attention_kernels()[0]
        assert kernel.score_mod() is kernel.score_mod()


CASES = [  # (overrides, the fast path that must run)
    (["model.position=exp_decay"], "folded"),
    (["model.position=exp_decay", "model.attention.fold_linear_bias=false", "model.attention.mask_budget_mb=1"],
     "sdpa"),
    (["model.position=gaussian"], "sdpa"),
    (["model.position=kerple_log"], "sdpa"),
    (["model.position=rel_buckets", "model.position.buckets=8", "model.position.max_distance=20"], "sdpa"),
    (["model.position=kerple_log", "model.attention.kind=adaptive_span", "model.attention.max_span=64",
      "model.attention.init_span=20", "model.attention.ramp=8", "model.attention.block=8"], "chunked"),
    (["model.position=rel_buckets", "model.attention.kind=sparse", "model.attention.block=8",
      "model.attention.window=16"], None),
    (["model.position=exp_decay", "data.document_mask=true"], "documents"),
    (["model.attention.kind=distance_aware", "model.position=none", "model.attention.init_w=-0.3",
      "model.attention.init_v=1.0", "model.attention.block=7"], "blocks"),
    (["model.attention.kind=distance_aware", "model.position=rope", "model.attention.init_w=0.2",
      "model.attention.init_v=-0.5"], "blocks"),
]


@pytest.mark.parametrize("overrides, path", CASES, ids=[f"{i}-{c[0][0].split('=')[1]}" for i, c in enumerate(CASES)])
def test_fast_path_equals_reference_in_float64(overrides, path):
    """Outputs and the gradients of every parameter (the scheme's or the kernel's own included)
    at 1e-10, on random trained-like values of those parameters."""
    model = make_model(*overrides, dtype=torch.float64, train=True)
    randomise(model.position)
    x = torch.randint(0, V, (2, 40))
    if model.document_mask:
        model.document_eot.fill_(3)
        x[:, ::9] = 3
    (fast, fast_grads), (ref, ref_grads) = fast_vs_reference(model, x)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    assert fast_grads.keys() == ref_grads.keys()
    own = [n for n in fast_grads if n.startswith("position.") or n.endswith((".w", ".v"))]
    assert own or model.cfg.position.kind == "rope", "the scheme's parameters get gradients"
    for n in own:
        assert fast_grads[n].abs().sum() > 0, n
    for n in fast_grads:
        torch.testing.assert_close(fast_grads[n], ref_grads[n], rtol=1e-10, atol=1e-10, msg=n)
    if path:
        for k in model.attention_kernels():
            assert k.path_counts[path] >= 1, k.path_counts


@pytest.mark.parametrize("extra", [[], ["model.attention.fold_linear_bias=false"]], ids=["folded", "mask"])
def test_exp_decay_at_alibis_slopes_is_alibi(extra):
    """Frozen (learn=false) and at initialisation (learned, not yet trained): ALiBi to 1e-12."""
    x = torch.randint(0, V, (2, 40))
    alibi = make_model("model.position=alibi", *extra)
    with torch.no_grad():
        want = alibi(x).logits_BLV
        for learn in ("false", "true"):
            model = make_model("model.position=exp_decay", f"model.position.learn={learn}", *extra)
            model.load_state_dict(alibi.state_dict(), strict=False)
            torch.testing.assert_close(model(x).logits_BLV, want, rtol=1e-12, atol=1e-12)
    frozen = make_model("model.position=exp_decay", "model.position.learn=false")
    assert not [n for n, _ in frozen.named_parameters() if n.startswith("position.")]


def test_gradients_reach_the_slopes_on_the_folded_path():
    model = make_model("model.position=exp_decay", dtype=torch.float32, train=True)
    x = torch.randint(0, V, (2, 40))
    F.cross_entropy(model(x).logits_BLV.flatten(0, 1), x.roll(-1, 1).flatten()).backward()
    assert model.position.log_scale.grad.abs().min() > 0
    assert all(k.path_counts["folded"] >= 1 for k in model.attention_kernels())


def test_kerple_keeps_p_and_a_positive_after_each_step():
    model = make_model("model.position=kerple_log", "model.position.eps=0.05", dtype=torch.float32)
    with torch.no_grad():
        model.position.p.fill_(-1.0)
        model.position.a[0] = 0.01
    model.after_optimizer_step()
    p, a = model.position.p.detach(), model.position.a.detach()
    assert float(p.min()) == pytest.approx(0.05) and float(a.min()) == pytest.approx(0.05)


def test_learned_position_biases_get_no_weight_decay():
    from lmtrain.train.optim import param_groups

    model = make_model("model.position=rel_buckets", dtype=torch.float32)
    decay, rest = param_groups(model, 0.1)
    assert model.position.table.dim() == 2
    assert all(p is not model.position.table for p in decay["params"])
    assert any(p is model.position.table for p in rest["params"])


def test_distance_aware_follows_the_paper_formula():
    """softmax(ReLU(q k^T) * Rhat / sqrt(D)), Rhat = (1 + e^v) / (1 + e^(v - w |i - j|)), the
    causal mask after the product, one head and query at a time; blocks and reference alike."""
    from lmtrain.model.attention import ATTENTION, build_attention

    cfg = ATTENTION.config("distance_aware", block=3)
    kernel = build_attention(cfg, d_model=16, n_heads=2, dropout=0.0).double()
    with torch.no_grad():
        kernel.w.copy_(torch.tensor([0.3, -0.4]))
        kernel.v.copy_(torch.tensor([-1.0, 2.0]))
    q, k, v = (torch.randn(1, 2, 10, 8, dtype=torch.float64) for _ in range(3))
    want = torch.zeros_like(q)
    for h in range(2):
        w_h, v_h = float(kernel.w[h].detach()), float(kernel.v[h].detach())
        for i in range(10):
            s = torch.tensor([max(0.0, float(q[0, h, i] @ k[0, h, j])) * (1 + math.exp(v_h))
                              / (1 + math.exp(v_h - w_h * abs(i - j))) / math.sqrt(8) for j in range(i + 1)],
                             dtype=torch.float64)
            want[0, h, i] = s.softmax(0) @ v[0, h, : i + 1]
    for reference in (False, True):
        torch.testing.assert_close(call_kernel(kernel, q, k, v, reference=reference), want, rtol=1e-12, atol=1e-12)
    assert kernel.path_counts["blocks"] == 1


def test_distance_aware_blocks_recompute_in_training_with_the_same_gradients():
    """More than one block with gradients on: each block is checkpointed; outputs and gradients
    equal the single-block computation."""
    from lmtrain.model.attention import ATTENTION, build_attention

    q, k, v = (torch.randn(2, 2, 33, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    results = []
    for block in (5, 0):
        kernel = build_attention(ATTENTION.config("distance_aware", block=block, init_w=0.1),
                                 d_model=16, n_heads=2, dropout=0.0).double()
        out = call_kernel(kernel, q, k, v)
        grads = torch.autograd.grad((out * out).sum(), (q, k, v, kernel.w, kernel.v))
        results.append((out, grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_distance_aware_refuses_additive_biases_with_the_reason():
    with pytest.raises(ConfigError, match="multiplies the scores by its own learned function of the distance"):
        property_config("model.attention.kind=distance_aware", "model.position=alibi")
    with pytest.raises(ConfigError, match="model.position.kind=kerple_log"):
        property_config("model.attention.kind=distance_aware", "model.position=kerple_log")


@pytest.mark.parametrize("bad, message", [
    ("model.position.buckets=1", "model.position.buckets: at least 2"),
    ("model.position.max_distance=8", "model.position.max_distance: must exceed buckets/2 = 16"),
])
def test_bucket_options_are_checked(bad, message):
    with pytest.raises(ConfigError, match=message):
        property_config("model.position=rel_buckets", bad)


def test_statistics_name_every_learned_value():
    model = make_model("model.position=kerple_log")
    stats, _ = model.head_stats()
    assert set(stats) == {"kerple_log.p", "kerple_log.a"} and stats["kerple_log.p"][0].shape == (4,)
    d = torch.tensor([0, 1, 4, 64])
    prof = model.distance_profiles(d)["kerple_log.bias"][0]
    assert prof.shape == (4, 4) and torch.equal(prof[:, 0], torch.zeros(4)) and bool((prof[:, 3] < prof[:, 1]).all())
    da = make_model("model.attention.kind=distance_aware", "model.position=none", "model.attention.init_w=-0.1")
    stats, _ = da.head_stats()
    assert set(stats) == {"da.w", "da.v"} and len(stats["da.w"]) == 2  # one row per layer
    rows = da.distance_profiles(d)["da.rescale"]
    assert len(rows) == 2 and torch.allclose(rows[0][:, 0], torch.ones(4)) and bool((rows[0][:, 3] < 0.01).all())
    buckets = make_model("model.position=rel_buckets").distance_profiles(d)
    assert buckets["rel_buckets.bias"][0].shape == (4, 4)
