"""`lmtrain inspect RUN_OR_CKPT`: what a checkpoint holds and what its heads learned.

Prints the checkpoint, step and model (every axis with its options), then one table per
head statistic (`head_stats` hooks, lmtrain/model/hooks.py: the spans of adaptive-span
heads, for example), layers by heads, with a summary line per statistic. For models that report per-token
statistics (`Aux.tokens`: ACT's steps per token) it measures them on windows of the run's
validation split and prints their distribution and the tokens at either end.
"""

from __future__ import annotations

from dataclasses import fields

from lmtrain.model.axes import AXES
from lmtrain.train.checkpoint import load_trained


def stat_table(name: str, rows, limit: float | None) -> list[str]:
    n_heads = max(len(r) for r in rows)
    lines = [f"{name} per layer and head" + (f" (max {limit:g})" if limit else "") + ":", "",
             "| layer | " + " | ".join(f"head {h}" for h in range(n_heads)) + " | mean |",
             "|---:|" + "---:|" * (n_heads + 1)]
    for i, r in enumerate(rows):
        lines.append(f"| {i} | " + " | ".join(f"{float(v):.1f}" for v in r) + f" | {float(r.mean()):.1f} |")
    import torch

    flat = torch.cat(list(rows))
    mean = float(flat.mean())
    share = f" ({100 * mean / limit:.1f}% of {limit:g})" if limit else ""
    lines += ["", f"all heads: mean {mean:.1f}{share}, median {float(flat.median()):.1f}, "
              f"min {float(flat.min()):.1f}, max {float(flat.max()):.1f}"]
    return lines


def token_sections(t, windows: int) -> list[str]:
    """The distribution of each per-token statistic over `windows` validation windows."""

    from data_pipelines.shards import DataDirError
    from lmtrain.evaluate.tokens import distribution_lines, extremes_lines, measure
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
    stats = measure(t.model, ids)
    if not stats:
        return []
    limits = t.model.depth.token_stat_limits()
    decode = None
    tok_path = tokenizer_path(t)
    if tok_path.is_file():
        from data_pipelines.tokenizer import load_tokenizer

        tok = load_tokenizer(tok_path)
        decode = lambda i: tok.decode([i])  # noqa: E731
    out = []
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
    if not stats:
        out += ["", "no module of this model reports learned per-head statistics"]
    for name, rows in stats.items():
        out += [""] + stat_table(name, rows, limits.get(name))
    out += token_sections(t, windows)
    if pattern_png:
        from lmtrain.evaluate.patterns import picture_length, write_pattern_png

        L = picture_length(t.cfg.data.seq_len)
        written = write_pattern_png(t.model, t.cfg.data.seq_len, pattern_png,
                                    title=f"{t.run_dir.name}: patterns at L={L}")
        out += ["", f"attention patterns at L={L}: {written}" if written else
                "attention patterns: no layer of this model has one (a --pattern-png is drawn for sparse kinds)"]
    return "\n".join(out)
