"""Pictures of attention patterns: which keys each query sees, per layer (and head group).

Drawn at a small length (`picture_length`: the training length, at most 512), where the
structure is visible: windows as bands, strided columns, global rows and columns, random
blocks. Used by training (a TensorBoard image at the start and RUN/attention_patterns.png)
and by `lmtrain inspect --pattern-png`.
"""

from __future__ import annotations

from pathlib import Path

import torch

PICTURE_MAX_LENGTH = 512


def picture_length(seq_len: int) -> int:
    return max(2, min(seq_len, PICTURE_MAX_LENGTH))


def _distinct_heads(mask_HLL: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(label, L x L) per group of heads that see the same pattern."""
    out: list[tuple[list[int], torch.Tensor]] = []
    for h, m in enumerate(mask_HLL):
        for heads, seen in out:
            if torch.equal(seen, m):
                heads.append(h)
                break
        else:
            out.append(([h], m))
    if len(out) == 1:
        return [("all heads", out[0][1])]
    return [(("head " if len(hs) == 1 else "heads ") + ",".join(map(str, hs)), m) for hs, m in out]


def pattern_figure(masks: list[torch.Tensor], title: str = ""):
    """A grid: one row per layer, one panel per distinct head pattern; black = visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [_distinct_heads(m) for m in masks]
    cols = max(len(r) for r in rows)
    L = masks[0].shape[-1]
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.6 * cols, 2.6 * len(rows)), squeeze=False, dpi=100)
    for i, row in enumerate(rows):
        for j in range(cols):
            ax = axes[i][j]
            if j >= len(row):
                ax.axis("off")
                continue
            label, m = row[j]
            density = float(m.sum()) / (L * (L + 1) / 2)
            ax.imshow(m.numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"layer {i}, {label}\ndensity {density:.3f}", fontsize=8)
            ax.set_xlabel("key", fontsize=7)
            ax.set_ylabel("query", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.suptitle(title or f"attention patterns at L={L}", fontsize=9)
    fig.tight_layout()
    return fig


def write_pattern_png(model, seq_len: int, path: str | Path, title: str = "") -> Path | None:
    """The model's patterns as a PNG (mode 0644); None when no layer has a pattern."""
    masks = model.pattern_masks(picture_length(seq_len))
    if not masks:
        return None
    import matplotlib.pyplot as plt

    fig = pattern_figure(masks, title)
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    path.chmod(0o644)
    return path
