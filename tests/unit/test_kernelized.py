"""Kernelized attention (performer, rfa, linear): the chunked causal computation against its
quadratic form, FAVOR+ against exact softmax, redraws, the Triton kernel (on GPU, and on CPU
through Triton's interpreter), memory, decoding and refusals. Exact resume across a redraw
and the benchmark are in tests/integration/test_kernelized.py.

Causality, batch-equals-one-by-one and fast-vs-reference (outputs and gradients) run for
these kinds in tests/unit/test_axes.py, which covers every registered kind."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lmtrain.config import ConfigError, load_config
from lmtrain.model.attention import ATTENTION, causal_linear
from lmtrain.model.attention.kernelized import RandomFeatures, draw_projection
from tests.helpers import CONFIGS, ROOT, call_kernel, saved_bytes
from tests.helpers import make_model as _make_model

KINDS = ["performer", "rfa", "linear"]
V = 97


def kernel(kind: str, heads: int = 2, head_dim: int = 16, **options):
    cls = ATTENTION.get(kind)
    return cls(cls.Config(kind=kind, **options), d_model=heads * head_dim, n_heads=heads, dropout=0.0)


def qkv(B=2, H=2, L=50, D=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g, dtype=dtype) for _ in range(3)]


def attend(k, q, key, v, path):
    if path not in ("reference", "fast"):
        k.cfg.backend = path
    return call_kernel(k, q, key, v, reference=path == "reference")


# ---- chunked == quadratic ----------------------------------------------------------------------


@pytest.mark.parametrize("segments", [False, True], ids=["one-segment", "segments"])
@pytest.mark.parametrize("chunk", [1, 7, 16, 50, 64], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("kind, options", [("performer", {}), ("rfa", {}), ("rfa", {"gate": True}), ("linear", {})],
                         ids=["performer", "rfa", "rfa-gate", "linear"])
def test_chunked_equals_quadratic_in_float64(kind, options, chunk, segments, monkeypatch):
    """L = 50: chunk sizes that divide it (1, 50) and that do not (7, 16, 64 > L). Outputs within
    1e-10; gradients of the inputs and of the kind's parameters within 1e-10 of their largest
    magnitude (RFA's signed denominator can be small, which scales its gradients up).
    `segments`: one chunk per segment, so the features' carries (FAVOR+'s running maximum,
    RFA's decay offset) and the state cross every segment boundary."""
    if segments:
        monkeypatch.setattr(causal_linear, "SEGMENT_ELEMENTS", 1)
    k = kernel(kind, chunk=chunk, **options).double()
    q, key, v = (t.requires_grad_() for t in qkv())
    results = []
    for path in ("chunked", "reference"):
        k.zero_grad()
        out = attend(k, q, key, v, path)
        grads = torch.autograd.grad((out * out.detach().cos()).sum(), [q, key, v, *k.parameters()])
        results.append((out, grads))
    (fast, fast_grads), (ref, ref_grads) = results
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(fast_grads, ref_grads):  # gradients: 1e-10 of their largest magnitude
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * float(b.abs().max()))
    assert k.path_counts["chunked"] == 1


