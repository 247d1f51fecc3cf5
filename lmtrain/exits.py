"""Early exit after training: CALM's exit classifier and the calibration of exit thresholds
(Schuster et al. 2022, Sec. 3-4), for models with `model.depth.kind: early_exit`.

  * `ExitClassifier` - a linear map per exit (but the last) from the normalised state to the
    probability that the exit's prediction is the last layer's; trained with the model frozen
    on that label (`train_classifier`), as CALM's "early-exit classifier" measure.
  * `calibrate` - Learn-then-Test (Angelopoulos et al. 2021) over thresholds: on n validation
    prompts, the full model's greedy continuation of each prompt is the reference; the
    early-exit model at threshold t runs over the same tokens (its exits, and the states they
    copy, as in cached decoding) and predicts each next token; a prompt's risk is the share of
    continuation positions where that prediction differs from the full model's token (token
    agreement given the same context: a free-running generation that differs once differs in
    most later tokens, which `bench decode` reports too). Thresholds are tested from the most
    conservative down (fixed-sequence testing); each gets the Hoeffding-Bentkus p-value of
    "mean risk > delta", and the chosen threshold is the lowest one before the first whose
    p-value exceeds epsilon. Then, with probability at least 1 - epsilon over the calibration
    prompts, the expected risk at that threshold is at most delta.

What calibration writes lives in RUN/exit/: `<measure>.json` (the threshold and the evidence)
and `classifier.safetensors`; `lmtrain export` copies the folder, and `lmtrain generate --exit
MEASURE` reads it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EXIT_DIR = "exit"
SELECT_WINDOWS = 32  # training-split windows on which `--exit-layers auto` weighs each exit's check
CLASSIFIER_FILE = "classifier.safetensors"


class ExitError(ValueError):
    """A request about exits that this model or run cannot serve (the CLI exits 2)."""


class ExitClassifier(nn.Module):
    """p(exit k agrees with the last layer) = sigmoid(w_k . layernorm(h_k) + b_k), k < K - 1."""

    def __init__(self, n_exits: int, d_model: int):
        super().__init__()
        self.maps = nn.ModuleList(nn.Linear(d_model, 1) for _ in range(n_exits - 1))

    def logits(self, h_BLM: Tensor, k: int) -> Tensor:
        h = F.layer_norm(h_BLM.to(self.maps[k].weight.dtype), h_BLM.shape[-1:])
        return self.maps[k](h).squeeze(-1)

    def forward(self, h_BLM: Tensor, k: int) -> Tensor:
        return torch.sigmoid(self.logits(h_BLM, k).float())


def early_exit_depth(model):
    """The model's early-exit depth module, or ExitError naming the fix."""
    depth = model.depth
    if not hasattr(depth, "set_exit_policy"):
        raise ExitError(f"--exit: this model has no exits (model.depth.kind={model.cfg.depth.kind}); train one with "
                        "model.depth.kind=early_exit")
    return depth


def require_measure(model, measure: str):
    """The model's early-exit depth, checked to offer `measure` (ExitError otherwise)."""
    depth = early_exit_depth(model)
    if measure == "halting" and depth.halt is None:
        raise ExitError("--exit/--measure halting: this model has no halting units (it was trained with "
                        "model.depth.halting=false)")
    return depth


def exit_dir(run_dir: Path) -> Path:
    return Path(run_dir) / EXIT_DIR


def load_classifier(model, run_dir: Path) -> ExitClassifier:
    from safetensors.torch import load_model

    path = exit_dir(run_dir) / CLASSIFIER_FILE
    if not path.is_file():
        raise ExitError(f"--exit classifier: no trained exit classifier at {path}; train it with "
                        f"`lmtrain calibrate-exit {run_dir} --measure classifier`")
    depth = early_exit_depth(model)
    clf = ExitClassifier(len(depth.exit_at), model.cfg.d_model)
    try:
        load_model(clf, str(path))
    except Exception as e:
        raise ExitError(f"{path}: not this model's exit classifier ({str(e).splitlines()[0]})") from None
    p = next(model.parameters())
    return clf.to(device=p.device, dtype=p.dtype).eval()


