"""Universal Transformer depth (Dehghani et al., ICLR 2019) with ACT halting (Graves 2016).

`model.n_layers` distinct layers form one shared block, applied step after step. Before
each application t = 1, 2, ... the step input is the state plus two signals (UT, Sec. 2.1):
the position signal (the model's own scheme re-applied: sinusoids or the learned table;
schemes that act inside attention, RoPE and ALiBi, act there at every step anyway) and a
timestep signal, the sinusoids of t. Both can be switched off.

  * universal - every position runs `steps` applications; the output is the last state.
  * act       - Adaptive Computation Time per position, up to `max_steps`:
                p_t = sigmoid(w . norm(x_t) + b), b initialised to +1 (the UT code). A position
                halts at the first step t where p_1 + ... + p_t >= 1 - eps, or at max_steps;
                that step's weight is the remainder R = 1 - (p_1 + ... + p_{N-1}), the others'
                are their p, so the weights sum to 1. The output is sum_t weight_t * h_t, the
                ponder cost rho = N + R, and `ponder_cost * mean(rho)` is added to the loss
                (`aux.losses["ponder"]`). R carries the cost's gradient to the halting unit;
                N has none (Graves, Eq. 10-14).

A halted position keeps its state: at every later step it offers the keys and values it
offered at its last step (its inputs to every layer of the block are frozen), so it still
serves as context for the positions that keep running. The loop ends when every position
has halted. Before that, with `skip_halted`, only running positions are computed: the
queries, attention output, projections and feed-forward of the running positions of each
row (padded to the row with the most), while keys and values come from all positions.
Attention kinds that cannot take a subset of queries (`caps.query_rows` False) attend
with every query and keep the running rows' outputs.

Shapes: B batch, L length, M model dim, Q running positions per row (padded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor, nn

from lmtrain.model.depth import DEPTH, Depth, DepthConfig
from lmtrain.model.layer import Context, Layer, make_norm
from lmtrain.model.positions import POSITIONS, sinusoids
from lmtrain.model.residual import Residual
from lmtrain.model.running import freeze_cache, step_running


class Halting:
    """ACT's bookkeeping for B x L positions (Graves 2016, Sec. 2), one `step` per application.

    p_t is a position's halting probability at step t. It halts at the first t with
    p_1 + ... + p_t >= threshold (= 1 - eps), or at `max_steps`; its weight at step t is p_t
    before that and the remainder R = 1 - (p_1 + ... + p_{N-1}) at its last step N, 0 after.
    In floating point the weights, summed in step order, give exactly 1: the running sum is
    accumulated in that order and R is computed from it.
    """

    def __init__(self, B: int, L: int, *, threshold: float, max_steps: int, dtype: torch.dtype, device):
        self.threshold, self.max_steps, self.dtype = threshold, max_steps, dtype
        self.t = 0
        self.cum_BL = torch.zeros(B, L, dtype=dtype, device=device)  # sum of p before the halting step
        self.remainder_BL = torch.zeros(B, L, dtype=dtype, device=device)
        self.steps_BL = torch.zeros(B, L, dtype=torch.long, device=device)  # N
        self.running_BL = torch.ones(B, L, dtype=torch.bool, device=device)

    def step(self, p_BL: Tensor) -> Tensor:
        """The weights of this step's states; updates who is still running."""
        self.t += 1
        running = self.running_BL
        halt = running & ((self.cum_BL + p_BL >= self.threshold) | (self.t >= self.max_steps))
        go_on = running & ~halt
        weight_BL = torch.where(go_on, p_BL, torch.where(halt, 1.0 - self.cum_BL, 0.0))
        self.remainder_BL = torch.where(halt, 1.0 - self.cum_BL, self.remainder_BL)
        self.cum_BL = torch.where(go_on, self.cum_BL + p_BL, self.cum_BL)
        self.steps_BL = self.steps_BL + running.long()
        self.running_BL = go_on
        return weight_BL

    @property
    def ponder_BL(self) -> Tensor:
        """rho = N + R; its gradient flows through R only."""
        return self.steps_BL.to(self.dtype) + self.remainder_BL


@dataclass
class UniversalConfig(DepthConfig):
    kind: str = "universal"
    steps: int = 6  # applications of the shared block (of model.n_layers layers)
    timestep_signal: bool = True  # add sinusoids of the step number before each application
    position_signal: bool = True  # re-apply the position scheme's embedding before each application


@dataclass
class ACTConfig(DepthConfig):
    kind: str = "act"
    max_steps: int = 8  # most applications of the shared block a position may take
    timestep_signal: bool = True  # add sinusoids of the step number before each application
    position_signal: bool = True  # re-apply the position scheme's embedding before each application
    eps: float = 0.01  # a position halts once its summed halting probability reaches 1 - eps
    ponder_cost: float = 0.01  # tau: loss += tau * mean over positions of (N + R)
    halting_bias_init: float = 1.0  # b of the halting unit at initialisation (the UT code's value)
    skip_halted: bool = True  # compute running positions only (False: all, then keep the running ones)