def test_chunked_core_with_a_decay_equals_quadratic():
    """The shared computation itself, with a strong decay (G falls by up to 3 per position, so
    exp(-G) would overflow float64 within 250 positions if it were ever formed) and without,
    in one segment and in several."""
    g = torch.Generator().manual_seed(3)
    B, H, L, M, D = 2, 2, 300, 12, 8
    fq, fk = (torch.rand(B, H, L, M, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    G = -3 * torch.rand(B, H, L, generator=g, dtype=torch.float64).cumsum(-1)
    pos = torch.arange(L)
    for decay in (G, None):
        num_q, den_q = causal_linear.quadratic(fq, fk, v, decay, decay, pos[None, :] <= pos[:, None])
        # Long sequences run in segments of whole chunks with the state carried between them.
        for chunk, segment in ((13, None), (64, None), (13, 39), (16, 64)):
            num, den = causal_linear.chunked(fq, fk, v, decay, chunk, segment)
            assert torch.isfinite(num).all()
            torch.testing.assert_close(num, num_q, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(den, den_q, rtol=1e-10, atol=1e-12)


def test_stabilizer_keeps_large_exponents_finite():
    """Queries and keys 8x larger than usual: the exponents w . x - |x|^2 / 2 fall near -100,
    where float32's exp underflows to 0, and the unstabilised denominators are mostly 0.
    With the stabilisers the float32 output is finite and matches float64 within 1e-4."""
    from lmtrain.model.attention.performer import favor_features

    k = kernel("performer", features=64)
    q, key, v = qkv(dtype=torch.float32, L=40)
    q, key = 8 * q, 8 * key
    out32 = attend(k, q, key, v, "chunked")
    out64 = attend(k.double(), q.double(), key.double(), v.double(), "chunked")
    assert torch.isfinite(out32).all()
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-4)
    w = k.features.weight.float()
    _, den = causal_linear.chunked(favor_features(q, w).exp(), favor_features(key, w).exp(), v, None, 64)
    assert (den == 0).float().mean() > 0.5  # what the stabilisers prevent


# ---- FAVOR+ against exact softmax ------------------------------------------------------------


def test_favor_error_falls_as_features_grow():
    """The mean absolute error of causal FAVOR+ against exact causal softmax attention, over
    random inputs and 8 draws per m, falls with m from 16 to 256: every doubling lowers it,
    and 16x the features cut it by at least 2.5x (Monte Carlo theory: 4x in the error, which is
    O(m^-1/2))."""
    q, key, v = qkv(B=2, H=4, L=64, D=16, seed=5)
    q, key = 0.5 * q, 0.5 * key  # logits of order 1, as attention sees them after training starts
    exact = F.scaled_dot_product_attention(q, key, v, is_causal=True)
    errors = {}
    torch.manual_seed(0)  # the layers' feature seeds
    for m in (16, 32, 64, 128, 256):
        errs = []
        for draw in range(8):
            k = kernel("performer", heads=4, features=m).double()
            k.features.redraw(draw + 1)
            errs.append(float((attend(k, q, key, v, "chunked") - exact).abs().mean()))
        errors[m] = sum(errs) / len(errs)
    print("FAVOR+ mean absolute error by m:", {m: f"{e:.4f}" for m, e in errors.items()})
    ms = sorted(errors)
    assert all(errors[a] > errors[b] for a, b in zip(ms, ms[1:])), errors
    assert errors[16] / errors[256] >= 2.5, errors


def test_orthogonal_draws_are_orthogonal_with_gaussian_norms():
    w = draw_projection(48, 16, seed=1, draw=0).double()
    for block in (w[:16], w[16:32], w[32:]):
        unit = block / block.norm(dim=1, keepdim=True)
        torch.testing.assert_close(unit @ unit.T, torch.eye(16, dtype=torch.float64), atol=1e-6, rtol=0)
    assert not torch.allclose(w.norm(dim=1), w.norm(dim=1).mean().expand(48))  # chi-distributed, not equal


# ---- redraws ------------------------------------------------------------------------------------


def test_redraws_are_deterministic_and_follow_the_schedule():
    torch.manual_seed(0)
    a = RandomFeatures(32, 16, interval=3, orthogonal=True)
    torch.manual_seed(0)
    b = RandomFeatures(32, 16, interval=3, orthogonal=True)
    first = a.weight.clone()
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)
    for step in range(1, 8):
        a.step()
        b.step()
        assert int(a.draw) == step // 3
        assert torch.equal(a.weight, b.weight)
        assert torch.equal(a.weight, draw_projection(32, 16, int(a.seed), step // 3))
    assert not torch.equal(a.weight, first)
    other = RandomFeatures(32, 16, interval=3, orthogonal=True)  # another layer: another seed
    assert not torch.equal(other.weight, first)
    # The state travels with the state dict.
    c = RandomFeatures(32, 16, interval=3, orthogonal=True)
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.weight, a.weight) and int(c.steps) == 7
    c.step(), c.step()
    assert int(c.draw) == 3


# ---- Triton ---------------------------------------------------------------------------------------


def _triton_check(device: str, precision: str) -> str:
    """Triton against the chunked PyTorch path: outputs and input gradients, with and without a
    decay, at lengths and sizes that are not multiples of the blocks. Returns a report."""
    from lmtrain.model.attention.triton_linear import causal_linear_triton

    lines = []
    for gate in (False, True):
        for B, H, L, M, D, chunk in ((2, 2, 70, 40, 24, 32), (1, 3, 129, 64, 64, 64)):
            g = torch.Generator().manual_seed(L)
            fq, fk = (torch.rand(B, H, L, M, generator=g) for _ in range(2))
            v = torch.randn(B, H, L, D, generator=g)
            G = (-torch.rand(B, H, L, generator=g)).cumsum(-1) if gate else None
            ins = [t.to(device).requires_grad_() for t in (fq, fk, v, *([G] if gate else []))]
            results = []
            for fn in (causal_linear.chunked, causal_linear_triton):
                num, den = fn(*ins[:3], ins[3] if gate else None, chunk)
                loss = (num * num.detach().cos()).sum() + den.sqrt().sum()
                results.append([num, den, *torch.autograd.grad(loss, ins)])
            for name, a, b in zip(["num", "den", "dq", "dk", "dv", "dG"], *results):
                rel = float((a - b).abs().max() / b.abs().max())
                lines.append(f"gate={gate} L={L} {name}: max error / max {rel:.1e}")
                assert rel < (1e-4 if precision == "ieee" else 5e-3), lines[-1]
    return "\n".join(lines)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_triton_matches_chunked_on_gpu(precision, monkeypatch):
    monkeypatch.setenv("LMTRAIN_TRITON_PRECISION", precision)
    print(_triton_check("cuda", precision))


def test_triton_matches_chunked_in_the_interpreter():
    """The same kernels, run by Triton's interpreter on CPU tensors (in a fresh process: the
    interpreter is chosen when the kernels are defined)."""
    pytest.importorskip("triton")
    code = "from tests.unit.test_kernelized import _triton_check; print(_triton_check('cpu', 'ieee'))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("max error") == 22  # 5 results without a decay, 6 with, 2 shapes each


# ---- memory, decoding, refusals ----------------------------------------------------------------


def test_memory_is_linear_in_length():
    """What the chunked path keeps for backward grows as L (x 2.0 from L to 2L), never as L^2."""
    k = kernel("performer", heads=2, head_dim=32, features=64, chunk=64)
    sizes = {}
    for L in (512, 1024, 2048):
        q, key, v = (t.float().requires_grad_() for t in qkv(B=1, L=L, D=32))
        sizes[L] = saved_bytes(lambda q=q, key=key, v=v: attend(k, q, key, v, "chunked"))
    assert sizes[1024] / sizes[512] == pytest.approx(2.0, rel=0.05), sizes
    assert sizes[2048] / sizes[1024] == pytest.approx(2.0, rel=0.05), sizes
    # Versus the L x L scores alone at 2048 (2 heads, float32): 32 MB.
    assert sizes[2048] < 2 * 2048 * 2048 * 4, sizes


def make_model(kind: str, *extra: str, position: str = "rope"):
    return _make_model(f"model.attention.kind={kind}", f"model.position={position}", *extra)


@pytest.mark.parametrize("kind, extra", [("performer", ()), ("rfa", ("model.attention.gate=true",)), ("linear", ())],
                         ids=["performer", "rfa-gate", "linear"])
def test_kv_cache_decoding_equals_the_full_forward(kind, extra):
    from lmtrain.model.layer import KVCache

    model = make_model(kind, *extra)
    x = torch.randint(0, V, (2, 30))
    full = model(x).logits_BLV
    cache = KVCache()
    parts = [model(x[:, :17], cache=cache).logits_BLV]
    for t in range(17, 30):
        parts.append(model(x[:, t : t + 1], cache=cache).logits_BLV)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)
    assert all(k.path_counts["cache"] > 0 for k in model.attention_kernels())


@pytest.mark.parametrize("kind", KINDS)
def test_reversible_wiring_gives_the_gradients_of_plain_autograd(kind):
    from tests.unit.test_reversible import loss_and_grads, make

    extra = [f"model.attention.kind={kind}", "model.position=rope"]
    x = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(1))
    plain_loss, plain, _ = loss_and_grads(make("two_stream", *extra), x)
    rev_loss, rev, _ = loss_and_grads(make("reversible", *extra), x)
    assert torch.equal(plain_loss, rev_loss)
    for name in plain:
        torch.testing.assert_close(rev[name], plain[name], rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_additive_biases_are_refused_with_the_reason(kind):
    with pytest.raises(ConfigError, match=r"model.attention.kind=.*never forms the query-key scores.*without one "
                                          r"\(.*rope.*\)"):
        load_config(CONFIGS / "debug.yaml", [f"model.attention.kind={kind}", "model.position=alibi"])
    load_config(CONFIGS / "debug.yaml", [f"model.attention.kind={kind}", "model.position=rope"])


@pytest.mark.parametrize("override, key", [
    ("model.attention.features=0", "model.attention.features"),
    ("model.attention.chunk=0", "model.attention.chunk"),
    ("model.attention.redraw_interval=-1", "model.attention.redraw_interval"),
    ("model.attention.backend=cuda", "model.attention.backend"),
])
def test_bad_options_fail_at_load_time(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(CONFIGS / "debug.yaml", ["model.attention.kind=performer", "model.position=rope", override])


def test_parameter_count_matches_the_built_module():
    """RFA adds its learned scales (and gate), H x D (+ H x D + H) per layer; the random
    projections are buffers, not parameters."""
    base = sum(p.numel() for p in make_model("linear").parameters())
    assert sum(p.numel() for p in make_model("performer").parameters()) == base
    H, D, layers = 4, 8, 2
    assert sum(p.numel() for p in make_model("rfa").parameters()) == base + layers * H * D
    gated = make_model("rfa", "model.attention.gate=true")
    assert sum(p.numel() for p in gated.parameters()) == base + layers * (2 * H * D + H)


def test_flops_count_the_kernels_own_work():
    """Per token and layer: softmax 12 L d (PaLM); performer 3 H (4 M D + 2 C (M + D + 1) +
    4 M (D + 1)), which does not grow with L."""
    cfg = load_config(CONFIGS / "debug.yaml", ["model.attention.kind=performer", "model.position=rope",
                                               "model.d_model=256", "model.n_heads=4", "model.attention.features=256",
                                               "model.attention.chunk=64"]).model
    D, M, C, H = 64, 256, 64, 4
    expected = 3 * H * (4 * M * D + 2 * C * (M + D + 1) + 4 * M * (D + 1))
    assert ATTENTION.get("performer").attention_flops(cfg, 4096) == expected
    assert ATTENTION.get("performer").attention_flops(cfg, 32768) == expected
    assert ATTENTION.get("softmax").attention_flops(cfg, 4096) == 12 * 256 * 4096


def test_the_preset_and_its_control_differ_only_in_attention():
    from lmtrain.config import to_dict

    perf = to_dict(load_config(CONFIGS / "experiments" / "performer.yaml"))
    ctl = to_dict(load_config(CONFIGS / "experiments" / "performer_softmax.yaml"))
    assert perf["model"]["attention"]["kind"] == "performer" and ctl["model"]["attention"]["kind"] == "softmax"
    for cfg in (perf, ctl):
        cfg["model"].pop("attention")
        cfg["run"].pop("name")
    assert perf == ctl


def test_triton_kernels_compile_for_an_h100():
    """The kernels compile ahead of time for sm_90 (no GPU needed: Triton's own frontend and
    ptxas), which the interpreter alone would not prove, and fit an H100's shared memory."""
    pytest.importorskip("triton")
    from lmtrain.model.attention.triton_linear import compile_for

    for name, shared in compile_for(capability=90).items():
        assert shared <= 160 * 1024, (name, shared)


