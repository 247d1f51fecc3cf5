"""`lmtrain inspect RUN_OR_CKPT`: what a checkpoint holds and what its heads learned.

Prints the checkpoint, step and model, then one table per head statistic of the attention
kernels (`AttentionKernel.head_stats`: the spans of adaptive-span heads, for example),
layers by heads, with a summary line per statistic.
"""

from __future__ import annotations

from lmtrain.train.callbacks.head_stats import collect
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


def inspect(source) -> str:
    t = load_trained(source, device="cpu")
    m = t.cfg.model
    params = sum(p.numel() for p in t.model.parameters())
    attn = ", ".join(f"{k}={v}" for k, v in vars(m.attention).items() if k != "kind")
    out = [f"checkpoint   {t.checkpoint} (step {t.step})",
           f"model        {m.n_layers} layers x {m.n_heads} heads, d_model {m.d_model}, d_ff {m.d_ff}, "
           f"position {m.position}, {params:,} parameters",
           f"attention    {m.attention.kind}" + (f" ({attn})" if attn else "")]
    stats, limits = collect(t.model)
    if not stats:
        out += ["", f"attention kind {m.attention.kind} has no learned per-head statistics"]
    for name, rows in stats.items():
        out += [""] + stat_table(name, rows, limits.get(name))
    return "\n".join(out)
