"""Positional schemes: one axis of the decoder, keyed by `model.position.kind`.

A scheme can act in three places, and each declares which:
  * `embed`      - added to the token embeddings (sinusoidal, learned),
  * `rotate`     - applied to queries and keys (RoPE),
  * `score_bias` - an additive bias on attention scores: ALiBi's fixed one, and the learned
                   functions of distance (`DistanceBias`: exp_decay, gaussian, kerple_log,
                   rel_buckets), whose parameters are the model's.
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
    # True: `rotate` turns queries and keys by their positions (RoPE), so a query-key depends on
    # position as well as content (LSH's buckets refuse that).
    rotates_qk: ClassVar[bool] = False

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


class HeadSubset:
    """A scheme as a contiguous subset of the heads sees it: under sequence parallelism a
    process attends over the whole sequence with heads [start, stop) of the model
    (lmtrain/model/sequence.py). Per-head quantities (ALiBi's slopes, learned distance biases)
    are those heads'; everything else is the scheme's own."""

    def __init__(self, base: Position, heads: slice):
        self.base, self.heads = base, heads
        self._mod: Optional[Callable] = None

    def __getattr__(self, name):
        return getattr(self.base, name)

    def score_bias(self, q_pos_L: Tensor, k_pos_S: Tensor) -> Tensor:
        return self.base.score_bias(q_pos_L, k_pos_S)[..., self.heads, :, :]

    def linear_bias_slopes(self) -> Optional[Tensor]:
        slopes = self.base.linear_bias_slopes()
        return None if slopes is None else slopes[self.heads]

    def score_mod(self) -> Optional[Callable]:
        mod = self.base.score_mod()
        if mod is None:
            return None
        if self._mod is None or self._mod[0] is not mod:
            first = self.heads.start

            def shifted(score, b, h, q_idx, kv_idx):
                return mod(score, b, h + first, q_idx, kv_idx)

            self._mod = (mod, shifted)
        return self._mod[1]


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


# -- learned functions of the distance ------------------------------------------------------------
class DistanceBias(Position):
    """An additive bias f_h(d) of the distance d = q_pos - k_pos >= 0, with per-head learned
    parameters (patterns.md, "Distance scores"). One module per model: every layer adds the
    same bias, as with ALiBi and T5's relative bias.

    Subclasses give `head_values()` (name -> H positive per-head values, computed from the
    parameters with their gradients) and `bias(values, d)` for values broadcast against the
    distances d (float, >= 0). From these: `score_bias` for the CPU paths (d clamped at 0, so
    masked future keys never produce NaN in the backward), the FlexAttention `score_mod`, the
    per-head statistics (`head_stats`) and the bias-against-distance profile (`distance_profile`)."""

    has_score_bias = True
    no_weight_decay = True  # a bias, not a weight matrix: AdamW's decay would pull it to 0

    def head_values(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def bias(self, values: dict[str, Tensor], d: Tensor) -> Tensor:
        raise NotImplementedError

    def score_bias(self, q_pos_L: Tensor, k_pos_S: Tensor) -> Tensor:
        """H L S for query positions L; B H L S for per-row query positions B L (any leading
        dimensions broadcast as in ALiBi.score_bias). In fp32 at least: a model cast to bf16
        would otherwise round the distances (bf16 holds integers exactly only up to 256)."""
        d = (q_pos_L[..., None] - k_pos_S).clamp(min=0).unsqueeze(-3)  # ... 1 l S
        values = self.head_values()
        dt = torch.promote_types(next(iter(values.values())).dtype, torch.float32)
        return self.bias({k: v.to(dt)[:, None, None] for k, v in values.items()}, d.to(dt))

    def score_mod(self) -> Callable:
        # One function per module (see ALiBi.score_mod): it reads the parameters at call time.
        if getattr(self, "_score_mod", None) is None:
            module = self

            def distance_bias(score, b, h, q_idx, kv_idx):
                d = (q_idx - kv_idx).clamp(min=0).to(score.dtype)
                return score + module.bias({k: v[h].to(score.dtype) for k, v in module.head_values().items()}, d)

            self._score_mod = distance_bias
        return self._score_mod

    def head_stats(self) -> dict[str, Tensor]:
        return {f"{self.cfg.kind}.{k}": v.detach() for k, v in self.head_values().items()}

    def head_stat_limits(self) -> dict[str, float]:
        return {}

    @torch.no_grad()
    def distance_profile(self, d: Tensor) -> dict[str, Tensor]:
        """H x n: the bias at the distances d (n)."""
        values = {k: v[:, None].float() for k, v in self.head_values().items()}
        return {f"{self.cfg.kind}.bias": self.bias(values, d.float()[None])}


@dataclass
class ExpDecayConfig(PositionConfig):
    kind: str = "exp_decay"
    learn: bool = True  # learn the slopes (false: ALiBi's fixed slopes, exactly ALiBi)


@POSITIONS.register("exp_decay")
class ExpDecay(DistanceBias):
    """-lambda_h d: ALiBi with learned slopes. lambda_h = m_h exp(r_h), m_h ALiBi's slope and
    r_h a learned log-scale starting at 0: positive in every precision, and exactly ALiBi at
    initialisation (and when frozen, `learn: false`). Linear in d, so the kernels fold it into
    the dot product like ALiBi (`linear_bias_slopes`), with gradients reaching r."""

    Config = ExpDecayConfig
    cfg: ExpDecayConfig

    def __init__(self, cfg: ExpDecayConfig, *, n_heads: int, **kw):
        super().__init__(cfg, n_heads=n_heads, **kw)
        self.register_buffer("alibi", torch.tensor(alibi_slopes(n_heads)), persistent=False)
        self.log_scale = nn.Parameter(torch.zeros(n_heads)) if cfg.learn else None
        self.init_parameters()

    @classmethod
    def own_parameters(cls, a) -> int:
        return a.model.n_heads if a.model.position.learn else 0

    @torch.no_grad()
    def init_parameters(self) -> None:
        if self.log_scale is not None:
            self.log_scale.zero_()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        self.alibi.copy_(torch.tensor(alibi_slopes(len(self.alibi)), dtype=self.alibi.dtype))

    def slopes(self) -> Tensor:
        if self.log_scale is None:
            return self.alibi
        return self.alibi.to(self.log_scale.dtype) * self.log_scale.exp()

    def head_values(self) -> dict[str, Tensor]:
        return {"slope": self.slopes()}

    def bias(self, values, d):
        return -values["slope"] * d

    def score_bias(self, q_pos_L: Tensor, k_pos_S: Tensor) -> Tensor:
        # k - q unclamped, as ALiBi: the same numbers on every path (masked entries never count).
        slopes = self.slopes()
        slopes = slopes.to(torch.promote_types(slopes.dtype, torch.float32))
        dist_LS = (k_pos_S - q_pos_L[..., None]).to(slopes.dtype)
        return slopes[:, None, None] * dist_LS.unsqueeze(-3)

    def linear_bias_slopes(self) -> Tensor:
        return self.slopes()


@dataclass
class GaussianConfig(PositionConfig):
    kind: str = "gaussian"
    min_width: float = 2.0  # initial width sigma of the first head (the heads' widths are geometric)
    max_width: float = 0.0  # initial width of the last head; 0 = data.seq_len


@POSITIONS.register("gaussian")
class Gaussian(DistanceBias):
    """-d^2 / (2 sigma_h^2) with learned widths sigma_h = exp(s_h). It removes long range
    altogether (the bias falls quadratically), so expect it to extrapolate by forgetting."""

    Config = GaussianConfig
    cfg: GaussianConfig
    test_options = {"min_width": 3.0, "max_width": 30.0}

    def __init__(self, cfg: GaussianConfig, *, n_heads: int, seq_len: int, **kw):
        super().__init__(cfg, n_heads=n_heads, seq_len=seq_len, **kw)
        self.seq_len = seq_len
        self.log_width = nn.Parameter(torch.zeros(n_heads))
        self.init_parameters()

    @classmethod
    def own_parameters(cls, a) -> int:
        return a.model.n_heads

    @classmethod
    def check(cls, a) -> list[str]:
        p = a.model.position
        top = p.max_width or a.seq_len
        if not 0 < p.min_width <= top:
            return [f"model.position.min_width: must be positive and at most max_width ({top}); "
                    f"got {p.min_width}"]
        return []

    def initial_widths(self) -> Tensor:
        H = len(self.log_width)
        lo, hi = math.log(self.cfg.min_width), math.log(self.cfg.max_width or self.seq_len or self.cfg.min_width)
        return torch.tensor([lo + (hi - lo) * h / max(1, H - 1) for h in range(H)]).exp()

    @torch.no_grad()
    def init_parameters(self) -> None:
        self.log_width.copy_(self.initial_widths().log())

    def head_values(self) -> dict[str, Tensor]:
        return {"width": self.log_width.exp()}

    def bias(self, values, d):
        return -(d * d) / (2 * values["width"] ** 2)


@dataclass
class KerpleLogConfig(PositionConfig):
    kind: str = "kerple_log"
    eps: float = 0.01  # p and a are kept at least this (KERPLE's clamp)


@POSITIONS.register("kerple_log")
class KerpleLog(DistanceBias):
    """KERPLE's logarithmic kernel (Chi et al. 2022): -p_h log(1 + a_h d), p, a > 0, kept at
    least `eps` after every optimizer step as in the paper's code. Initialised with a_h = 1 and
    p_h = 16 m_h (m_h ALiBi's slopes): heads from local to nearly flat."""

    Config = KerpleLogConfig
    cfg: KerpleLogConfig

    def __init__(self, cfg: KerpleLogConfig, *, n_heads: int, **kw):
        super().__init__(cfg, n_heads=n_heads, **kw)
        self.p = nn.Parameter(torch.ones(n_heads))
        self.a = nn.Parameter(torch.ones(n_heads))
        self.init_parameters()

    @classmethod
    def own_parameters(cls, a) -> int:
        return 2 * a.model.n_heads

    @classmethod
    def check(cls, a) -> list[str]:
        if not a.model.position.eps > 0:
            return [f"model.position.eps: must be positive (0.01 in KERPLE); got {a.model.position.eps}"]
        return []

    @torch.no_grad()
    def init_parameters(self) -> None:
        self.p.copy_(16 * torch.tensor(alibi_slopes(len(self.p))))
        self.a.fill_(1.0)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.p.clamp_(min=self.cfg.eps)
        self.a.clamp_(min=self.cfg.eps)

    def head_values(self) -> dict[str, Tensor]:
        return {"p": self.p, "a": self.a}

    def bias(self, values, d):
        return -values["p"] * torch.log1p(values["a"] * d)


@dataclass
class RelBucketsConfig(PositionConfig):
    kind: str = "rel_buckets"
    buckets: int = 32  # half exact distances 0 .. buckets/2 - 1, half log-spaced up to max_distance
    max_distance: int = 128  # distances from here on share the last bucket
    table_std: float = 0.0  # the table starts N(0, table_std); 0 = zeros (no bias at first)


def relative_buckets(d: Tensor, buckets: int, max_distance: int) -> Tensor:
    """T5's causal bucketing of distances d >= 0 (Raffel et al. 2020, `_relative_position_bucket`
    with bidirectional=False): exact buckets below buckets/2, then log-spaced ones up to
    max_distance, beyond which the last bucket applies."""
    exact = buckets // 2
    d = d.long().clamp(min=0)
    # Computed in fp32 whatever the model's dtype, so every path gets the same buckets.
    scaled = torch.log(d.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (buckets - exact)
    large = (exact + scaled.long()).clamp(max=buckets - 1)
    return torch.where(d < exact, d, large)


@POSITIONS.register("rel_buckets")
class RelBuckets(DistanceBias):
    """A learned scalar per head and distance bucket (T5's relative attention bias; Shaw et al.
    2018 in its scalar form), initialised to 0 (or N(0, table_std))."""

    Config = RelBucketsConfig
    cfg: RelBucketsConfig
    test_options = {"buckets": 8, "max_distance": 16, "table_std": 0.5}

    def __init__(self, cfg: RelBucketsConfig, *, n_heads: int, **kw):
        super().__init__(cfg, n_heads=n_heads, **kw)
        self.table = nn.Parameter(torch.zeros(n_heads, cfg.buckets))
        self.init_parameters()

    @classmethod
    def own_parameters(cls, a) -> int:
        return a.model.n_heads * a.model.position.buckets

    @classmethod
    def check(cls, a) -> list[str]:
        p = a.model.position
        if p.buckets < 2:
            return [f"model.position.buckets: at least 2 (32 in T5); got {p.buckets}"]
        if p.table_std < 0:
            return [f"model.position.table_std: must be 0 or positive; got {p.table_std}"]
        if p.max_distance <= p.buckets // 2:
            return [f"model.position.max_distance: must exceed buckets/2 = {p.buckets // 2} "
                    f"(the exact buckets); got {p.max_distance}"]
        return []

    @torch.no_grad()
    def init_parameters(self) -> None:
        self.table.normal_(0.0, self.cfg.table_std) if self.cfg.table_std > 0 else self.table.zero_()

    def buckets_of(self, d: Tensor) -> Tensor:
        return relative_buckets(d, self.cfg.buckets, self.cfg.max_distance)

    def head_values(self) -> dict[str, Tensor]:
        return {"table": self.table}

    def score_bias(self, q_pos_L: Tensor, k_pos_S: Tensor) -> Tensor:
        idx = self.buckets_of(q_pos_L[..., None] - k_pos_S)  # ([B] l S)
        return self.table.t()[idx].movedim(-1, -3)  # ([B] H l S)

    def score_mod(self) -> Callable:
        if getattr(self, "_score_mod", None) is None:
            module = self

            def relative_bias(score, b, h, q_idx, kv_idx):
                return score + module.table[h, module.buckets_of(q_idx - kv_idx)].to(score.dtype)

            self._score_mod = relative_bias
        return self._score_mod

    def head_stats(self) -> dict[str, Tensor]:
        return {}  # one value per bucket: the distance profile shows them

    @torch.no_grad()
    def distance_profile(self, d: Tensor) -> dict[str, Tensor]:
        return {"rel_buckets.bias": self.table.float()[:, self.buckets_of(d)]}


@dataclass
class RoPEConfig(PositionConfig):
    kind: str = "rope"
    theta: float = 10000.0  # base of the rotation frequencies theta^(-2i/D)
    # Position interpolation (Chen et al. 2023) for context extension: positions are divided by
    # this factor, so a model trained at L sees positions of a 4L window (interpolate: 4) at
    # angles it was trained on. Base scaling, the other extension, raises `theta` instead.
    interpolate: float = 1.0


@POSITIONS.register("rope")
class RoPE(Position):
    """Rotary embeddings (Su et al. 2021), rotating half-dimension pairs (GPT-NeoX layout)."""

    Config = RoPEConfig
    rotates_qk = True
    cfg: RoPEConfig

    def __init__(self, cfg: RoPEConfig, *, d_model: int, n_heads: int, **kw):
        super().__init__(cfg, d_model=d_model, n_heads=n_heads, **kw)
        self.head_dim, self.theta, self.interpolate = d_model // n_heads, cfg.theta, cfg.interpolate
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
        if not m.position.interpolate >= 1:
            reasons.append(f"model.position.interpolate={m.position.interpolate}: must be at least 1 (1: none; "
                           "4: a 4x longer context at the trained angles)")
        return reasons

    def rotate(self, x_BHLD: Tensor, pos_L: Tensor) -> Tensor:
        # Angles are computed afresh in fp32 (fp64 for fp64 inputs), never in a low-precision
        # buffer that model.to(bf16) would have cast: at long positions bf16 angles are useless.
        dt = _angle_dtype(x_BHLD)
        inv_freq = self.theta ** (-torch.arange(0, self.head_dim, 2, dtype=dt, device=x_BHLD.device) / self.head_dim)
        pos = pos_L.to(dt) if self.interpolate == 1 else pos_L.to(dt) / self.interpolate
        angles_LD2 = pos[..., None] * inv_freq  # L D/2, or B L D/2 for per-row positions
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
