"""Triton kernels for causal linear attention with a cumulative log-decay: the algorithm of
causal_linear.py::chunked fused on GPU, forward and backward.

Each program owns one (batch x head, block of BM features, block of BD value columns) and
walks the sequence in chunks of BT positions, keeping its BM x BD slice of the carried state
on chip. Products over the features (scores) and over the value columns (gradients of the
scores) are summed over blocks afterwards: the kernels write per-block partials, reduced in
PyTorch (M and D are small, so there are few blocks).

  forward:   num_i = sum_{j<=i} (q_i . k_j) e^{G_i - G_j} v_j,  den_i = the same with v_j = 1
  backward:  dq_i  = sum_{j<=i} e^{G_i - G_j} (do_i . v_j + dden_i) k_j        (forward walk)
             dk_j  = sum_{i>=j} e^{G_i - G_j} (do_i . v_j + dden_i) q_i        (reverse walk)
             dv_j  = sum_{i>=j} e^{G_i - G_j} (q_i . k_j) do_i                 (reverse walk)
             dG_m  = q_m . dq_m - k_m . dk_m   (each weight depends on G_i - G_j)

As in the PyTorch path every exponent is <= 0. Inputs are float32 (the kernelized kinds
compute their features in float32); `precision` is tl.dot's input precision (tf32 by default
on GPU, ieee for tests). With TRITON_INTERPRET=1 the same kernels run on CPU tensors
(tests/test_kernelized.py uses that to check them on machines without a GPU).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _fwd_kernel(Q, K, V, G, NUM, DEN, L, M, D, BH,
                BT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, HAS_G: tl.constexpr, PREC: tl.constexpr):
    im, idd = tl.program_id(0), tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)  # offsets below can pass 2^31 elements
    offs_t = tl.arange(0, BT)
    offs_m = im * BM + tl.arange(0, BM)
    offs_d = idd * BD + tl.arange(0, BD)
    mask_m, mask_d = offs_m < M, offs_d < D
    q_base, k_base, v_base, g_base = Q + bh * L * M, K + bh * L * M, V + bh * L * D, G + bh * L
    num_base = NUM + (im * BH + bh) * L * D
    den_base = DEN + (im * BH + bh) * L
    state = tl.zeros((BM, BD), dtype=tl.float32)
    zstate = tl.zeros((BM,), dtype=tl.float32)
    g_prev = 0.0
    if HAS_G:
        g_prev = tl.load(g_base).to(tl.float32)
    for t0 in range(0, L, BT):
        rows = t0 + offs_t
        mask_t = rows < L
        qk_mask = mask_t[:, None] & mask_m[None, :]
        q = tl.load(q_base + rows[:, None] * M + offs_m[None, :], mask=qk_mask, other=0.0)
        k = tl.load(k_base + rows[:, None] * M + offs_m[None, :], mask=qk_mask, other=0.0)
        v = tl.load(v_base + rows[:, None] * D + offs_d[None, :], mask=mask_t[:, None] & mask_d[None, :], other=0.0)
        causal = (offs_t[:, None] >= offs_t[None, :]) & mask_t[None, :]
        if HAS_G:
            g = tl.load(g_base + rows, mask=mask_t, other=0.0).to(tl.float32)
            g_last = tl.load(g_base + tl.minimum(t0 + BT, L) - 1).to(tl.float32)
            decay = tl.where(causal, tl.exp(tl.where(causal, g[:, None] - g[None, :], 0.0)), 0.0)
            qd = q * tl.exp(tl.where(mask_t, g - g_prev, 0.0))[:, None]
            kd = k * tl.exp(tl.where(mask_t, g_last - g, 0.0))[:, None]
            gamma = tl.exp(g_last - g_prev)
            g_prev = g_last
        else:
            decay = tl.where(causal, 1.0, 0.0)
            qd, kd, gamma = q, k, 1.0
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * decay  # BT x BT
        o = tl.dot(s, v, input_precision=PREC) + tl.dot(qd, state, input_precision=PREC)
        tl.store(num_base + rows[:, None] * D + offs_d[None, :], o, mask=mask_t[:, None] & mask_d[None, :])
        if idd == 0:
            z = tl.sum(s, axis=1) + tl.sum(qd * zstate[None, :], axis=1)
            tl.store(den_base + rows, z, mask=mask_t)
        state = state * gamma + tl.dot(tl.trans(kd), v, input_precision=PREC)
        zstate = zstate * gamma + tl.sum(kd, axis=0)


@triton.jit
def _bwd_dq_kernel(K, V, G, DO, DZ, DQ, L, M, D, BH,
                   BT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, HAS_G: tl.constexpr, PREC: tl.constexpr):
    """dq, forward walk; partial over the value-column blocks (the denominator's term in block 0)."""
    im, idd = tl.program_id(0), tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)  # offsets below can pass 2^31 elements
    offs_t = tl.arange(0, BT)
    offs_m = im * BM + tl.arange(0, BM)
    offs_d = idd * BD + tl.arange(0, BD)
    mask_m, mask_d = offs_m < M, offs_d < D
    k_base, v_base, g_base = K + bh * L * M, V + bh * L * D, G + bh * L
    do_base, dz_base = DO + bh * L * D, DZ + bh * L
    dq_base = DQ + (idd * BH + bh) * L * M
    state = tl.zeros((BM, BD), dtype=tl.float32)
    zstate = tl.zeros((BM,), dtype=tl.float32)
    g_prev = 0.0
    if HAS_G:
        g_prev = tl.load(g_base).to(tl.float32)
    for t0 in range(0, L, BT):
        rows = t0 + offs_t
        mask_t = rows < L
        vd_mask = mask_t[:, None] & mask_d[None, :]
        k = tl.load(k_base + rows[:, None] * M + offs_m[None, :], mask=mask_t[:, None] & mask_m[None, :], other=0.0)
        v = tl.load(v_base + rows[:, None] * D + offs_d[None, :], mask=vd_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * D + offs_d[None, :], mask=vd_mask, other=0.0)
        # The denominator's gradient enters once, in the programs of value-column block 0.
        dz = tl.where(idd == 0, tl.load(dz_base + rows, mask=mask_t, other=0.0), 0.0)
        causal = (offs_t[:, None] >= offs_t[None, :]) & mask_t[None, :]
        if HAS_G:
            g = tl.load(g_base + rows, mask=mask_t, other=0.0).to(tl.float32)
            g_last = tl.load(g_base + tl.minimum(t0 + BT, L) - 1).to(tl.float32)
            decay = tl.where(causal, tl.exp(tl.where(causal, g[:, None] - g[None, :], 0.0)), 0.0)
            qscale = tl.exp(tl.where(mask_t, g - g_prev, 0.0))
            kd = k * tl.exp(tl.where(mask_t, g_last - g, 0.0))[:, None]
            gamma = tl.exp(g_last - g_prev)
            g_prev = g_last
        else:
            decay = tl.where(causal, 1.0, 0.0)
            qscale = tl.where(mask_t, 1.0, 0.0)
            kd, gamma = k, 1.0
        dp = (tl.dot(do, tl.trans(v), input_precision=PREC) + dz[:, None]) * decay  # BT x BT
        inter = tl.dot(do, tl.trans(state), input_precision=PREC) + dz[:, None] * zstate[None, :]
        dq = tl.dot(dp, k, input_precision=PREC) + qscale[:, None] * inter
        tl.store(dq_base + rows[:, None] * M + offs_m[None, :], dq, mask=mask_t[:, None] & mask_m[None, :])
        state = state * gamma + tl.dot(tl.trans(kd), v, input_precision=PREC)
        zstate = zstate * gamma + tl.sum(kd, axis=0)


