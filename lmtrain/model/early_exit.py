"""Early exit: the Depth-Adaptive Transformer (Elbayad et al., ICLR 2020) and CALM's confident
early exit (Schuster et al., NeurIPS 2022), as the depth kind `early_exit`.

An exit after a layer reads that layer's output through the decoder's final norm and LM head
(`ctx.readout`; exits without the final norm give unusable logits). Which layers have exits is
`exits` (every layer when empty; the last layer always has one).

Training. Every exit has a language-model loss; the objective is sum_n w_n CE_n with the
weights `weighting`: `aligned` (equal, the paper's aligned training), `increasing` (CALM:
w_n proportional to the layer number n), `last` (the last exit only: the fixed-depth model,
exactly), or explicit `exit_weights`. The forward keeps each exit's state in `aux.exits`;
the trainer, which holds the targets, asks for the losses through `target_losses`, which
computes each exit's logits in chunks of positions under activation checkpointing, so one
chunk of logits exists at a time, never N full sets. The last exit's loss is the usual LM
loss (the trainer's, fused or not), weighted by `aux.lm_weight`.

Halting units (`halting: true`, Elbayad et al. Sec. 3.2, "geometric-like"): after each exit
but the last, chi_n = sigmoid(w_n . norm(h_n) + b_n) on the detached state, and
q(n) = chi_n prod_{m<n} (1 - chi_m) (the last exit takes the rest). They are trained toward an
oracle exit per token by cross-entropy, -log q(n*): `likelihood` picks the exit with the best
log-likelihood of the target minus `halting_penalty` per layer; `correct` the first exit whose
top prediction is the target (else the last).

Per-token exits (evaluation and generation; in training too with `train_exits`): a token
stops at the first exit whose confidence reaches `threshold`:
  * softmax    - top-1 minus top-2 probability of the exit's prediction (CALM);
  * state      - cosine similarity of the layer's output and input (CALM's state saturation);
  * halting    - the halting unit's chi_n;
  * classifier - a linear classifier per exit, trained after training with the model frozen
                 (`lmtrain calibrate-exit --measure classifier`, attached with
                 `set_exit_policy`).
A stopped token keeps its state, which is the paper's state copying: the later layers compute
their keys and values from it (the running-rows machinery of lmtrain/model/running.py), so
later tokens find them, and with a KV cache generation equals a full recompute with the same
exit decisions. Decisions are per token and per row: a batch decodes as its rows one by one.

Decoding costs. When every token of a step has left, a skipped layer computes nothing: it owes
the cache the keys and values of the copied state (`KVCache.defer`), and the next token that
runs the layer computes all it owes in one projection before its own (a layer no later token
reaches never does). When they left at a softmax-measured exit, its logits are the output
(`aux.logits`), and the head is not applied twice. A check is not free either (the softmax
measure reads the LM head, which in a small model outweighs a layer): `ExitPolicy.checked`
names the exits whose confidence is checked, and `calibrate-exit --exit-layers auto` keeps
those whose check saves more than it costs.

Shapes: B batch, L length, M model dim, V vocabulary, K exits.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lmtrain.model.depth import DEPTH, Depth, DepthConfig
from lmtrain.model.layer import Context, Layer, Readout
from lmtrain.model.residual import Residual
from lmtrain.model.running import step_running

WEIGHTINGS = ("aligned", "increasing", "last")
MEASURES = ("none", "softmax", "state", "halting", "classifier")
ORACLES = ("likelihood", "correct")


@dataclass
class EarlyExitConfig(DepthConfig):
    kind: str = "early_exit"
    exits: List[int] = field(default_factory=list)  # layers (1..n_layers) with an exit; empty: every layer
    weighting: str = "aligned"  # aligned (equal) | increasing (CALM: w_n ~ n) | last (the fixed-depth model)
    exit_weights: List[float] = field(default_factory=list)  # explicit, one per exit (normalised); overrides weighting
    halting: bool = False  # Depth-Adaptive halting units, trained on detached states toward an oracle exit
    halting_oracle: str = "likelihood"  # likelihood (best log p(y) minus the penalty) | correct (first right exit)
    halting_penalty: float = 0.05  # likelihood oracle: nats per layer that an exit's depth costs
    halting_weight: float = 1.0  # the halting loss's weight in the objective
    measure: str = "none"  # per-token exits in evaluation: none | softmax | state | halting (classifier: generate)
    threshold: float = 0.9  # a token exits at the first exit whose confidence reaches this
    train_exits: bool = False  # per-token exits in training too (default: every token runs every layer)


@dataclass
class ExitPolicy:
    """How tokens exit in a forward pass: a confidence measure, its threshold, and the exits
    (layers) whose confidence is checked (None: every exit; `select_checked_exits` in
    lmtrain/exits.py drops the exits whose check costs more than it saves)."""

    measure: str = "none"
    threshold: float = 1.0
    checked: Optional[tuple[int, ...]] = None

    @property
    def active(self) -> bool:
        return self.measure != "none"

    def checks(self, layer: int) -> bool:
        return self.checked is None or layer in self.checked


@dataclass
class ExitOutputs:
    """What one forward leaves for the exit losses: each exit's layer (1-based), weight and state."""

    layers: list[int]
    weights: list[float]
    states: list[Tensor]  # B x L x M each, before the final norm
    chi_logits: Optional[Tensor] = None  # (K - 1) x B x L halting logits (halting units)


