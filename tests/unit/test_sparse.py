"""Structured sparse attention: the gathered path equals the dense masked reference for every
pattern and score scheme (outputs and gradients), layouts are exact, the blocks computed are
the non-zero blocks, causality holds (and its test catches a leak), BigBird's random blocks
come from the state dict, and bad options fail at load time. Model-level causality, batching
and fast = reference for every kind run in tests/unit/test_axes.py."""

from __future__ import annotations

import pytest
import torch

from lmtrain.config import ConfigError
from lmtrain.model.attention import AttentionInputs, reference_paths
from lmtrain.model.attention.patterns import PATTERNS
from lmtrain.model.attention.sparse import SparseAttention, SparseConfig, SparsePlan
from lmtrain.model.outputs import Aux
from lmtrain.model.positions import build_position
from tests.helpers import make_model, property_config

H, D = 4, 8
# Each pattern with small options, so that short sequences cross many blocks of 4.
CASES = {
    "window": dict(window=5),
    "dilated": dict(window=3, dilation=3),
    "strided": dict(stride=5),
    "fixed": dict(stride=6, summary=2),
    "block_shift": dict(shifts=[0, 1, 2, 3]),
    "globals": dict(global_first=2, global_every=7),
    "bigbird": dict(window=4, random_blocks=2, global_blocks=1),
    "window|strided": dict(window=3, stride=4),  # head groups
    "window+globals": dict(window=3, global_every=5),  # a union
}


def kernel(spec: str, dtype=torch.float64, layer: int = 1, **options) -> SparseAttention:
    cfg = SparseConfig(pattern=spec, **{"block": 4, **CASES.get(spec, {}), **options})
    return SparseAttention(cfg, d_model=H * D, n_heads=H, dropout=0.0, layer=layer).to(dtype)


def run(k: SparseAttention, L: int, position: str = "none", dtype=torch.float64, q_pos=None, k_pos=None,
        global_mask=None, B: int = 2, seed: int = 0):
    """Output and input gradients of the fast path, then of the reference."""
    g = torch.Generator().manual_seed(seed)
    S = L if k_pos is None else len(k_pos)
    Lq = L if q_pos is None else q_pos.shape[-1]
    q = torch.randn(B, H, Lq, D, generator=g, dtype=dtype, requires_grad=True)
    kk, v = (torch.randn(B, H, S, D, generator=g, dtype=dtype, requires_grad=True) for _ in range(2))
    pos = build_position(position, d_model=H * D, n_heads=H, seq_len=4 * S).to(dtype)
    inp = AttentionInputs(position=pos, q_pos=torch.arange(L) if q_pos is None else q_pos,
                          k_pos=torch.arange(S) if k_pos is None else k_pos, aux=Aux(), global_mask=global_mask)
    out = []
    for reference in (False, True):
        with reference_paths(reference):
            o = k(q, kk, v, inp)
        w = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
        out.append((o, *torch.autograd.grad((o * w).sum(), (q, kk, v))))
    return out


@pytest.mark.parametrize("position", ["none", "alibi"])
@pytest.mark.parametrize("spec", list(CASES))
def test_gathered_equals_the_dense_reference_in_float64(spec, position):
    k = kernel(spec, backend="gathered")
    for L in (37, 40):  # a partial last block, and whole blocks
        fast, ref = run(k, L, position)
        for a, b in zip(fast, ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert k.path_counts["gathered"] == 2


@pytest.mark.parametrize("pieces", ["one", "per-chunk"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, None)], ids=["f64", "f32"])
@pytest.mark.parametrize("position", ["none", "alibi"])
def test_band_equals_the_dense_reference(position, dtype, tol, pieces, monkeypatch):
    """One window for every head: flash calls per chunk of W, merged by log-sum-exp, in pieces."""
    from lmtrain.model.attention import band

    if pieces == "per-chunk":
        monkeypatch.setattr(band, "PIECE_BYTES", 1)
    for W, L in [(5, 37), (8, 40), (2, 9), (64, 40), (7, 7)]:
        k = kernel("window", dtype=dtype, window=W)
        fast, ref = run(k, L, position, dtype=dtype)
        t = k.tolerances[dtype]
        for a, b in zip(fast, ref):
            torch.testing.assert_close(a, b, rtol=tol or t.rtol, atol=tol or t.atol)
        assert k.path_counts["band"] == 1, (W, L)