@triton.jit
def _bwd_dkv_kernel(Q, K, V, G, DO, DZ, DK, DV, L, M, D, BH,
                    BT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, HAS_G: tl.constexpr, PREC: tl.constexpr):
    """dk (partial over value-column blocks) and dv (partial over feature blocks), reverse walk.
    The carried state is R = sum over later positions i of e^{G_i - G_start} q_i do_i^T."""
    im, idd = tl.program_id(0), tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)  # offsets below can pass 2^31 elements
    offs_t = tl.arange(0, BT)
    offs_m = im * BM + tl.arange(0, BM)
    offs_d = idd * BD + tl.arange(0, BD)
    mask_m, mask_d = offs_m < M, offs_d < D
    q_base, k_base, v_base, g_base = Q + bh * L * M, K + bh * L * M, V + bh * L * D, G + bh * L
    do_base, dz_base = DO + bh * L * D, DZ + bh * L
    dk_base = DK + (idd * BH + bh) * L * M
    dv_base = DV + (im * BH + bh) * L * D
    state = tl.zeros((BM, BD), dtype=tl.float32)
    zstate = tl.zeros((BM,), dtype=tl.float32)
    g_next = 0.0
    if HAS_G:
        g_next = tl.load(g_base + L - 1).to(tl.float32)
    n_chunks = tl.cdiv(L, BT)
    for c in range(0, n_chunks):
        t0 = (n_chunks - 1 - c) * BT
        rows = t0 + offs_t
        mask_t = rows < L
        qk_mask = mask_t[:, None] & mask_m[None, :]
        vd_mask = mask_t[:, None] & mask_d[None, :]
        q = tl.load(q_base + rows[:, None] * M + offs_m[None, :], mask=qk_mask, other=0.0)
        k = tl.load(k_base + rows[:, None] * M + offs_m[None, :], mask=qk_mask, other=0.0)
        v = tl.load(v_base + rows[:, None] * D + offs_d[None, :], mask=vd_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * D + offs_d[None, :], mask=vd_mask, other=0.0)
        # The denominator's gradient enters once, in the programs of value-column block 0.
        dz = tl.where(idd == 0, tl.load(dz_base + rows, mask=mask_t, other=0.0), 0.0)
        causal = (offs_t[:, None] >= offs_t[None, :]) & mask_t[None, :] & mask_t[:, None]
        if HAS_G:
            g = tl.load(g_base + rows, mask=mask_t, other=0.0).to(tl.float32)
            g_start = tl.load(g_base + t0).to(tl.float32)
            decay = tl.where(causal, tl.exp(tl.where(causal, g[:, None] - g[None, :], 0.0)), 0.0)
            kscale = tl.exp(tl.where(mask_t, g_next - g, 0.0))
            qd = q * tl.exp(tl.where(mask_t, g - g_start, 0.0))[:, None]
            gamma = tl.exp(g_next - g_start)
            g_next = g_start
        else:
            decay = tl.where(causal, 1.0, 0.0)
            kscale = tl.where(mask_t, 1.0, 0.0)
            qd, gamma = q, 1.0
        # decay[i, j]: query i, key j of this chunk.
        dp = (tl.dot(do, tl.trans(v), input_precision=PREC) + dz[:, None]) * decay
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * decay
        dk = tl.dot(tl.trans(dp), q, input_precision=PREC)
        dk += kscale[:, None] * (tl.dot(v, tl.trans(state), input_precision=PREC) + zstate[None, :])
        dv = tl.dot(tl.trans(s), do, input_precision=PREC)
        dv += tl.dot(k * kscale[:, None], state, input_precision=PREC)
        tl.store(dk_base + rows[:, None] * M + offs_m[None, :], dk, mask=qk_mask)
        tl.store(dv_base + rows[:, None] * D + offs_d[None, :], dv, mask=vd_mask)
        state = state * gamma + tl.dot(tl.trans(qd), do, input_precision=PREC)
        zstate = zstate * gamma + tl.sum(qd * dz[:, None], axis=0)