def calibrated_threshold(run_dir: Path, measure: str, step: int) -> tuple[float, Optional[list[int]]]:
    """The threshold `calibrate-exit` wrote for `measure`, and the exits it checks (None: all),
    if it calibrated this step's model."""
    path = exit_dir(run_dir) / f"{measure}.json"
    if not path.is_file():
        raise ExitError(f"--exit {measure}: no calibrated threshold at {path}; run `lmtrain calibrate-exit {run_dir} "
                        f"--measure {measure}`, or give --threshold")
    try:
        rep = json.loads(path.read_text())
        threshold, at = float(rep["threshold"]), rep.get("step")
        checked = rep.get("checked_exits")
        checked = None if checked is None else [int(c) for c in checked]
    except (ValueError, KeyError, TypeError) as e:
        raise ExitError(f"{path}: damaged ({e}); run `lmtrain calibrate-exit` again") from None
    if at != step:
        raise ExitError(f"{path}: calibrated the model of step {at}, not this one (step {step}); run "
                        f"`lmtrain calibrate-exit {run_dir} --measure {measure}` again, or give --threshold")
    return threshold, checked


def parse_checked_exits(text: Optional[str]) -> Optional[list[int]]:
    """`--exit-layers`: comma-separated layers, or `all` (every exit is checked: None)."""
    if text is None or text == "all":
        return None
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ExitError(f"--exit-layers {text}: give comma-separated layers (e.g. 1,2) or all") from None
    if not layers:
        raise ExitError("--exit-layers: give at least one layer, or all")
    return layers


def describe_checked(checked: Optional[Sequence[int]]) -> str:
    """The checked exits as logs print them: all, none, or the layers."""
    return "all" if checked is None else ",".join(map(str, checked)) or "none"


def apply_exit(model, run_dir: Path, measure: str, threshold: Optional[float], step: int,
               checked: Optional[list[int]] = None) -> tuple[float, Optional[list[int]]]:
    """Set the model's exit policy from the arguments: with `threshold` None, the run's
    calibrated threshold for this step's model and the exits it checks (unless `checked`
    names them); with a threshold, every exit is checked unless `checked` names some.
    Returns the threshold and the checked exits (None: all)."""
    depth = require_measure(model, measure)
    if threshold is None:
        threshold, calibrated = calibrated_threshold(run_dir, measure, step)
        checked = calibrated if checked is None else checked
    if not math.isfinite(threshold):
        raise ExitError("--threshold: must be a finite number")
    clf = load_classifier(model, run_dir) if measure == "classifier" else None
    try:
        depth.set_exit_policy(measure, threshold, clf, checked)
    except ValueError as e:
        raise ExitError(f"--exit-layers: {e}") from None
    return threshold, checked


def check_cost(model, measure: str) -> float:
    """One exit's confidence check against one layer, in weights read per decoded token (at
    small batches decoding is a pass over the weights): the LM head for softmax, about a vector
    for the state, halting and classifier measures."""
    layer = sum(p.numel() for p in early_exit_depth(model).layers[0].parameters())
    check = model.head.weight.numel() if measure == "softmax" else 4 * model.cfg.d_model
    return check / layer


@torch.no_grad()
def select_checked_exits(model, windows_NL: Tensor, measure: str, threshold: float,
                         batch_size: int = 8) -> list[int]:
    """The exits whose confidence check pays for itself at `threshold`. With every exit checked,
    over `windows_NL` (teacher-forced; exits and state copying as in decoding), exit k stays
    when the layers its exiting tokens skip outweigh what its check costs every token that
    reaches it: exiting(k) x (n - k) >= reaching(k) x check_cost. A cheap check (state,
    halting, classifier) keeps every exit that fires; the softmax check, an LM head, keeps
    only the exits where many tokens leave. The windows should not be the calibration
    prompts (calibrate-exit takes them from the training split)."""
    depth = early_exit_depth(model)
    n = model.cfg.n_layers
    depth.set_exit_policy(measure, threshold, depth.classifier)
    counts = torch.zeros(n + 1, dtype=torch.float64)
    for s in range(0, windows_NL.shape[0], batch_size):
        ex = model(windows_NL[s:s + batch_size]).aux.tokens["exit_layer"]
        counts += torch.bincount(ex.flatten().cpu(), minlength=n + 1).double()
    cost = check_cost(model, measure)
    kept = [layer for layer in depth.exit_at[:-1]
            if counts[layer] > 0 and counts[layer] * (n - layer) >= counts[layer:].sum() * cost]
    return kept


