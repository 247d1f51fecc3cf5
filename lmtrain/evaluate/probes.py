"""Long-range probes on trained models: `lmtrain eval-retrieval`.

Perplexity on short-range text cannot tell a window from full attention; these can.

passkey  A number (the key) hidden at a chosen depth of filler text, then the question; the
         model must produce the key (Mohtashami & Jaggi, 2023). A trial is scored in one
         teacher-forced forward pass: it is retrieved when every answer token is the argmax
         given the correct prefix, which is exactly when greedy decoding would produce it.
         Reported per (length, depth): accuracy over the trials, and the answer's mean
         log-probability per token (informative where accuracy is 0 or 1 everywhere).
copy     Copy-task documents (data_pipelines/probes.py: x, <|copy|>, x) at each length, for a
         model trained on `data.source: copy`: accuracy and loss on the copied half.

Trials are drawn from `--seed` alone, so two models see exactly the same prompts.
Files (into RUN/eval/ and --out): retrieval_TASK.json, retrieval_TASK.md, and for passkey a
heatmap retrieval_passkey.png (depth x length, accuracy).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from data_pipelines.tokenizer import encode
from lmtrain.evaluate.length import EvalError

# The passkey prompt of Mohtashami & Jaggi (landmark attention), in three parts around the filler.
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
PASSKEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
PASSKEY_QUESTION = "What is the pass key? The pass key is "


@dataclass
class PasskeyTemplate:
    intro: str = PASSKEY_INTRO
    filler: str = PASSKEY_FILLER
    line: str = PASSKEY_LINE  # {key} is replaced by the key
    question: str = PASSKEY_QUESTION
    digits: int = 5


def copy_scores(logits_BLV: torch.Tensor, y_BL: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, accuracy) on the copied half of copy-task windows (inputs of seq_len tokens)."""
    from data_pipelines.probes import copy_targets

    sl = copy_targets(seq_len)
    lg, y = logits_BLV[:, sl].float(), y_BL[:, sl]
    loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), y.reshape(-1))
    return loss, (lg.argmax(-1) == y).float().mean()


