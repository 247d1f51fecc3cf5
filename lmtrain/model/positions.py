"""Positional schemes: one axis of the decoder, keyed by `model.position.kind`.

A scheme can act in three places, and each declares which:
  * `embed`      - added to the token embeddings (sinusoidal, learned),
  * `rotate`     - applied to queries and keys (RoPE),
  * `score_bias` - an additive bias on attention scores (ALiBi).
Attention kernels read `has_score_bias` to refuse or to handle the bias; the decoder
calls `embed` and the attention block calls `rotate`, whatever the scheme.

Shapes: B batch, H heads, L query length, S key length, D head dim, M model dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
from torch import Tensor, nn

from lmtrain.registry import KindConfig, Registry, Variant

POSITIONS: Registry[type["Position"]] = Registry("model.position")


@dataclass
class PositionConfig(KindConfig):
    """Options common to every scheme (none); schemes with options subclass it."""

    kind: str = "alibi"


class Position(Variant, nn.Module):
    """Base scheme: does nothing anywhere (that is exactly `none`)."""

    Config = PositionConfig
    has_score_bias: ClassVar[bool] = False
    # True: score_bias(q, k) depends on k - q only (kernels may then share one bias block).
    relative_bias: ClassVar[bool] = True
    # True: the decoder follows Vaswani et al.'s embedding recipe for this scheme (token
    # embeddings initialised N(0, d^-1/2) and multiplied by sqrt(d) on input).
    scales_tokens: ClassVar[bool] = False

    def __init__(self, cfg: PositionConfig, *, d_model: int, n_heads: int, seq_len: int):
        super().__init__()
        self.cfg = cfg
        self.max_len: Optional[int] = None  # only schemes with a table have a hard limit

    def embed(self, x_BLM: Tensor, pos_L: Tensor) -> Tensor:
        return x_BLM

    def rotate(self, x_BHLD: Tensor, pos_L: Tensor) -> Tensor:
        return x_BHLD

    def score_bias(self, q_pos_L: Tensor, k_pos_S: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no score bias")

    def score_mod(self) -> Optional[Callable]:
        """The bias as a FlexAttention score_mod, or None."""
        return None

    def linear_bias_slopes(self) -> Optional[Tensor]:
        """H slopes m_h when the score bias is exactly m_h * (k_pos - q_pos), else None.
        Such a bias is, per query, a constant plus m_h * k_pos, which kernels can fold into
        the dot product (one extra dimension) instead of materialising it."""
        return None


POSITIONS.register("none")(Position)  # the base scheme does nothing anywhere


def alibi_slopes(n_heads: int) -> list[float]:
    """ALiBi head slopes (Press et al. 2022, Sec. 3 and the official code).

    For n a power of two: the geometric sequence starting at 2^(-8/n) with that ratio.
    Otherwise the slopes for the closest lower power of two c, followed by the
    even-indexed slopes of 2c heads until there are n.
    """

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if n_heads <= 0:
        raise ValueError("n_heads must be positive")
    if math.log2(n_heads).is_integer():
        return power_of_two(n_heads)
    c = 2 ** math.floor(math.log2(n_heads))
    return power_of_two(c) + power_of_two(2 * c)[0::2][: n_heads - c]


@POSITIONS.register("alibi")
class ALiBi(Position):
    """Linear distance bias: score += slope_h * (k_pos - q_pos), <= 0 where causal."""

    has_score_bias = True

    def __init__(self, cfg: PositionConfig, *, n_heads: int, **kw):
        super().__init__(cfg, n_heads=n_heads, **kw)
        # A buffer, not a parameter: the paper's slopes are fixed.
        self.register_buffer("slopes", torch.tensor(alibi_slopes(n_heads)), persistent=False)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the non-persistent buffers (loaders that build on the meta device and
        fill only the saved tensors call this: lmtrain/hf/remote.py)."""
        self.slopes.copy_(torch.tensor(alibi_slopes(len(self.slopes)), dtype=self.slopes.dtype))

    def score_bias(self, q_pos_L: Tensor, k_pos_S: Tensor) -> Tensor:
        """H L S for query positions L; B H L S for per-row query positions B L."""
        dist_LS = (k_pos_S - q_pos_L[..., None]).to(self.slopes.dtype)  # ([B] L S)
        return self.slopes[:, None, None] * dist_LS.unsqueeze(-3)

    def score_mod(self) -> Callable:
        # One function per module, reading the slopes at call time: torch.compile sees the same
        # function every call (no recompiles), and it follows the buffer through .to(device).
        if getattr(self, "_score_mod", None) is None:
            module = self

            def alibi(score, b, h, q_idx, kv_idx):
                return score + module.slopes[h] * (kv_idx - q_idx)

            self._score_mod = alibi
        return self._score_mod

    def linear_bias_slopes(self) -> Tensor:
        return self.slopes


@dataclass
class RoPEConfig(PositionConfig):
    kind: str = "rope"
    theta: float = 10000.0  # base of the rotation frequencies theta^(-2i/D)


