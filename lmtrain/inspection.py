"""`lmtrain inspect RUN_OR_CKPT`: what a checkpoint holds and what its heads learned.

Prints the checkpoint, step and model (every axis with its options), then one table per
head statistic (`head_stats` hooks, lmtrain/model/hooks.py: the spans of adaptive-span
heads, the slopes of exp_decay, for example), layers by heads, with a summary line per
statistic, and each learned function of the distance (`distance_profile` hooks: a position
scheme's bias, the DA-Transformer's rescaling) at distances 0, 1, 2, 4, ... up to 32x the
training length. For models that report per-token
statistics (`Aux.tokens`: ACT's steps per token) it measures them on windows of the run's
validation split and prints their distribution and the tokens at either end.
"""

from __future__ import annotations

from dataclasses import fields

from lmtrain.model.axes import AXES
from lmtrain.train.checkpoint import load_trained


def number(v: float, big: bool) -> str:
    """One decimal for large quantities (spans in positions), 4 significant digits for small
    ones (slopes, widths of a few positions, DA weights)."""
    return f"{v:.1f}" if big else f"{v:.4g}"


def stat_table(name: str, rows, limit: float | None) -> list[str]:
    import torch

    flat = torch.cat(list(rows))
    big = float(flat.abs().max()) >= 10 if flat.numel() else True
    n_heads = max(len(r) for r in rows)
    lines = [f"{name} per layer and head" + (f" (max {limit:g})" if limit else "") + ":", "",
             "| layer | " + " | ".join(f"head {h}" for h in range(n_heads)) + " | mean |",
             "|---:|" + "---:|" * (n_heads + 1)]
    for i, r in enumerate(rows):
        cells = [number(float(v), big) for v in r] + [number(float(r.mean()), big)]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    mean = float(flat.mean())
    share = f" ({100 * mean / limit:.1f}% of {limit:g})" if limit else ""
    lines += ["", f"all heads: mean {number(mean, big)}{share}, median {number(float(flat.median()), big)}, "
              f"min {number(float(flat.min()), big)}, max {number(float(flat.max()), big)}"]
    return lines


def profile_distances(seq_len: int) -> "torch.Tensor":  # noqa: F821
    """Where learned functions of the distance are shown: 0, 1, 2, 4, ... up to 32x the
    training length (the longest evaluation of the extrapolation study)."""
    import torch

    top, d = 32 * max(1, seq_len), [0]
    while d[-1] * 2 <= top:
        d.append(max(1, d[-1] * 2))
    return torch.tensor(d)


def profile_table(name: str, rows, d) -> list[str]:
    """One line per layer and head: the learned function at the distances d."""
    lines = [f"{name} against the distance i - j, per layer and head:", "",
             "| layer | head | " + " | ".join(f"d={int(x)}" for x in d) + " |", "|---:|---:|" + "---:|" * len(d)]
    for i, r in enumerate(rows):
        for h, values in enumerate(r):
            lines.append(f"| {i} | {h} | " + " | ".join(f"{float(v) + 0.0:.3g}" for v in values) + " |")  # no -0
    return lines


def token_sections(t, windows: int) -> list[str]:
    """The distribution of each per-token statistic over `windows` validation windows."""

    from data_pipelines.shards import DataDirError
    from lmtrain.evaluate.tokens import distribution_lines, extremes_lines, measure_all
    from lmtrain.train.checkpoint import tokenizer_path
    from lmtrain.train.data import WindowDataset, validation_sample

    L = t.cfg.data.seq_len
    try:
        val_set = WindowDataset(t.cfg.data.dir, "val", L)
    except (DataDirError, FileNotFoundError, OSError):
        return ["", f"per-token statistics need the run's validation split; {t.cfg.data.dir} is not a prepared "
                    "data dir here (run from the directory the model was trained in)"]
    if len(val_set) < 1:
        return ["", f"the validation split of {t.cfg.data.dir} is shorter than one window of {L} tokens"]
    ids = validation_sample(val_set, windows)[:, :-1]
    stats, scalars = measure_all(t.model, ids)
    out = forward_stat_lines(scalars, ids.shape[0], L)
    if not stats:
        return out
    limits = t.model.depth.token_stat_limits()
    decode = None
    tok_path = tokenizer_path(t)
    if tok_path.is_file():
        from data_pipelines.tokenizer import load_tokenizer

        tok = load_tokenizer(tok_path)
        decode = lambda i: tok.decode([i])  # noqa: E731
    for name, values in stats.items():
        if values.dtype.is_floating_point:  # a continuous statistic: a summary line
            out += ["", f"{name}: mean {float(values.mean()):.3f}, max {float(values.max()):.3f} "
                        f"over {values.numel():,} tokens"]
            continue
        limit = limits.get(name)
        out += ["", f"{name} per token, {ids.shape[0]} validation windows of {L} tokens ({t.cfg.data.dir}):", ""]
        out += distribution_lines(name, values, int(limit) if limit else None)
        if decode is not None:
            out += extremes_lines(name, ids, values, decode)
    return out


def forward_stat_lines(scalars: dict[str, float], windows: int, L: int) -> list[str]:
    """Scalar statistics of the forward pass on validation windows, one row per group and
    layer (`kind/layerN/stat` names: LSH's occupancy and recovered mass), stats as columns."""
    if not scalars:
        return []
    rows: dict[str, dict[str, float]] = {}
    for name, value in scalars.items():
        group, _, stat = name.rpartition("/")
        rows.setdefault(group or "model", {})[stat] = value
    cols = list(dict.fromkeys(c for r in rows.values() for c in r))
    out = ["", f"forward statistics, mean over {windows} validation windows of {L} tokens:", "",
           "| | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for group, r in rows.items():
        out.append(f"| {group} | " + " | ".join(f"{r[c]:.3f}" if c in r else "-" for c in cols) + " |")
    return out


def axis_line(node) -> str:
    """`kind (option=value, ...)` of an axis node."""
    opts = ", ".join(f"{f.name}={getattr(node, f.name)}" for f in fields(node) if f.name != "kind")
    return node.kind + (f" ({opts})" if opts else "")


def inspect(source, windows: int = 16, pattern_png: str | None = None) -> str:
    t = load_trained(source, device="cpu")
    m = t.cfg.model
    params = sum(p.numel() for p in t.model.parameters())
    out = [f"checkpoint   {t.checkpoint} (step {t.step})",
           f"model        {m.n_layers} layers x {m.n_heads} heads, d_model {m.d_model}, d_ff {m.d_ff}, "
           f"{params:,} parameters"]
    out += [f"{axis:<12} {axis_line(getattr(m, axis))}" for axis in AXES]
    stats, limits = t.model.head_stats()
    d = profile_distances(t.cfg.data.seq_len)
    profiles = t.model.distance_profiles(d)
    if not stats and not profiles:
        out += ["", "no module of this model reports learned per-head statistics"]
    for name, rows in stats.items():
        out += [""] + stat_table(name, rows, limits.get(name))
    for name, rows in profiles.items():
        out += [""] + profile_table(name, rows, d)
    out += token_sections(t, windows)
    if pattern_png:
        from lmtrain.evaluate.patterns import picture_length, write_pattern_png

        L = picture_length(t.cfg.data.seq_len)
        written = write_pattern_png(t.model, t.cfg.data.seq_len, pattern_png,
                                    title=f"{t.run_dir.name}: patterns at L={L}")
        out += ["", f"attention patterns at L={L}: {written}" if written else
                "attention patterns: no layer of this model has one (a --pattern-png is drawn for sparse kinds)"]
    return "\n".join(out)