class SharedBlock(Depth):
    """The layers, the residual wiring and the step signals that both kinds share."""

    def __init__(self, model_cfg, residual: Residual):
        super().__init__()
        self.cfg = model_cfg.depth
        self.layers = nn.ModuleList(Layer(model_cfg, i) for i in range(model_cfg.n_layers))
        self.residual = residual
        # The timestep signal is as large as the token embeddings it joins: unit sinusoids where
        # the scheme scales tokens to unit size (Vaswani's recipe, as the UT code does), else
        # sinusoids with the RMS of GPT-2's token initialisation, so that at initialisation the
        # signal does not drown the tokens in each layer's input norm.
        scales_tokens = POSITIONS.get(model_cfg.position.kind).scales_tokens
        self.signal_scale = 1.0 if scales_tokens else math.sqrt(2.0) * model_cfg.init_std

    steps_key = "steps"  # the config key that bounds the applications

    @classmethod
    def check(cls, a) -> list[str]:
        steps = cls.max_applications(a.model.depth)
        return [] if steps >= 1 else [f"model.depth.{cls.steps_key}: must be at least 1"]

    @classmethod
    def max_applications(cls, depth_cfg) -> int:
        return getattr(depth_cfg, cls.steps_key)

    @classmethod
    def layer_applications(cls, model_cfg) -> int:
        return model_cfg.n_layers * cls.max_applications(model_cfg.depth)

    def step_input(self, h_BLM: Tensor, t: int, ctx: Context) -> Tensor:
        """The state plus the position and timestep signals of step t (1-based)."""
        if self.cfg.position_signal:
            h_BLM = ctx.position.embed(h_BLM, ctx.embed_positions)
        if self.cfg.timestep_signal:
            dt = torch.float64 if h_BLM.dtype == torch.float64 else torch.float32
            t_1 = torch.tensor([t], device=h_BLM.device)
            h_BLM = h_BLM + (self.signal_scale * sinusoids(t_1, h_BLM.shape[-1], dt)).to(h_BLM.dtype)
        return h_BLM


@DEPTH.register("universal")
class UniversalDepth(SharedBlock):
    Config = UniversalConfig
    splits_sequence = True
    test_options = {"steps": 2}

    def forward(self, x_BLM: Tensor, ctx: Context) -> Tensor:
        h_BLM = x_BLM
        for t in range(1, self.cfg.steps + 1):
            ctx_t = replace(ctx, step=t)
            h_BLM = self.residual.run(self.layers, self.step_input(h_BLM, t, ctx_t), ctx_t)
        return h_BLM


@DEPTH.register("act")
class ACTDepth(SharedBlock):
    Config = ACTConfig
    steps_key = "max_steps"
    primary_token_stat = "act_steps"
    init_options = {"halting_bias_init": ("halt.bias", lambda cfg: cfg.halting_bias_init)}
    test_options = {"max_steps": 3}

    def __init__(self, model_cfg, residual: Residual):
        super().__init__(model_cfg, residual)
        self.halt_norm = make_norm(model_cfg.norm, model_cfg.d_model, model_cfg.bias)
        self.halt = nn.Linear(model_cfg.d_model, 1)
        self.init_parameters()

    @classmethod
    def check(cls, a) -> list[str]:
        reasons = super().check(a)
        d = a.model.depth
        if not 0.0 < d.eps < 1.0:
            reasons.append("model.depth.eps: must be in (0, 1); the paper uses 0.01")
        if d.ponder_cost < 0:
            reasons.append("model.depth.ponder_cost: must be 0 or more; the UT code uses 0.01")
        return reasons

    def token_stat_limits(self) -> dict[str, float]:
        return {"act_steps": self.cfg.max_steps, "ponder": self.cfg.max_steps + 1}

    @classmethod
    def own_parameters(cls, a) -> int:
        from lmtrain.model.count import norm_parameters

        return norm_parameters(a.model) + a.model.d_model + 1  # the halting unit's norm and linear map

    @torch.no_grad()
    def init_parameters(self) -> None:
        self.halt.bias.fill_(self.cfg.halting_bias_init)

    def forward(self, x_BLM: Tensor, ctx: Context) -> Tensor:
        B, L, M = x_BLM.shape
        T = self.cfg.max_steps
        halting = Halting(B, L, threshold=1.0 - self.cfg.eps, max_steps=T,
                          dtype=torch.promote_types(x_BLM.dtype, torch.float32), device=x_BLM.device)
        out_BLM = torch.zeros_like(x_BLM)
        # Each layer's input, then the block's output, as of the last step each position ran.
        states: Optional[list[Tensor]] = None
        h_BLM = x_BLM
        computed = 0  # position-steps whose update was computed (padding included)
        for t in range(1, T + 1):
            ctx_t = replace(ctx, step=t)
            running_BL = halting.running_BL
            x0_BLM = self.step_input(h_BLM, t, ctx_t)
            if states is not None:
                x0_BLM = torch.where(running_BL[..., None], x0_BLM, states[0])
            p_BL = torch.sigmoid(self.halt(self.halt_norm(x0_BLM)).squeeze(-1).to(halting.dtype))
            weight_BL = halting.step(p_BL)
            states, n = step_running(self.layers, self.residual, x0_BLM, states, running_BL, ctx_t,
                                     skip_stopped=self.cfg.skip_halted)
            computed += n
            h_BLM = states[-1]
            out_BLM = out_BLM + weight_BL[..., None].to(out_BLM.dtype) * h_BLM
            if not bool(halting.running_BL.any()):
                break
        freeze_cache(ctx.cache, self.layers, t, T, L)  # halted positions serve later steps with their last keys
        ponder_BL = halting.ponder_BL
        ctx.aux.add_loss("ponder", self.cfg.ponder_cost * ponder_BL.mean())
        ctx.aux.stats["ponder/mean"] = ponder_BL.detach().mean()
        ctx.aux.stats["ponder/max"] = ponder_BL.detach().max()
        ctx.aux.stats["act/steps_mean"] = halting.steps_BL.float().mean()
        # Share of the all-steps work that was computed (padded rows count as computed).
        ctx.aux.stats["act/computed_fraction"] = torch.tensor(computed / (B * L * T))
        ctx.aux.tokens["act_steps"] = halting.steps_BL
        ctx.aux.tokens["ponder"] = ponder_BL.detach()
        return out_BLM