@POSITIONS.register("rope")
class RoPE(Position):
    """Rotary embeddings (Su et al. 2021), rotating half-dimension pairs (GPT-NeoX layout)."""

    Config = RoPEConfig
    cfg: RoPEConfig

    def __init__(self, cfg: RoPEConfig, *, d_model: int, n_heads: int, **kw):
        super().__init__(cfg, d_model=d_model, n_heads=n_heads, **kw)
        self.head_dim, self.theta = d_model // n_heads, cfg.theta
        if self.head_dim % 2:
            raise ValueError("rope needs an even head dimension")

    @classmethod
    def check(cls, a) -> list[str]:
        m, reasons = a.model, []
        if (m.d_model // m.n_heads) % 2:
            reasons.append(f"model.position.kind={m.position.kind} needs an even head dimension "
                           f"(model.d_model / model.n_heads = {m.d_model // m.n_heads})")
        if not m.position.theta > 0:
            reasons.append("model.position.theta: must be positive (10000 in the paper)")
        return reasons

    def rotate(self, x_BHLD: Tensor, pos_L: Tensor) -> Tensor:
        # Angles are computed afresh in fp32 (fp64 for fp64 inputs), never in a low-precision
        # buffer that model.to(bf16) would have cast: at long positions bf16 angles are useless.
        dt = _angle_dtype(x_BHLD)
        inv_freq = self.theta ** (-torch.arange(0, self.head_dim, 2, dtype=dt, device=x_BHLD.device) / self.head_dim)
        angles_LD2 = pos_L.to(dt)[..., None] * inv_freq  # L D/2, or B L D/2 for per-row positions
        if angles_LD2.dim() == 3:
            angles_LD2 = angles_LD2[:, None]  # B 1 L D/2: the same angles for every head
        cos, sin = angles_LD2.cos().to(x_BHLD.dtype), angles_LD2.sin().to(x_BHLD.dtype)
        x1, x2 = x_BHLD.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@POSITIONS.register("sinusoidal")
class Sinusoidal(Position):
    """Fixed sinusoidal embeddings added to the input (Vaswani et al. 2017, Sec. 3.5), with
    the token-embedding recipe that goes with them there and in fairseq (the ALiBi paper's
    baseline): token embeddings initialised N(0, d^-1/2) and multiplied by sqrt(d), so
    about unit size per dimension, plus sinusoids of amplitude 1 (`scales_tokens`).

    With GPT-2's small embeddings (std 0.02) instead, unscaled sinusoids outweigh the
    tokens about 35 to 1 at init and the model learns very slowly (measured: loss 6.6
    against 4.2 after 400 steps); sinusoids scaled down to the tokens' size fade as the
    embeddings grow in training (their RMS grew 4x in 1000 steps), so the model hardly uses
    absolute positions, unlike the sinusoidal models of the literature."""

    scales_tokens = True

    def __init__(self, cfg: PositionConfig, *, d_model: int, **kw):
        super().__init__(cfg, d_model=d_model, **kw)
        self.d_model = d_model

    def embed(self, x_BLM: Tensor, pos_L: Tensor) -> Tensor:
        return x_BLM + sinusoids(pos_L, self.d_model, _angle_dtype(x_BLM)).to(x_BLM.dtype)


@dataclass
class LearnedConfig(PositionConfig):
    kind: str = "learned"
    max_position: int = 0  # rows of the table; 0 = data.seq_len (longer inputs are refused)


@POSITIONS.register("learned")
class Learned(Position):
    """A learned absolute position table of `max_position` rows (GPT-2)."""

    Config = LearnedConfig
    cfg: LearnedConfig

    def __init__(self, cfg: LearnedConfig, *, d_model: int, seq_len: int, **kw):
        super().__init__(cfg, d_model=d_model, seq_len=seq_len, **kw)
        self.max_len = cfg.max_position or seq_len
        self.table = nn.Embedding(self.max_len, d_model)

    @classmethod
    def own_parameters(cls, a) -> int:
        return (a.model.position.max_position or a.seq_len) * a.model.d_model

    @classmethod
    def check(cls, a) -> list[str]:
        rows = a.model.position.max_position
        if rows < 0:
            return ["model.position.max_position: must be 0 (= data.seq_len) or positive"]
        if rows and rows < a.seq_len:
            return [f"model.position.max_position: {rows} is shorter than data.seq_len={a.seq_len}"]
        return []

    def embed(self, x_BLM: Tensor, pos_L: Tensor) -> Tensor:
        if pos_L.numel() and int(pos_L.max()) >= self.max_len:
            raise PositionOutOfRange(
                f"learned positions end at {self.max_len}; position {int(pos_L.max())} was asked for"
            )
        return x_BLM + self.table(pos_L)


def sinusoids(pos_L: Tensor, d_model: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """L x M (or B x L x M for per-row positions): sin(p / 10000^(2i/M)) at dimension 2i and
    cos at 2i + 1 (Vaswani et al. 2017, Sec. 3.5).
    The Universal Transformer's timestep signal is the same function of the step number."""
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=dtype, device=pos_L.device) * (-math.log(10000.0) / d_model))
    angles = pos_L.to(dtype)[..., None] * inv_freq
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)[..., :d_model]


def _angle_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class PositionOutOfRange(ValueError):
    """A scheme with a finite table was asked for a position beyond it."""


def build_position(cfg: PositionConfig | str, *, d_model: int, n_heads: int, seq_len: int) -> Position:
    """The scheme of a config node (or, for tests and benchmarks, of a kind with its defaults)."""
    if isinstance(cfg, str):
        cfg = POSITIONS.config(cfg)
    return POSITIONS.get(cfg.kind)(cfg, d_model=d_model, n_heads=n_heads, seq_len=seq_len)