# -- the classifier ----------------------------------------------------------------------------
def train_classifier(model, windows_NL: Tensor, *, steps: int, batch_size: int, lr: float = 1e-3, seed: int = 0,
                     log: Callable[[str], None] = print) -> tuple[ExitClassifier, dict]:
    """Fit the exit classifier on `windows_NL` with the model frozen: label = the exit's top
    prediction equals the last layer's. Returns it and its training facts."""
    depth = early_exit_depth(model)
    p = next(model.parameters())
    torch.manual_seed(seed)
    clf = ExitClassifier(len(depth.exit_at), model.cfg.d_model).to(device=p.device, dtype=torch.float32)
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    depth.set_exit_policy("none", 1.0)
    model.eval()
    g = torch.Generator().manual_seed(seed)
    t0, loss = time.time(), torch.zeros(())
    for step in range(1, steps + 1):
        idx = torch.randint(0, windows_NL.shape[0], (batch_size,), generator=g)
        with torch.no_grad():
            _, aux = model.features(windows_NL[idx].to(p.device))
            states = aux.exits.states
            final = model.readout.logits(states[-1]).argmax(-1)
            labels = [(model.readout.logits(h).argmax(-1) == final).float() for h in states[:-1]]
        loss = sum(F.binary_cross_entropy_with_logits(clf.logits(h.float(), k).float(), y)
                   for k, (h, y) in enumerate(zip(states[:-1], labels))) / max(1, len(labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, steps // 10) == 0 or step == steps:
            log(f"classifier step {step}/{steps}: loss {float(loss):.4f} ({time.time() - t0:.0f} s)")
    return clf.eval(), {"steps": steps, "batch_size": batch_size, "lr": lr, "final_loss": round(float(loss), 5)}


# -- Learn-then-Test ---------------------------------------------------------------------------
def _log_binom_cdf(k: int, n: int, p: float) -> float:
    """log P(Binomial(n, p) <= k)."""
    if k >= n:
        return 0.0
    if k < 0:
        return -math.inf
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
             + (n - i) * math.log1p(-p) for i in range(k + 1)]
    m = max(terms)
    return m + math.log(sum(math.exp(t - m) for t in terms))


def hoeffding_bentkus_p(mean_risk: float, n: int, delta: float) -> float:
    """p-value of H0: expected risk > delta, from the mean of n independent risks in [0, 1]
    (LTT, Angelopoulos et al. 2021, Prop. 3: the smaller of the Hoeffding and Bentkus bounds)."""
    if mean_risk >= delta:
        return 1.0
    r = max(mean_risk, 1e-12)
    kl = r * math.log(r / delta) + (1 - r) * math.log((1 - r) / (1 - delta))
    hoeffding = math.exp(-n * kl)
    bentkus = math.e * math.exp(_log_binom_cdf(math.ceil(n * mean_risk), n, delta))
    return min(1.0, hoeffding, bentkus)


def default_grid(measure: str) -> list[float]:
    """Candidate thresholds, most conservative first."""
    if measure == "state":  # a cosine, which saturates near 1: steps even in log(1 - cosine)
        return [1.0] + [round(1.0 - 10 ** (-4 + 0.05 * i), 6) for i in range(67)]  # 0.9999 .. 0.8
    return [round(1.0 - 0.02 * i, 4) for i in range(50)]  # 1.0 .. 0.02


PROMPT_PARTS = ("calibration", "test")


def exit_prompts(val_N: Tensor, n: int, span: int, part: str) -> Tensor:
    """n disjoint prompts of `span` tokens, evenly spread over one half of the validation
    tokens `val_N`: the first half for `calibration`, the second for `test` (held out from
    calibration). Raises ExitError when that half holds fewer than n x span tokens."""
    if part not in PROMPT_PARTS:
        raise ValueError(f"part {part!r} is not one of {', '.join(PROMPT_PARTS)}")
    half = val_N.numel() // 2
    tokens = val_N[:half] if part == "calibration" else val_N[half:]
    if tokens.numel() < n * span:
        raise ExitError(f"{n} prompts of {span} tokens need {n * span:,} validation tokens; the {part} half of the "
                        f"validation split has {tokens.numel():,}")
    step = tokens.numel() // n  # evenly spread, disjoint: independent samples
    return torch.stack([tokens[i * step:i * step + span] for i in range(n)])


@torch.no_grad()
def full_continuations(model, prompts_NP: Tensor, new_tokens: int) -> Tensor:
    """The full model's greedy continuations of the prompts (every layer): N x (P + G)."""
    from lmtrain.generate import generate

    depth = early_exit_depth(model)
    with depth.full_depth():
        return generate(model, prompts_NP, new_tokens, temperature=0)


@torch.no_grad()
def agreement(model, seqs_NS: Tensor, prompt_len: int, batch_size: int = 16) -> tuple[Tensor, float]:
    """Under the model's current exit policy, over the full model's sequences: per sequence,
    the share of continuation positions whose predicted next token is the sequence's own (the
    full model's), and the mean exit layer at those positions."""
    shares, layers = [], []
    for s in range(0, seqs_NS.shape[0], batch_size):
        seq = seqs_NS[s:s + batch_size]
        out = model(seq[:, :-1])
        pred = out.logits_BLV[:, prompt_len - 1:].argmax(-1)
        shares.append((pred == seq[:, prompt_len:]).float().mean(1))
        ex = out.aux.tokens.get("exit_layer")
        layers.append(ex[:, prompt_len - 1:].float() if ex is not None
                      else torch.full_like(pred, model.cfg.n_layers, dtype=torch.float32))
    return torch.cat(shares), float(torch.cat(layers).mean())


def calibrate(model, prompts_NP: Tensor, *, measure: str, delta: float, epsilon: float, new_tokens: int,
              grid: Optional[Sequence[float]] = None, select_windows: Optional[Tensor] = None,
              checked: Optional[Sequence[int]] = None, log: Callable[[str], None] = print) -> dict:
    """Learn-then-Test over `grid` (see the module docstring). Returns the report: the chosen
    threshold (None when even the most conservative one fails), and every tested threshold's
    mean risk, p-value and mean exit layer. The exits checked at each threshold: `checked`
    (None: all), or with `select_windows` those whose check pays for itself on them
    (`select_checked_exits`; the windows are not the prompts, so each tested hypothesis is
    fixed before the prompts are seen and the guarantee holds)."""
    if not 0 < delta < 1 or not 0 < epsilon < 1:
        raise ExitError("--delta and --epsilon: must be in (0, 1)")
    depth = early_exit_depth(model)
    seqs = full_continuations(model, prompts_NP, new_tokens)
    n = prompts_NP.shape[0]
    rows, chosen, no_check = [], None, None
    for t in grid or default_grid(measure):
        at = select_checked_exits(model, select_windows, measure, t) if select_windows is not None else checked
        depth.set_exit_policy(measure, t, depth.classifier, at)
        if at is not None and not at:  # no exit checked: full depth, whatever the threshold (computed once)
            no_check = no_check or agreement(model, seqs, prompts_NP.shape[1])
            share, mean_layer = no_check
        else:
            share, mean_layer = agreement(model, seqs, prompts_NP.shape[1])
        mean_risk = float((1 - share).mean())
        p = hoeffding_bentkus_p(mean_risk, n, delta)
        rows.append({"threshold": t, "risk": round(mean_risk, 5), "p_value": p,
                     "mean_exit_layer": round(mean_layer, 3), "checked_exits": None if at is None else list(at)})
        log(f"threshold {t:.4f}: risk {mean_risk:.4f}, p {p:.3g}, mean exit layer {mean_layer:.2f} of "
            f"{model.cfg.n_layers}, exits checked: {describe_checked(at)}")
        if p > epsilon:
            break
        chosen = rows[-1]
    depth.set_exit_policy("none", 1.0)
    return {"measure": measure, "delta": delta, "epsilon": epsilon, "prompts": n, "new_tokens": new_tokens,
            "risk_definition": "share of the full model's greedy continuation tokens that the early-exit model, "
                               "over the same tokens, does not predict",
            "threshold": None if chosen is None else chosen["threshold"],
            "risk": None if chosen is None else chosen["risk"],
            "mean_exit_layer": None if chosen is None else chosen["mean_exit_layer"],
            "checked_exits": None if chosen is None else chosen["checked_exits"],
            "exit_layers": "auto" if select_windows is not None else ("all" if checked is None else list(checked)),
            "n_layers": model.cfg.n_layers, "tested": rows, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


# -- quality against depth ---------------------------------------------------------------------
@torch.no_grad()
def exit_tradeoff(model, windows_NL1: Tensor, *, measure: str, thresholds: Sequence[float], batch_size: int = 8,
                  log: Callable[[str], None] = print) -> dict:
    """Validation loss (teacher-forced, per-token exits with state copying) and the mean exit
    layer at each threshold, beside the full-depth model and each exit alone (every token
    leaving there). `windows_NL1`: N windows of L + 1 tokens."""
    depth = early_exit_depth(model)
    classifier = depth.classifier
    n_layers = model.cfg.n_layers
    device = next(model.parameters()).device

    def evaluate(policy_measure: str, threshold: float) -> tuple[float, float, float, dict]:
        depth.set_exit_policy(policy_measure, threshold, classifier)
        total, count, layers, computed, per_exit = 0.0, 0, 0.0, 0.0, {}
        for s in range(0, windows_NL1.shape[0], batch_size):
            w = windows_NL1[s:s + batch_size].to(device)
            x, y = w[:, :-1], w[:, 1:]
            h, aux = model.features(x)
            nll = F.cross_entropy(model.head(h).float().flatten(0, 1), y.flatten(), reduction="sum")
            total, count = total + float(nll), count + y.numel()
            ex = aux.tokens.get("exit_layer")
            layers += float(ex.float().sum()) if ex is not None else n_layers * y.numel()
            frac = aux.stats.get("exit/computed_fraction")
            computed += (float(frac) if frac is not None else 1.0) * y.numel()
            if policy_measure == "none":
                for n, state in zip(aux.exits.layers, aux.exits.states):
                    logits = model.readout.logits(state).float()
                    per_exit[n] = per_exit.get(n, 0.0) + float(F.cross_entropy(logits.flatten(0, 1), y.flatten(),
                                                                                reduction="sum"))
        return total / count, layers / count, computed / count, {n: v / count for n, v in per_exit.items()}

    full_loss, _, _, per_exit = evaluate("none", 1.0)
    log(f"full depth: loss {full_loss:.4f}; each exit alone: "
        + ", ".join(f"{n}: {v:.4f}" for n, v in per_exit.items()))
    rows = []
    for t in thresholds:
        loss, mean_layer, computed, _ = evaluate(measure, t)
        rows.append({"threshold": t, "loss": round(loss, 5), "loss_vs_full": round(loss / full_loss - 1, 5),
                     "mean_exit_layer": round(mean_layer, 4), "layer_share": round(mean_layer / n_layers, 4),
                     "computed_fraction": round(computed, 4)})
        log(f"threshold {t:g}: loss {loss:.4f} ({100 * (loss / full_loss - 1):+.2f}%), mean exit layer "
            f"{mean_layer:.2f} of {n_layers}")
    depth.set_exit_policy("none", 1.0)
    return {"measure": measure, "tokens": int(windows_NL1[:, 1:].numel()), "n_layers": n_layers,
            "full_loss": round(full_loss, 5), "exit_loss": {str(n): round(v, 5) for n, v in per_exit.items()},
            "thresholds": rows, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def tradeoff_markdown(rep: dict) -> str:
    lines = [f"Early exit by `{rep['measure']}` on {rep['tokens']:,} validation tokens (teacher-forced, exited "
             f"tokens' states copied upward); full depth ({rep['n_layers']} layers): loss {rep['full_loss']:.4f}.", "",
             "| threshold | loss | vs full depth | mean exit layer | share of layers | computed |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rep["thresholds"]:
        lines.append(f"| {r['threshold']:g} | {r['loss']:.4f} | {100 * r['loss_vs_full']:+.2f}% | "
                     f"{r['mean_exit_layer']:.2f} | {100 * r['layer_share']:.1f}% | "
                     f"{100 * r['computed_fraction']:.1f}% |")
    lines += ["", "Each exit alone (every token leaves there): "
              + ", ".join(f"layer {n}: {v:.4f}" for n, v in rep["exit_loss"].items()), ""]
    return "\n".join(lines)