def passkey_prompt(tok, template: PasskeyTemplate, length: int, depth: float, key: str,
                   filler_ids: Optional[list[int]] = None) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): the key line at `depth` (0: right after the intro, 1: just
    before the question) of a prompt of exactly `length` tokens with the answer. Filler: the
    template's sentence repeated, or `filler_ids` (tokens of real text) in order."""
    intro, line = encode(tok, template.intro), encode(tok, template.line.format(key=key))
    # The question's trailing whitespace goes with the answer (as lm-evaluation-harness moves it
    # into the continuation): byte-level BPE writes " 12345" as one word, so the answer's tokens
    # are the ones the key line holds, which a model can copy; a lone space token then "12345"
    # never occurs in training text.
    ask = template.question.rstrip()
    question, answer = encode(tok, ask), encode(tok, template.question[len(ask):] + key)
    n_fill = length - len(intro) - len(line) - len(question) - len(answer)
    if n_fill < 0:
        raise EvalError(f"--lengths: {length} tokens cannot hold the passkey prompt "
                        f"({length - n_fill} tokens without filler); give longer lengths")
    if filler_ids is None:
        unit = encode(tok, template.filler)
        filler_ids = unit * (n_fill // max(1, len(unit)) + 1)
    elif len(filler_ids) < n_fill:
        raise EvalError(f"--filler data: {len(filler_ids):,} tokens of filler, fewer than the {n_fill:,} needed")
    filler = filler_ids[:n_fill]
    at = round(depth * n_fill)
    return intro + filler[:at] + line + filler[at:] + question, answer


@torch.no_grad()
def answer_scores(model, prompt: list[int], answer: list[int], device: str) -> tuple[bool, float]:
    """(retrieved, mean log-probability per answer token), teacher-forced in one pass."""
    ids = torch.tensor([prompt + answer], device=device)
    logits = model(ids[:, :-1]).logits_BLV[0, len(prompt) - 1 :].float()
    target = ids[0, len(prompt) :]
    logp = logits.log_softmax(-1).gather(-1, target[:, None]).squeeze(-1)
    return bool((logits.argmax(-1) == target).all()), float(logp.mean())


def _depths(n: int) -> list[float]:
    return [round(x, 3) for x in np.linspace(0.0, 1.0, n)] if n > 1 else [0.5]


def passkey_eval(model, tok, lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int, device: str,
                 template: PasskeyTemplate, filler_ids: Optional[list[int]] = None,
                 progress: Callable[[], None] = lambda: None) -> list[dict]:
    """One result per (length, depth): accuracy and mean answer log-probability over `trials` keys."""
    rng = np.random.default_rng(seed)
    keys = [str(k) for k in rng.integers(10 ** (template.digits - 1), 10 ** template.digits, size=trials)]
    cells = []
    for L in lengths:
        # Real-text filler: one random stretch per trial, the same for every model and depth.
        starts = rng.integers(0, max(1, len(filler_ids) - L), size=trials) if filler_ids is not None else None
        for d in depths:
            hits, logps = [], []
            for t, key in enumerate(keys):
                fill = filler_ids[int(starts[t]):] if starts is not None else None
                prompt, answer = passkey_prompt(tok, template, L, d, key, fill)
                ok, lp = answer_scores(model, prompt, answer, device)
                hits.append(ok)
                logps.append(lp)
                progress()
            cells.append({"length": L, "depth": d, "accuracy": float(np.mean(hits)), "logprob": float(np.mean(logps)),
                          "trials": trials})
    return cells


@torch.no_grad()
def copy_eval(model, lengths: Sequence[int], trials: int, seed: int, device: str, symbols: int,
              progress: Callable[[], None] = lambda: None) -> list[dict]:
    """Accuracy and loss on the copied half of `trials` fresh copy documents per length."""
    from data_pipelines.probes import copy_documents, copy_half

    cells = []
    for L in lengths:
        if copy_half(L) > symbols:
            cells.append({"length": L, "accuracy": None, "loss": None, "trials": 0,
                          "reason": f"{symbols} symbols cannot fill a half of {copy_half(L)}"})
            continue
        docs = torch.from_numpy(copy_documents(trials, L, symbols, seed=seed + 7919 * L))
        targets = docs.roll(-1, dims=1)  # the last target (the next document's first token) is not scored
        losses, accs = [], []
        for x, y in zip(docs, targets):
            loss, acc = copy_scores(model(x[None].to(device)).logits_BLV, y[None].to(device), L)
            losses.append(float(loss))
            accs.append(float(acc))
            progress()
        cells.append({"length": L, "accuracy": float(np.mean(accs)), "accuracy_sd": float(np.std(accs)),
                      "loss": float(np.mean(losses)), "trials": trials, "chance": 1.0 / symbols})
    return cells


def markdown(rep: dict) -> str:
    lines = [f"Retrieval ({rep['task']}): {rep['trials']} trials per cell, seed {rep['seed']}, {rep['date']}.", ""]
    lengths = rep["lengths"]
    for run in rep["runs"]:
        lines += [f"**{run['name']}** ({run['attention']}, trained at L={run['train_length']}, step {run['step']})", ""]
        if rep["task"] == "passkey":
            by = {(c["length"], c["depth"]): c for c in run["cells"]}
            lines += ["accuracy (answer log-prob per token) | " + " | ".join(f"L={L}" for L in lengths) + " |",
                      "|---|" + "---:|" * len(lengths)]
            for d in rep["depths"]:
                row = [f"{by[(L, d)]['accuracy']:.2f} ({by[(L, d)]['logprob']:.2f})" for L in lengths]
                lines.append(f"| depth {d:.2f} | " + " | ".join(row) + " |")
            mean = [np.mean([by[(L, d)]["accuracy"] for d in rep["depths"]]) for L in lengths]
            lines.append("| **mean** | " + " | ".join(f"**{m:.2f}**" for m in mean) + " |")
        else:
            lines += ["| | " + " | ".join(f"L={L}" for L in lengths) + " |", "|---|" + "---:|" * len(lengths)]
            cells = run["cells"]
            lines.append("| accuracy | " + " | ".join("-" if c["accuracy"] is None else
                                                    f"{c['accuracy']:.3f} ± {c['accuracy_sd']:.3f}"
                                                    for c in cells) + " |")
            losses = ("-" if c["loss"] is None else f"{c['loss']:.3f}" for c in cells)
            lines.append("| loss | " + " | ".join(losses) + " |")
            chance = next((c["chance"] for c in cells if c.get("chance")), None)
            if chance:
                lines += ["", f"chance accuracy: {chance:.4f} (1 / symbols)"]
        lines.append("")
    return "\n".join(lines)


def heatmap(rep: dict, path: Path) -> Path:
    """Passkey accuracy, depth (rows) x length (columns), one panel per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, lengths, depths = rep["runs"], rep["lengths"], rep["depths"]
    fig, axes = plt.subplots(1, len(runs), figsize=(1.2 + 0.9 * len(lengths) * len(runs), 0.6 + 0.45 * len(depths)),
                             squeeze=False)
    for ax, run in zip(axes[0], runs):
        by = {(c["length"], c["depth"]): c["accuracy"] for c in run["cells"]}
        grid = np.array([[by[(L, d)] for L in lengths] for d in depths])
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
        ax.set_xlabel("length")
        ax.set_ylabel("depth of the key")
        ax.set_title(run["name"], fontsize=9)
        for (r, c), v in np.ndenumerate(grid):
            ax.text(c, r, f"{v:.1f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(rep: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    from lmtrain.evaluate import override_suffix

    stem = out / f"retrieval_{rep['task']}{override_suffix(rep.get('overrides', ()))}"
    files = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    files[0].write_text(json.dumps(rep, indent=2))
    files[1].write_text(markdown(rep))
    if rep["task"] == "passkey":
        files.append(heatmap(rep, stem.with_suffix(".png")))
    for f in files:
        f.chmod(0o644)
    return files


def _filler_tokens(trained, spec: str, need: int) -> Optional[list[int]]:
    """None for the template's sentence; for 'data', tokens of the model's validation split
    with end-of-document tokens removed (real text of the kind the model was trained on)."""
    if spec == "template":
        return None
    from lmtrain.evaluate.runner import text_for

    text = text_for(trained, None if spec == "data" else spec, need)
    ids = np.asarray(text.tokens[: max(need * 4, need + 1)], dtype=np.int64)
    from data_pipelines.shards import read_meta

    eot = int(read_meta(trained.cfg.data.dir)["eot_id"]) if spec == "data" else None
    return [int(t) for t in ids if t != eot]


def evaluate_retrieval(sources: Sequence[str], *, task: str, lengths: Optional[Sequence[int]], depths: int,
                       trials: int, seed: int, filler: str, device: str, log: Callable[[str], None] = print,
                       overrides: Sequence[str] = ()) -> dict:
    """Run the probe on every source; everything the user gave is checked before any model is built.
    `overrides` (`model.*=value`) change how every model computes (`--set`)."""
    from lmtrain.evaluate import override_label
    from lmtrain.train.checkpoint import load_trained, reload_with_model, tokenizer_path

    if trials < 1:
        raise EvalError("--trials: must be at least 1")
    if depths < 1:
        raise EvalError("--depths: must be at least 1")
    trained = [load_trained(s, with_model=False, overrides=overrides) for s in sources]
    if lengths is None:
        base = trained[0].cfg.data.seq_len
        lengths = [base // 2, base, base * 2] if task == "copy" else [base // 4, base // 2, base]
    lengths = sorted(set(lengths))
    if task == "copy" and any(L % 2 or L < 4 for L in lengths):
        raise EvalError("--lengths: the copy task needs even lengths of at least 4")
    from data_pipelines.tokenizer import load_tokenizer

    toks = []
    for t in trained:
        p = tokenizer_path(t)
        if not p.is_file():
            raise EvalError(f"the tokenizer of {t.run_dir} is missing: {p} (its data.dir)")
        tok = load_tokenizer(p)
        if task == "copy" and t.cfg.data.source != "copy":
            raise EvalError(f"--task copy: {t.run_dir} was trained on data.source={t.cfg.data.source}, not on the "
                            "copy task (data.source=copy); its vocabulary has no copy symbols")
        toks.append(tok)
    template = PasskeyTemplate()
    dgrid = _depths(depths)
    cells_per_run = len(lengths) * (len(dgrid) if task == "passkey" else 1) * trials
    log(f"eval-retrieval: {task}, {len(trained)} model(s), lengths {','.join(map(str, lengths))}"
        + (f", {len(dgrid)} depths" if task == "passkey" else "") + f", {trials} trials each")
    from tqdm import tqdm

    bar = tqdm(total=cells_per_run * len(trained), unit="trial", file=sys.stderr, dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    runs, t0 = [], time.time()
    try:
        for t, tok in zip(trained, toks):
            model = reload_with_model(t, device=device).model.eval()
            bar.set_description(t.run_dir.name)
            if task == "passkey":
                fill = _filler_tokens(t, filler, max(lengths) + trials * 8)
                cells = passkey_eval(model, tok, lengths, dgrid, trials, seed, device, template, fill, bar.update)
            else:
                from data_pipelines.probes import copy_symbols

                symbols = copy_symbols(t.cfg.data.copy, t.cfg.data.vocab_size)
                cells = copy_eval(model, lengths, trials, seed, device, symbols, bar.update)
            runs.append({"name": t.run_dir.name + override_label(overrides), "run_dir": str(t.run_dir),
                         "source": str(t.checkpoint), "step": t.step,
                         "attention": _attention_name(t.cfg), "train_length": t.cfg.data.seq_len, "cells": cells})
            del model
    finally:
        bar.close()
    return {"task": task, "lengths": list(lengths), "depths": dgrid if task == "passkey" else None, "trials": trials,
            "overrides": list(overrides), "seed": seed, "filler": filler, "device": device, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "seconds": round(time.time() - t0, 1), "runs": runs}


def _attention_name(cfg) -> str:
    a = cfg.model.attention
    if a.kind != "sparse":
        return a.kind
    spec = "/".join(a.layer_patterns) if a.layer_patterns else a.pattern
    return f"sparse {spec} (W={a.window})"


def log_tensorboard(rep: dict, run_dir: Path, run: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run_dir / "tb")) as w:
        for c in run["cells"]:
            if c.get("accuracy") is None:
                continue
            tag = f"retrieval/{rep['task']}/acc_L{c['length']}" + (f"_d{c['depth']:.2f}" if "depth" in c else "")
            w.add_scalar(tag, c["accuracy"], run["step"])