def exit_layers(cfg: EarlyExitConfig, n_layers: int) -> list[int]:
    """The layers with an exit, ascending, the last layer always among them."""
    return sorted(set(cfg.exits or range(1, n_layers + 1)) | {n_layers})


def exit_weights(cfg: EarlyExitConfig, layers: list[int]) -> list[float]:
    """The loss weight of each exit, summing to 1."""
    if cfg.exit_weights:
        raw = [float(w) for w in cfg.exit_weights]
    elif cfg.weighting == "aligned":
        raw = [1.0] * len(layers)
    elif cfg.weighting == "increasing":
        raw = [float(n) for n in layers]
    else:  # last
        raw = [0.0] * (len(layers) - 1) + [1.0]
    total = sum(raw)
    return [w / total for w in raw]


def token_nll(readout: Readout, h_BLM: Tensor, y_BL: Tensor, chunk: int) -> Tensor:
    """Per-token negative log-likelihood (B x L, float32 at least) of the targets under the
    readout of `h_BLM`, `chunk` positions at a time; under autograd each chunk's logits are
    recomputed in the backward instead of kept."""
    N = h_BLM.shape[0] * h_BLM.shape[1]
    h_NM, y_N = h_BLM.reshape(N, -1), y_BL.reshape(N)
    chunk = chunk if chunk > 0 else N

    def part(h, y):
        logits = readout.logits(h)
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y, reduction="none")

    grad = torch.is_grad_enabled()
    parts = [checkpoint(part, h_NM[s:s + chunk], y_N[s:s + chunk], use_reentrant=False) if grad
             else part(h_NM[s:s + chunk], y_N[s:s + chunk]) for s in range(0, N, chunk)]
    return torch.cat(parts).view_as(y_BL)


@torch.no_grad()
def token_hits(readout: Readout, h_BLM: Tensor, y_BL: Tensor, chunk: int) -> Tensor:
    """Whether the readout's top prediction is the target, per token (B x L)."""
    N = h_BLM.shape[0] * h_BLM.shape[1]
    h_NM, y_N = h_BLM.reshape(N, -1), y_BL.reshape(N)
    chunk = chunk if chunk > 0 else N
    return torch.cat([readout.logits(h_NM[s:s + chunk]).argmax(-1) == y_N[s:s + chunk]
                      for s in range(0, N, chunk)]).view_as(y_BL)


def halting_log_q(chi_logits_KBL: Tensor) -> Tensor:
    """log q(n) for the K exits from the K - 1 halting logits: log chi_n + sum_{m<n} log(1 - chi_m),
    and for the last exit sum_{m<K} log(1 - chi_m). K x B x L."""
    log_chi = F.logsigmoid(chi_logits_KBL)
    log_not = F.logsigmoid(-chi_logits_KBL)
    before = torch.cat((torch.zeros_like(log_not[:1]), log_not.cumsum(0)), 0)  # sum over m < n, n = 1..K
    return torch.cat((log_chi, torch.zeros_like(log_chi[:1])), 0) + before


