"""Per-token statistics a model reports in `Aux.tokens` (ACT: the steps each position took),
measured on a fixed sample of text: the distribution as a table, and the sample as a picture
of its tokens coloured by their value.

Used by the training callback (TensorBoard histogram and image at each validation) and by
`lmtrain inspect`.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor


@torch.no_grad()
def measure(model, windows_NL: Tensor, batch_size: int = 8) -> dict[str, Tensor]:
    """name -> N x L values of every per-token statistic the model reports, over `windows_NL`
    (each window a full-length sequence, so positions see their usual context). Integer
    statistics (counts such as ACT steps) keep an integer dtype."""
    return measure_all(model, windows_NL, batch_size)[0]


@torch.no_grad()
def measure_all(model, windows_NL: Tensor, batch_size: int = 8) -> tuple[dict[str, Tensor], dict[str, float]]:
    """`measure`'s per-token statistics, and the mean over batches of every scalar statistic
    the forward reports (aux.stats: LSH's bucket occupancy and recovered attention mass)."""
    was_training = model.training
    model.eval()
    out: dict[str, list[Tensor]] = {}
    scalars: dict[str, list[float]] = {}
    try:
        for start in range(0, windows_NL.shape[0], batch_size):
            _, aux = model.features(windows_NL[start : start + batch_size])
            for name, values in aux.tokens.items():
                out.setdefault(name, []).append(values.detach().cpu())
            for name, value in aux.stats.items():
                if value.numel() == 1:
                    scalars.setdefault(name, []).append(float(value))
    finally:
        model.train(was_training)
    return ({name: torch.cat(parts) for name, parts in out.items()},
            {name: sum(v) / len(v) for name, v in scalars.items()})


def integer_histogram(values: Tensor, limit: Optional[int] = None) -> dict[int, int]:
    """value -> count, for every integer from 1 to max(limit, largest value)."""
    v = values.round().long().flatten()
    top = max(int(v.max()) if v.numel() else 1, limit or 1)
    counts = torch.bincount(v, minlength=top + 1)
    return {k: int(counts[k]) for k in range(1, top + 1)}


def distribution_lines(name: str, values: Tensor, limit: Optional[int] = None) -> list[str]:
    """A markdown table of an integer statistic's distribution, with a summary line."""
    hist = integer_histogram(values, limit)
    total = max(1, sum(hist.values()))
    lines = [f"| {name} | tokens | share | |", "|---:|---:|---:|:---|"]
    for k, n in hist.items():
        lines.append(f"| {k} | {n:,} | {100 * n / total:.1f}% | {'#' * round(40 * n / total)} |")
    v = values.float()
    share = f" = {100 * float(v.mean()) / limit:.1f}% of {limit}" if limit else ""
    lines += ["", f"{name}: mean {float(v.mean()):.2f}{share}, median {float(v.median()):.0f}, "
              f"max {float(v.max()):.0f}, over {v.numel():,} tokens"]
    return lines


def extremes_lines(name: str, ids_NL: Tensor, values_NL: Tensor, decode: Callable[[int], str], k: int = 8,
                   min_count: int = 5) -> list[str]:
    """The tokens with the highest and lowest mean value (each seen at least `min_count` times)."""
    ids, vals = ids_NL.flatten().long(), values_NL.flatten().double()
    n = int(ids.max()) + 1 if ids.numel() else 1
    count = torch.bincount(ids, minlength=n)
    mean = torch.bincount(ids, weights=vals, minlength=n) / count.clamp(min=1)
    seen = (count >= min_count).nonzero().flatten()
    if seen.numel() == 0:
        return []
    order = seen[torch.argsort(mean[seen], descending=True)]

    def fmt(ts):
        return ", ".join(f"{visible(decode(int(t)))!s} {float(mean[t]):.2f} ({int(count[t])}x)" for t in ts)

    return [f"highest mean {name}: {fmt(order[:k])}", f"lowest mean {name}:  {fmt(order.flip(0)[:k])}"]


def visible(text: str) -> str:
    """A token's text with its whitespace shown."""
    return text.replace(" ", "\u00b7").replace("\n", "\u21b5").replace("\t", "\u2192") or "\u2205"


def sample_figure(tokens: Sequence[str], values: Sequence[float], *, name: str, limit: Optional[float], title: str,
                  per_line: int = 12, max_tokens: int = 96):
    """The first `max_tokens` tokens of a text in reading order, each on a cell coloured by its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens, values = list(tokens)[:max_tokens], np.asarray(list(values)[:max_tokens], dtype=float)
    lines = (len(tokens) + per_line - 1) // per_line
    top = limit or (float(values.max()) if len(values) else 1.0)
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(per_line * 0.95, 0.45 * lines + 1.0), dpi=100)
    for i, (tok, v) in enumerate(zip(tokens, values)):
        row, col = divmod(i, per_line)
        colour = cmap(min(1.0, v / top) if top else 0.0)
        ax.add_patch(plt.Rectangle((col, -row - 1), 0.96, 0.9, color=colour))
        text = visible(tok)
        text = text if len(text) <= 9 else text[:8] + "\u2026"
        ax.text(col + 0.48, -row - 0.55, f"{text}\n{v:.0f}", ha="center", va="center", fontsize=6.5,
                color="white" if v < top / 2 else "black", family="monospace")
    ax.set_xlim(0, per_line)
    ax.set_ylim(-lines - 0.05, 0)
    ax.axis("off")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, top))
    fig.colorbar(sm, ax=ax, fraction=0.02, pad=0.01, label=name)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