def _blocks(chunk: int, M: int, D: int) -> tuple[int, int, int]:
    def pow2(n: int, lo: int = 16, hi: int = 64) -> int:
        return max(lo, min(hi, triton.next_power_of_2(n)))

    return pow2(chunk), pow2(M), pow2(D)


def _launch(BT: int) -> dict:
    """Warps and pipeline stages. One stage: the chunks depend on each other through the state
    anyway, and it keeps shared memory at 64-112 KB for 64 x 64 x 64 blocks (sm_90, fp32
    operands; two stages need up to 129 KB), within an A100's and an H100's limit."""
    return {"num_warps": 8 if BT >= 64 else 4, "num_stages": 1}


def _precision(x: Tensor) -> str:
    return os.environ.get("LMTRAIN_TRITON_PRECISION", "tf32" if x.is_cuda else "ieee")


class _CausalLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fq, fk, v, g, chunk: int):
        B, H, L, M = fq.shape
        D = v.shape[-1]
        BT, BM, BD = _blocks(chunk, M, D)
        nm, nd = triton.cdiv(M, BM), triton.cdiv(D, BD)
        has_g = g is not None
        fq, fk, v = fq.contiguous(), fk.contiguous(), v.contiguous()
        g_ = g.contiguous() if has_g else fq.new_zeros(B, H, L)
        num = fq.new_empty(nm, B, H, L, D)
        den = fq.new_empty(nm, B, H, L)
        prec = _precision(fq)
        _fwd_kernel[(nm, nd, B * H)](fq, fk, v, g_, num, den, L, M, D, B * H,
                                     BT=BT, BM=BM, BD=BD, HAS_G=has_g, PREC=prec, **_launch(BT))
        ctx.save_for_backward(fq, fk, v, g_)
        ctx.meta = (has_g, BT, BM, BD, prec)
        return num.sum(0), den.sum(0)

    @staticmethod
    def backward(ctx, dnum, dden):
        fq, fk, v, g = ctx.saved_tensors
        has_g, BT, BM, BD, prec = ctx.meta
        B, H, L, M = fq.shape
        D = v.shape[-1]
        nm, nd = triton.cdiv(M, BM), triton.cdiv(D, BD)
        do = dnum.contiguous() if dnum is not None else v.new_zeros(B, H, L, D)
        dz = dden.contiguous() if dden is not None else v.new_zeros(B, H, L)
        dq = fq.new_empty(nd, B, H, L, M)
        dk = fq.new_empty(nd, B, H, L, M)
        dv = fq.new_empty(nm, B, H, L, D)
        grid = (nm, nd, B * H)
        meta = dict(BT=BT, BM=BM, BD=BD, HAS_G=has_g, PREC=prec, **_launch(BT))
        _bwd_dq_kernel[grid](fk, v, g, do, dz, dq, L, M, D, B * H, **meta)
        _bwd_dkv_kernel[grid](fq, fk, v, g, do, dz, dk, dv, L, M, D, B * H, **meta)
        dq, dk, dv = dq.sum(0), dk.sum(0), dv.sum(0)
        dg = (fq * dq - fk * dk).sum(-1) if has_g and ctx.needs_input_grad[3] else None
        return dq, dk, dv, dg, None