@DEPTH.register("early_exit")
class EarlyExitDepth(Depth):
    Config = EarlyExitConfig
    primary_token_stat = "exit_layer"
    test_options = {"exits": [1], "weighting": "increasing", "halting": True, "measure": "softmax",
                    "threshold": 0.5}

    def __init__(self, model_cfg, residual: Residual):
        super().__init__()
        self.cfg: EarlyExitConfig = model_cfg.depth
        self.n_layers = model_cfg.n_layers
        self.layers = nn.ModuleList(Layer(model_cfg, i) for i in range(model_cfg.n_layers))
        self.residual = residual
        self.exit_at = exit_layers(self.cfg, self.n_layers)
        self.weights = exit_weights(self.cfg, self.exit_at)
        # One halting unit per exit but the last (which takes whatever probability is left).
        self.halt = nn.ModuleList(nn.Linear(model_cfg.d_model, 1) for _ in self.exit_at[:-1]) \
            if self.cfg.halting else None
        self.policy = ExitPolicy(self.cfg.measure, self.cfg.threshold)
        self.classifier: Optional[nn.Module] = None  # ExitClassifier, attached by set_exit_policy

    # -- declarations -------------------------------------------------------------------------
    @classmethod
    def check(cls, a) -> list[str]:
        d, n, reasons = a.model.depth, a.model.n_layers, []
        if any(not 1 <= e <= n for e in d.exits):
            reasons.append(f"model.depth.exits: layers are numbered 1 to model.n_layers={n}; got {list(d.exits)}")
        if len(set(d.exits)) != len(d.exits):
            reasons.append(f"model.depth.exits: {list(d.exits)} names a layer twice")
        if d.weighting not in WEIGHTINGS:
            reasons.append(f"model.depth.weighting: {d.weighting!r} is not one of {', '.join(WEIGHTINGS)}")
        k = len(sorted(set(d.exits or range(1, n + 1)) | {n}))
        if d.exit_weights:
            if len(d.exit_weights) != k:
                reasons.append(f"model.depth.exit_weights: give one weight per exit ({k}: layers "
                               f"{sorted(set(d.exits or range(1, n + 1)) | {n})}), not {len(d.exit_weights)}")
            elif any(w < 0 or not math.isfinite(w) for w in d.exit_weights) or sum(d.exit_weights) <= 0:
                reasons.append("model.depth.exit_weights: weights must be 0 or more, with a positive sum")
        if d.measure not in MEASURES:
            reasons.append(f"model.depth.measure: {d.measure!r} is not one of {', '.join(MEASURES)}")
        elif d.measure == "classifier":
            reasons.append("model.depth.measure: the exit classifier is trained after training, with the model frozen "
                           "(`lmtrain calibrate-exit RUN --measure classifier`); use it at generation "
                           "(`lmtrain generate --exit classifier`), or pick softmax, state or halting here")
        elif d.measure == "halting" and not d.halting:
            reasons.append("model.depth.measure=halting needs the halting units: set model.depth.halting=true")
        if d.halting_oracle not in ORACLES:
            reasons.append(f"model.depth.halting_oracle: {d.halting_oracle!r} is not one of {', '.join(ORACLES)}")
        if d.halting_penalty < 0 or d.halting_weight < 0:
            reasons.append("model.depth.halting_penalty and halting_weight: must be 0 or more")
        if not -1.0 <= d.threshold <= 1.0:
            reasons.append(f"model.depth.threshold: {d.threshold} is outside [-1, 1] (confidences are "
                           "probabilities, or a cosine for the state measure)")
        if not a.residual.supports_rows:
            reasons.append(f"model.depth.kind=early_exit: exited tokens skip later layers and each exit reads one "
                           f"layer's output, which model.residual.kind={a.model.residual.kind} cannot offer "
                           "(it runs the whole stack at once); use model.residual.kind=prenorm")
        return reasons

    @classmethod
    def own_parameters(cls, a) -> int:
        d, n = a.model.depth, a.model.n_layers
        if not d.halting:
            return 0
        k = len(set(d.exits or range(1, n + 1)) | {n})
        return (k - 1) * (a.model.d_model + 1)

    @classmethod
    def extra_readouts(cls, model_cfg) -> int:
        layers = exit_layers(model_cfg.depth, model_cfg.n_layers)
        return sum(1 for w in exit_weights(model_cfg.depth, layers)[:-1] if w > 0)

    def token_stat_limits(self) -> dict[str, float]:
        return {"exit_layer": self.n_layers}

    def set_exit_policy(self, measure: str, threshold: float, classifier: Optional[nn.Module] = None,
                        checked: Optional[Sequence[int]] = None) -> None:
        """Change how tokens exit (generation, calibration): `none` runs every layer. `checked`:
        the exit layers whose confidence is checked (None: all of them)."""
        if checked is not None and not set(checked) <= set(self.exit_at[:-1]):
            raise ValueError(f"checked exits {list(checked)}: this model's exits before the last are at layers "
                             f"{self.exit_at[:-1]}")
        if measure not in MEASURES:
            raise ValueError(f"exit measure {measure!r} is not one of {', '.join(MEASURES)}")
        if measure == "halting" and self.halt is None:
            raise ValueError("this model has no halting units (model.depth.halting was false in training)")
        if measure == "classifier" and classifier is None and self.classifier is None:
            raise ValueError("the classifier measure needs a trained exit classifier (lmtrain calibrate-exit "
                             "--measure classifier)")
        self.policy = ExitPolicy(measure, threshold, None if checked is None else tuple(sorted(set(checked))))
        if classifier is not None:
            self.classifier = classifier

    @contextmanager
    def full_depth(self) -> Iterator[None]:
        policy, self.policy = self.policy, ExitPolicy()
        try:
            yield
        finally:
            self.policy = policy

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x_BLM: Tensor, ctx: Context) -> Tensor:
        B, L, _ = x_BLM.shape
        policy = self.policy if (not self.training or self.cfg.train_exits) else ExitPolicy()
        running_BL = torch.ones(B, L, dtype=torch.bool, device=x_BLM.device)
        exit_BL = torch.full((B, L), self.n_layers, dtype=torch.long, device=x_BLM.device)
        states: list[Tensor] = []
        chi: list[Tensor] = []
        computed, h_BLM, k = 0, x_BLM, 0
        n_running = B * L  # tokens still running (counted on the host once per exit, not per layer)
        for i, layer in enumerate(self.layers, 1):
            prev_BLM = h_BLM
            if n_running == 0 and (ctx.cache is None or layer.attn.fills_cache_alone):
                # Every token has left: no query at this layer. A KV cache still gets the keys and
                # values of the copied states, for the tokens to come.
                if ctx.cache is not None:
                    layer.fill_cache(h_BLM, ctx)
            elif n_running == B * L:
                h_BLM = self.residual.run([layer], h_BLM, ctx)
                computed += B * L
            else:
                # Stopped tokens keep their state: it is their input here, so their keys and values
                # come from it, and only the running tokens are computed.
                (_, h_BLM), n = step_running([layer], self.residual, h_BLM, [h_BLM, h_BLM], running_BL, ctx)
                computed += n
            if i != self.exit_at[k]:
                continue
            states.append(h_BLM)
            if self.halt is not None and i < self.n_layers:
                chi.append(self.halt[k](F.layer_norm(h_BLM.detach(), h_BLM.shape[-1:])).squeeze(-1))
            if policy.active and i < self.n_layers and n_running and policy.checks(i):
                conf_BL, logits_BLV = self.confidence(policy.measure, h_BLM, prev_BLM, k, chi, ctx.readout)
                stop_BL = running_BL & (conf_BL >= policy.threshold)
                exit_BL = exit_BL.masked_fill(stop_BL, i)
                running_BL = running_BL & ~stop_BL
                n_running = int(running_BL.sum())
                if logits_BLV is not None and ctx.cache is not None and not n_running:
                    # Every token has left: the states are final, and these logits are the model's
                    # (decoding reuses them instead of applying the head again; a step is short).
                    ctx.aux.logits = logits_BLV
            k += 1
        ctx.aux.exits = ExitOutputs(layers=list(self.exit_at), weights=list(self.weights), states=states,
                                    chi_logits=torch.stack(chi) if chi else None)
        ctx.aux.lm_weight = self.weights[-1]
        if policy.active:
            ctx.aux.tokens["exit_layer"] = exit_BL
            ctx.aux.stats["exit/mean_layer"] = exit_BL.float().mean()
            ctx.aux.stats["exit/computed_fraction"] = torch.tensor(computed / (B * L * self.n_layers))
        return h_BLM

    def confidence(self, measure: str, h_BLM: Tensor, prev_BLM: Tensor, k: int, chi: list[Tensor],
                   readout: Optional[Readout]) -> tuple[Tensor, Optional[Tensor]]:
        """The confidence (B x L) of exit k (0-based) that its state is final, and the exit's
        logits where the measure computed them (softmax)."""
        if measure == "softmax":
            logits = readout.logits(h_BLM)
            top = logits.float().softmax(-1).topk(2, dim=-1).values
            return top[..., 0] - top[..., 1], logits
        if measure == "state":
            return F.cosine_similarity(h_BLM.float(), prev_BLM.float(), dim=-1), None
        if measure == "halting":
            return torch.sigmoid(chi[k].float()), None
        return self.classifier(h_BLM, k), None  # classifier

    # -- losses that need the targets (the TargetLosses hook) ---------------------------------
    def target_losses(self, aux, y_BL: Tensor, readout: Readout, chunk: int) -> dict[str, Tensor]:
        """The intermediate exits' weighted LM losses (`exits`) and the halting units' loss
        (`halting`). In evaluation (no autograd) every exit's loss is also a statistic
        (`exit/loss_layerN`); in training only the readouts the objective needs are computed, so
        with `weighting: last` and no halting units nothing more than the fixed-depth model."""
        ex: Optional[ExitOutputs] = aux.exits
        if ex is None:
            return {}
        grad = torch.is_grad_enabled()
        need_all = ex.chi_logits is not None
        nll, weighted = [], []
        for n, w, h in zip(ex.layers, ex.weights, ex.states):
            trained = w > 0 and n != ex.layers[-1]  # the last exit's loss is the trainer's LM loss
            if not (trained or need_all or not grad):
                continue
            with torch.set_grad_enabled(grad and trained):
                t = token_nll(readout, h, y_BL, chunk)
            aux.stats[f"exit/loss_layer{n}"] = t.detach().mean()
            nll.append((n, t))
            if trained:
                weighted.append(w * t.mean())
        losses: dict[str, Tensor] = {}
        if weighted:
            losses["exits"] = torch.stack(weighted).sum()
        if need_all:
            losses["halting"] = self.cfg.halting_weight * self.halting_loss(ex.chi_logits, nll, ex, readout, y_BL,
                                                                            chunk)
        return losses

    def halting_loss(self, chi_logits_KBL: Tensor, nll: list, ex: ExitOutputs, readout: Readout, y_BL: Tensor,
                     chunk: int) -> Tensor:
        """-log q(n*) toward the oracle exit n* of each token, averaged."""
        with torch.no_grad():
            if self.cfg.halting_oracle == "likelihood":
                layers = torch.tensor([n for n, _ in nll], dtype=torch.float32, device=y_BL.device)
                score_KBL = -torch.stack([t.detach().float() for _, t in nll]) \
                    - self.cfg.halting_penalty * layers[:, None, None]
                oracle_BL = score_KBL.argmax(0)
            else:  # correct: the first exit whose top prediction is the target, else the last
                hits_KBL = torch.stack([token_hits(readout, h, y_BL, chunk) for h in ex.states[:-1]]
                                       + [torch.ones_like(y_BL, dtype=torch.bool)])
                oracle_BL = hits_KBL.to(torch.int8).argmax(0)  # the first True
        log_q_KBL = halting_log_q(chi_logits_KBL.float())
        return -log_q_KBL.gather(0, oracle_BL[None]).mean()