def test_float32_within_the_declared_tolerance():
    for spec in CASES:
        k = kernel(spec, dtype=torch.float32, backend="gathered")
        tol = k.tolerances[torch.float32]
        fast, ref = run(k, 45, "alibi", dtype=torch.float32)
        for a, b in zip(fast, ref):
            torch.testing.assert_close(a, b, rtol=tol.rtol, atol=tol.atol)


def dense_block_layout(plan: SparsePlan, L: int, T: int) -> torch.Tensor:
    """H' x nb x nb: the block-wise OR of the dense rule (causal)."""
    pos = torch.arange(L)
    plan.prepare(L - 1, "cpu")
    vis = plan.visible(pos[:, None], pos[None, :], plan.head_index("cpu")[:, None, None])
    vis = torch.broadcast_to(vis, (plan.heads, L, L))
    nb = L // T
    return vis.reshape(plan.heads, nb, T, nb, T).any(-1).any(-2)


@pytest.mark.parametrize("spec", list(CASES))
def test_layouts_are_exact(spec):
    """The interval arithmetic marks exactly the blocks the dense rule reaches, for several
    option values and offsets of the first position."""
    rng = torch.Generator().manual_seed(0)
    for trial in range(6):
        T = [2, 4, 8][trial % 3]
        opts = dict(CASES[spec])
        for key in ("window", "stride", "dilation"):
            if key in opts:
                opts[key] = int(torch.randint(1, 11, (1,), generator=rng))
        if "summary" in opts:
            opts["summary"] = int(torch.randint(1, opts["stride"] + 1, (1,), generator=rng))
        cfg = SparseConfig(pattern=spec, block=T, **opts)
        plan = SparsePlan(cfg, n_heads=H, layer=trial, seed=trial)
        L = 12 * T
        idx = torch.arange(L // T)
        plan.prepare(L - 1, "cpu")
        torch.testing.assert_close(plan.layout(idx, idx, 0), dense_block_layout(plan, L, T))


def window_blocks(L: int, T: int, W: int) -> int:
    """Key blocks a window of W needs, summed over the query blocks (L a multiple of T)."""
    reach = 1 + (W + T - 2) // T  # key blocks kb <= qb with (qb - kb) T - (T - 1) < W
    return sum(min(qb + 1, reach) for qb in range(L // T))


@pytest.mark.parametrize("W, T", [(5, 4), (8, 4), (1, 4), (64, 16)])
def test_the_blocks_computed_are_the_non_zero_blocks(W, T):
    L = 16 * T
    k = kernel("window", window=W, block=T, backend="gathered")
    run(k, L)
    assert k.computed_blocks == window_blocks(L, T, W)
    assert k.computed_blocks == int(dense_block_layout(k.plan, L, T).sum())
    # Per-head shifts: one key block per query block and head.
    k = kernel("block_shift", block=T)
    run(k, L)
    assert k.computed_blocks == L // T
    for spec in ("dilated", "fixed", "bigbird"):  # the same count in every head
        k = kernel(spec, block=T, backend="gathered")
        run(k, L)
        assert k.computed_blocks * k.plan.heads == int(dense_block_layout(k.plan, L, T).sum()), spec


def causality_violations(k: SparseAttention, L: int = 24) -> int:
    """How many (query i, key j > i) pairs let the output at i depend on the inputs at j."""
    q, kk, v = (torch.randn(1, H, L, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pos = torch.arange(L)
    inp = AttentionInputs(position=build_position("none", d_model=H * D, n_heads=H, seq_len=L), q_pos=pos,
                          k_pos=pos, aux=Aux())
    out = k(q, kk, v, inp)
    bad = 0
    for i in range(L):
        grads = torch.autograd.grad(out[:, :, i].sum(), (q, kk, v), retain_graph=True)
        bad += sum(int((g[:, :, i + 1:].abs() > 0).any()) for g in grads)
    return bad


def test_causality_holds_and_a_leaky_pattern_is_caught(monkeypatch):
    for spec in CASES:
        assert causality_violations(kernel(spec)) == 0, spec
    assert causality_violations(kernel("window", backend="gathered")) == 0
    # A pattern that lets a query read the next key (an ETC summary token done wrong), with the
    # engine's causal guard removed: the test above must see it.
    original = SparsePlan.visible

    def leaky(self, i, j, h, tq=None, tk=None):
        return original(self, i, j, h, tq, tk) | (j == i + 1)

    monkeypatch.setattr(SparsePlan, "visible", leaky)
    assert causality_violations(kernel("window", backend="gathered")) > 0


def test_bigbird_random_blocks_come_from_the_state_dict():
    torch.manual_seed(0)
    a = kernel("bigbird")
    torch.manual_seed(1)
    b = kernel("bigbird")
    L, T = 64, 4
    la, lb = (dense_block_layout(k.plan, L, T) for k in (a, b))
    assert not torch.equal(la, lb)  # another seed, other random blocks
    b.load_state_dict(a.state_dict())
    assert torch.equal(dense_block_layout(b.plan, L, T), la)
    # A block's draw does not depend on the length, and layers draw differently.
    assert torch.equal(dense_block_layout(a.plan, 2 * L, T)[:, : L // T, : L // T], la)
    c = kernel("bigbird", layer=2)
    c.load_state_dict(a.state_dict())
    assert not torch.equal(dense_block_layout(c.plan, L, T), la)
    # r random blocks per query block and head, where r earlier candidates exist.
    plan = a.plan
    plan.prepare(L - 1, "cpu")
    table = plan.groups[0].patterns[0].tables["cpu"]
    assert (table.sum(-1)[:, -4:] == 2).all()


def test_token_id_globals_follow_the_mask():
    """Global tokens chosen per batch row (e.g. EOS): fast = reference, and a global query reads
    its whole prefix."""
    k = kernel("window+globals", global_every=0, global_first=0, global_token_ids=[3], window=2)
    assert not k.caps.kv_cache  # the cache keeps no flags: generation recomputes
    L = 30
    flags = torch.zeros(2, L, dtype=torch.bool)
    flags[0, [5, 17]] = True
    flags[1, [9]] = True
    fast, ref = run(k, L, global_mask=flags)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # The gradient of query 17's output (row 0, a global) reaches key 0; query 16's does not.
    q, kk, v = (torch.randn(2, H, L, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pos = torch.arange(L)
    inp = AttentionInputs(position=build_position("none", d_model=H * D, n_heads=H, seq_len=L), q_pos=pos,
                          k_pos=pos, aux=Aux(), global_mask=flags)
    out = k(q, kk, v, inp)
    g17 = torch.autograd.grad(out[0, :, 17].sum(), v, retain_graph=True)[0]
    g16 = torch.autograd.grad(out[0, :, 16].sum(), v)[0]
    assert g17[0, :, 0].abs().sum() > 0 and g16[0, :, 0].abs().sum() == 0


def test_decoding_and_per_row_queries_take_the_masked_path():
    for spec in ("window", "bigbird", "window|strided"):
        k = kernel(spec)
        S = 33
        fast, ref = run(k, 3, "alibi", q_pos=torch.arange(30, 33), k_pos=torch.arange(S))  # a KV cache
        for a, b in zip(fast, ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        rows = torch.tensor([[2, 9, 20], [0, 31, 32]])  # ACT: other positions in each row
        fast, ref = run(k, 32, q_pos=rows, k_pos=torch.arange(S))
        for a, b in zip(fast, ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        assert k.path_counts["masked"] == 2


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on CPU, on purpose
@pytest.mark.parametrize("spec", ["window", "bigbird", "window|strided"])
def test_flex_forward_matches_the_reference_on_cpu(spec):
    pytest.importorskip("torch.nn.attention.flex_attention")
    k = kernel(spec, dtype=torch.float32, backend="flex")
    q, kk, v = (torch.randn(1, H, 40, D) for _ in range(3))
    pos = torch.arange(40)
    inp = AttentionInputs(position=build_position("alibi", d_model=H * D, n_heads=H, seq_len=40), q_pos=pos,
                          k_pos=pos, aux=Aux())
    with torch.no_grad():
        flex = k(q, kk, v, inp)
        with reference_paths():
            ref = k(q, kk, v, inp)
    torch.testing.assert_close(flex, ref, rtol=1e-4, atol=1e-4)
    assert k.path_counts["flex"] == 1


def test_patterns_may_differ_by_layer():
    model = make_model("model.attention.kind=sparse", "model.attention.block=4", "model.attention.window=3",
                       "model.attention.global_every=8", "model.attention.layer_patterns=[window,window+globals]")
    specs = [k.plan.groups[0].patterns for k in model.attention_kernels()]
    assert [tuple(p.name for p in s) for s in specs] == [("window",), ("window", "globals")][: len(specs)]


@pytest.mark.parametrize("override, needle", [
    ("model.attention.pattern=windw", "unknown pattern 'windw'"),
    ("model.attention.pattern=window|strided|fixed", "do not divide model.n_heads"),
    ("model.attention.pattern=fixed model.attention.summary=9 model.attention.stride=4", "summary=9"),
    ("model.attention.global_token_ids=[2]", "no pattern uses globals"),
    ("model.attention.pattern=globals", "has no global tokens"),
    ("model.attention.pattern=block_shift model.attention.shifts=[]", "shifts is empty"),
    ("model.attention.block=0", "block=0"),
])
def test_bad_options_fail_at_load_time_with_one_line(override, needle):
    with pytest.raises(ConfigError) as err:
        property_config("model.attention.kind=sparse", *override.split())
    assert needle in str(err.value) and "\n" not in str(err.value).strip()


def test_every_pattern_is_tested_here():
    assert set(PATTERNS) <= {p for spec in CASES for p in spec.replace("|", "+").split("+")}


def test_density_per_layer_and_head_is_reported_as_a_head_statistic():
    model = make_model("model.attention.kind=sparse", "model.attention.block=4", "model.attention.window=3",
                       "model.attention.layer_patterns=[window,window|bigbird]")
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 40)))
    stats, limits = model.head_stats()
    L, W = 40, 3
    window = (L * W - W * (W - 1) / 2) / (L * (L + 1) / 2)
    assert limits["density"] == 1.0
    assert stats["density"][0].tolist() == pytest.approx([window] * 4)
    second = stats["density"][1].tolist()  # half the heads a window, half bigbird (denser)
    assert second[:2] == pytest.approx([window] * 2) and min(second[2:]) > window


def test_attention_flops_count_the_keys_a_query_reads():
    from lmtrain.model.attention.sparse import SparseAttention

    m = property_config("model.attention.kind=sparse", "model.attention.window=64", "model.attention.block=16").model
    L, nb = 1024, 64
    keys = sum(min(qb + 1, 1 + (64 + 14) // 16) for qb in range(nb)) * 16 / nb  # the window's blocks
    assert SparseAttention.attention_flops(m, L) == pytest.approx(12 * m.d_model * 2 * keys)  # softmax's halves
    wide = property_config("model.attention.kind=sparse", "model.attention.window=4096").model
    assert SparseAttention.attention_flops(wide, L) == pytest.approx(12 * wide.d_model * L)  # softmax's count


@pytest.mark.parametrize("spec, bounded", [
    ("window", True), ("dilated", True), ("fixed", True), ("block_shift", True), ("window+globals", True),
    ("window|fixed", True), ("bigbird", False), ("strided", False)])
def test_the_kv_cache_keeps_what_later_queries_see_and_stays_bounded(spec, bounded):
    """Cached generation equals a full recompute, and a bounded pattern's cache holds at most
    what its queries can see (the last W keys plus the global ones), whatever the length."""
    from lmtrain.generate import generate
    from lmtrain.model.layer import KVCache

    opts = ["model.attention.kind=sparse", f"model.attention.pattern={spec}", "model.attention.block=4",
            "model.attention.window=6", "model.attention.dilation=2", "model.attention.stride=8",
            "model.attention.summary=2", "model.attention.global_first=3", "model.attention.random_blocks=1",
            "model.attention.shifts=[0,1]", "model.position.kind=alibi"]
    model = make_model(*opts)
    for k in model.attention_kernels():
        assert k.caps.kv_cache
    prompt = torch.randint(1, 97, (2, 5))
    cached = generate(model, prompt, 40, temperature=0.0)
    assert torch.equal(cached, generate(model, prompt, 40, temperature=0.0, use_cache=False))
    # The cache after 45 positions, and how much of it a pattern needs.
    cache = KVCache()
    seq = cached[:, :45]
    model(seq[:, :5], cache=cache)
    for t in range(5, 45):
        model(seq[:, t : t + 1], cache=cache)
    per_layer = {k: int(pos.shape[0]) for k, (_, _, pos) in cache.entries.items()}
    if not bounded:
        assert set(per_layer.values()) == {45}
        return
    plan = model.attention_kernels()[0].plan
    need = int(plan.keeps(torch.arange(45), 45).sum()) + 1  # the last call's key stays too
    assert max(per_layer.values()) <= need < 45
    if spec == "window":  # W - 1 keys wait for the next query, whose own key makes W
        assert set(per_layer.values()) == {5}


MERGED = {  # unions with a window of W in every head group: the band plus the blocks beyond it
    "bigbird": dict(window=8, random_blocks=2, global_blocks=2),
    "window+globals": dict(window=8, global_first=3, global_every=7),
    "window|bigbird": dict(window=8, random_blocks=1),
    "window+fixed": dict(window=8, stride=6, summary=2),
}


@pytest.mark.parametrize("position", ["none", "alibi"])
@pytest.mark.parametrize("spec", list(MERGED))
def test_merged_equals_the_dense_reference(spec, position):
    """The window on the band, the blocks beyond it gathered, merged by log-sum-exp: outputs and
    every gradient equal the reference in float64, and float32 within the tolerance."""
    k = kernel(spec, backend="merged", **MERGED[spec])
    for L in (37, 64):  # padded to a multiple of W, and whole chunks
        fast, ref = run(k, L, position)
        for a, b in zip(fast, ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert k.path_counts["merged"] == 2
    k32 = kernel(spec, dtype=torch.float32, backend="merged", **MERGED[spec])
    tol = SparseAttention.tolerances[torch.float32]
    for a, b in zip(*run(k32, 64, position, dtype=torch.float32)):
        torch.testing.assert_close(a, b, rtol=tol.rtol, atol=tol.atol)
    auto = kernel(spec, **MERGED[spec])
    run(auto, 64, position)
    assert auto.path_counts["merged"] == 1  # what auto picks on CPU


@pytest.mark.parametrize("spec", ["window", *MERGED])
def test_band_and_merged_compute_exactly_the_blocks_they_need(spec):
    """The band computes exactly the window's non-zero blocks; the merged path adds, per query
    block, the blocks holding a visible key beyond the window (the most any head needs), from
    the dense rule."""
    T, L, W = 4, 64, 8
    k = kernel(spec, **{"window": W, **MERGED.get(spec, {})})
    run(k, L)
    assert k.path_counts["band" if spec == "window" else "merged"] == 1
    beyond = 0
    if spec != "window":
        pos = torch.arange(L)
        h = k.plan.head_index("cpu")[:, None, None]
        vis = k.plan.visible(pos[:, None], pos[None, :], h) & (pos[:, None] - pos[None, :] >= W)
        blocks = vis.reshape(k.plan.heads, L // T, T, L // T, T).any(4).any(2)  # H' x QB x KB
        beyond = int(blocks.sum(-1).amax(0).sum())
        assert beyond > 0
    assert k.computed_blocks == window_blocks(L, T, W) + beyond
