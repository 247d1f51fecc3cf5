"""What the kernelized kinds (performer, rfa, linear) share: the interface to causal linear
attention, its paths, and random features that are redrawn on a schedule.

A kind supplies `feature_maps(q, k)`: query and key features, and optionally a cumulative
log-decay (see causal_linear.py). This class turns them into attention:

  * triton    - the fused chunked kernel (CUDA, fp32/bf16/fp16), forward and backward;
  * chunked   - lmtrain/model/attention/causal_linear.py::chunked (CPU, and float64);
  * cache     - decoding with a KV cache (new queries against all cached keys): the masked
                quadratic form, O(L x S) for the L new positions;
  * reference - the masked quadratic form over the whole sequence, in at least float32.

Additive score biases (ALiBi) have no meaning here: scores are never formed, so the kinds
refuse them at config time. Attention dropout does not apply either (no probabilities are
formed); the model's residual dropout still does.

Random features (performer, rfa) are a buffer drawn from a seeded generator: draw t of a
layer is a pure function of (the layer's seed, t), and the buffers (features, seed, draw
index, optimizer steps seen) are in the state dict, so a checkpoint resumes with the exact
features and redraws at the same steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lmtrain.model.attention import causal_linear
from lmtrain.model.attention.base import AttentionConfig, AttentionKernel, Capabilities
from lmtrain.model.attention.paths import triton_applies


@dataclass
class KernelizedConfig(AttentionConfig):
    chunk: int = 64  # positions per chunk: quadratic inside, carried state between
    # auto: triton on CUDA for fp32/bf16/fp16 when Triton is installed, else chunked.
    backend: str = "auto"


class KernelizedAttention(AttentionKernel):
    caps = Capabilities(score_bias=False, kv_cache=True, head_shards=True)
    refusals = {"score_bias": "kernelized attention never forms the query-key scores a bias would be added to"}
    backends = ("chunked", "triton")
    signed_features = False  # features may be negative (RFA's sin/cos): guard the denominator's sign

    cfg: KernelizedConfig

    @classmethod
    def check(cls, a) -> list[str]:
        reasons = super().check(a)
        cfg = a.model.attention
        if cfg.chunk < 1:
            reasons.append(f"model.attention.chunk={cfg.chunk}: must be at least 1")
        return reasons

    @classmethod
    def feature_count(cls, model) -> int:
        """M, the features per head."""
        return model.d_model // model.n_heads

    @property
    def n_features(self) -> int:
        return self.head_dim

    @classmethod
    def projection_flops(cls, model) -> float:
        """Forward FLOPs per token and head of the feature maps of one query and one key."""
        return 0.0

    @classmethod
    def attention_flops(cls, model, seq_len: int) -> float:
        """Per token and head, forward: the features, the chunk's C x C block of scores over M
        features and its values (D + 1 columns with the denominator), and reading and updating
        the carried M x (D + 1) state; training is 3x that."""
        D, M = model.d_model // model.n_heads, cls.feature_count(model)
        C = min(model.attention.chunk, seq_len)
        forward = cls.projection_flops(model) + 2 * C * (M + D + 1) + 4 * M * (D + 1)
        return 3.0 * model.n_heads * forward

    def feature_maps(self, q_BHLD: Tensor, k_BHSD: Tensor, carry=None):
        """Query features B H L M, key features B H S M, the cumulative log-decay of the keys
        B H S (or None), and what the next segment of the same sequence needs to continue
        (running maxima, decay offsets; None when nothing). `carry` is that of the previous
        segment, None at the start of the sequence. Inputs are at least float32."""
        raise NotImplementedError

    def _divide(self, num_BHLD: Tensor, den_BHL: Tensor) -> Tensor:
        if self.signed_features:
            # Random Fourier features can make the estimate of sum_j w_ij tiny or negative.
            eps = self.cfg.eps
            den_BHL = torch.where(den_BHL.abs() < eps, torch.where(den_BHL < 0, -eps, eps), den_BHL)
        else:
            # Positive features: only an underflow to exactly 0 needs a guard.
            den_BHL = den_BHL.clamp_min(torch.finfo(den_BHL.dtype).tiny)
        return num_BHLD / den_BHL[..., None]

    def _attend(self, path: str, q_BHLD, k_BHSD, v_BHSD, q_pos_L, k_pos_S) -> Tensor:
        """Numerator / denominator through `path`, in at least float32, cast back."""
        dtype = q_BHLD.dtype
        work = torch.promote_types(dtype, torch.float32)
        q, k, v = (t.to(work) for t in (q_BHLD, k_BHSD, v_BHSD))
        if path == "chunked":
            return self._divide(*self._chunked(q, k, v)).to(dtype)
        fq, fk, g_S, _ = self.feature_maps(q, k)
        if path == "triton":
            from lmtrain.model.attention.triton_linear import causal_linear_triton

            num, den = causal_linear_triton(fq, fk, v, g_S, self.cfg.chunk)
        else:  # reference, cache
            # Queries are the last L of the S key positions (aligned in training, after the
            # cached ones in decoding): their decay is the keys' at the same positions.
            L, S = q.shape[2], k.shape[2]
            g_L = None if g_S is None else g_S[..., S - L:]
            visible_LS = k_pos_S <= q_pos_L[:, None]
            num, den = causal_linear.quadratic(fq, fk, v, g_L, g_S, visible_LS)
        return self._divide(num, den).to(dtype)

    def _chunked(self, q_BHLD, k_BHLD, v_BHLD) -> tuple[Tensor, Tensor]:
        """The CPU path, segment by segment: features too are computed per segment, so every
        operation's working set stays in cache and time grows linearly with L."""
        B, H, L, D = q_BHLD.shape
        C = min(self.cfg.chunk, L)
        seg = causal_linear.segment_length(B, H, self.n_features, D, C)
        # split, not slices: backward assembles each input's gradient once.
        pieces = [t.split(seg, dim=2) for t in (q_BHLD, k_BHLD, causal_linear.with_ones(v_BHLD))]
        carry = state = g_prev = None
        outs = []
        for q, k, v in zip(*pieces):
            fq, fk, g, carry = self.feature_maps(q, k, carry)
            out, state, g_prev = causal_linear.segment_forward(fq, fk, v, g, C, state, g_prev)
            outs.append(out)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return out[..., :-1], out[..., -1]

    def route(self, q_BHLD, k_BHSD, inp) -> str:
        if not inp.aligned:
            return "cache"  # new queries against all cached keys: the masked quadratic form
        return super().route(q_BHLD, k_BHSD, inp)

    def auto_backend(self, q_BHLD, k_BHSD, inp) -> str:
        return "triton" if triton_applies(q_BHLD) else "chunked"

    def fast(self, path, q_BHLD, k_BHSD, v_BHSD, inp):
        return self._attend(path, q_BHLD, k_BHSD, v_BHSD, inp.q_pos, inp.k_pos)

    def reference(self, q_BHLD, k_BHSD, v_BHSD, inp):
        return self._attend("reference", q_BHLD, k_BHSD, v_BHSD, inp.q_pos, inp.k_pos)