def causal_linear_triton(fq_BHLM: Tensor, fk_BHLM: Tensor, v_BHLD: Tensor, g_BHL: Optional[Tensor], chunk: int
                         ) -> tuple[Tensor, Tensor]:
    """Numerator B H L D and denominator B H L, as causal_linear.chunked (float32 inputs)."""
    return _CausalLinear.apply(fq_BHLM, fk_BHLM, v_BHLD, g_BHL, chunk)


def compile_for(capability: int = 90, chunk: int = 64, M: int = 256, D: int = 64) -> dict[str, int]:
    """Compile every kernel ahead of time for a CUDA target (no GPU needed) with the blocks and
    launch options `causal_linear_triton` would use; returns each one's shared memory in bytes."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    BT, BM, BD = _blocks(chunk, M, D)
    shared = {}
    for kernel in (_fwd_kernel, _bwd_dq_kernel, _bwd_dkv_kernel):
        for has_g in (False, True):
            consts = dict(BT=BT, BM=BM, BD=BD, HAS_G=has_g, PREC="tf32")
            signature = {n: "i32" if n in ("L", "M", "D", "BH") else "*fp32" for n in kernel.arg_names
                         if n not in consts}
            signature.update({n: "constexpr" for n in consts})
            src = ASTSource(fn=kernel, signature=signature,
                            constexprs={(kernel.arg_names.index(n),): v for n, v in consts.items()})
            compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                                      options={**_launch(BT), "enable_fp_fusion": True})
            shared[f"{kernel.fn.__name__}{'_decay' if has_g else ''}"] = compiled.metadata.shared
    return shared