# -- random features ---------------------------------------------------------------------------


def draw_projection(m: int, d: int, seed: int, draw: int, orthogonal: bool = True) -> Tensor:
    """Draw `draw` of an M x D Gaussian projection, a pure function of (seed, draw), float32.

    Orthogonal (Performer's ORF): blocks of D rows that are orthonormal (QR of a Gaussian
    matrix, signs fixed so that the draw is Haar), each row rescaled by the norm of an
    independent Gaussian D-vector so that every row is marginally N(0, I_D)."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + draw) % (2**63 - 1))
    f64 = dict(generator=gen, dtype=torch.float64, device="cpu")
    if not orthogonal:
        return torch.randn(m, d, **f64).float()
    blocks = []
    for _ in range(math.ceil(m / d)):
        g = torch.randn(d, d, **f64)
        q, r = torch.linalg.qr(g)
        blocks.append((q * torch.sign(torch.diagonal(r))).T)
    rows = torch.cat(blocks)[:m]
    norms = torch.randn(m, d, **f64).norm(dim=1, keepdim=True)
    return (rows * norms).float()


class RandomFeatures(torch.nn.Module):
    """An M x D projection redrawn every `interval` optimizer steps (0: never).

    Buffers (all saved in checkpoints): `weight` the current draw, `seed` (drawn once from
    torch's global generator at construction, so it follows the run's seed and differs by
    layer), `draw` its index, `steps` the optimizer steps seen."""

    def __init__(self, m: int, d: int, interval: int, orthogonal: bool):
        super().__init__()
        self.m, self.d, self.interval, self.orthogonal = m, d, interval, orthogonal
        seed = int(torch.randint(0, 2**62, (1,), device="cpu"))
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.int64))
        self.register_buffer("draw", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("weight", draw_projection(m, d, seed, 0, orthogonal))

    @torch.no_grad()
    def step(self) -> None:
        """One optimizer step has been taken; redraw when the schedule says so."""
        self.steps += 1
        if self.interval and int(self.steps) % self.interval == 0:
            self.redraw(int(self.steps) // self.interval)

    @torch.no_grad()
    def redraw(self, draw: int) -> None:
        self.draw.fill_(draw)
        w = draw_projection(self.m, self.d, int(self.seed), draw, self.orthogonal)
        self.weight.copy_(w.to(self.weight.dtype))


@dataclass
class RandomFeatureConfig(KernelizedConfig):
    features: int = 256  # M random projections per head
    redraw_interval: int = 1000  # optimizer steps between redraws; 0 keeps the first draw
    orthogonal: bool = True  # orthogonal random features (lower variance); False: iid Gaussian


class RandomFeatureAttention(KernelizedAttention):
    """A kernelized kind whose features come from a random projection (performer, rfa): the
    projection, its redraws after optimizer steps, its options' checks and its FLOPs."""

    features_per_projection = 1  # features each random projection gives (RFA: sin and cos)
    cfg: RandomFeatureConfig

    def __init__(self, cfg: RandomFeatureConfig, *, d_model: int, n_heads: int, dropout: float, layer: int = 0):
        super().__init__(cfg, d_model=d_model, n_heads=n_heads, dropout=dropout, layer=layer)
        self.features = RandomFeatures(cfg.features, self.head_dim, cfg.redraw_interval, cfg.orthogonal)

    @classmethod
    def check(cls, a) -> list[str]:
        reasons = super().check(a)
        cfg = a.model.attention
        if cfg.features < 1:
            reasons.append(f"model.attention.features={cfg.features}: must be at least 1")
        if cfg.redraw_interval < 0:
            reasons.append("model.attention.redraw_interval must be 0 (never) or positive")
        return reasons

    @classmethod
    def feature_count(cls, model) -> int:
        return cls.features_per_projection * model.attention.features

    @classmethod
    def projection_flops(cls, model) -> float:
        return 2 * 2 * model.attention.features * (model.d_model // model.n_heads)  # w . x for q and k

    @property
    def n_features(self) -> int:
        return self.features_per_projection * self.features.m

    def after_optimizer_step(self) -> None:
        self.features.step()
