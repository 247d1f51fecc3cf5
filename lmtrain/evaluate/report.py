"""Length-evaluation reports: JSON, CSV, a markdown table, PNG plots, TensorBoard.

Files (MODE = nonoverlap | sliding), written into a run's eval/ dir or a chosen --out:
  length_MODE.json             everything: settings, scored-token range, per-length results
  length_MODE.csv              one row per (run, length)
  length_MODE_positions.csv    one row per (run, length, bucket of window positions)
  length_MODE.md               perplexity table, and the ratio to the training length
  length_MODE_ppl.png          perplexity against length, a line per run, training length marked
  length_MODE_positions.png    loss against position in the window, a line per length
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Optional

CSV_FIELDS = ("run", "position", "train_length", "step", "mode", "stride", "length", "status", "reason", "loss", "ppl",
              "tokens_scored", "tokens_processed", "windows", "seconds")


def scheme(run: dict) -> str:
    """The run's position scheme, with its attention kind where that is not plain softmax
    (DA-Transformer runs have position `none` and their distance function in the kernel)."""
    attention = run.get("attention", "softmax")
    return run["position"] if attention == "softmax" else f"{run['position']} + {attention}"


def report_dict(report: dict, runs: Optional[list] = None) -> dict:
    runs = report["runs"] if runs is None else runs
    return {**{k: v for k, v in report.items() if k != "runs"}, "runs": [r.to_dict() for r in runs]}


def _fmt(x: Optional[float], digits: int = 2) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:,.{digits}f}"


def markdown(rep: dict) -> str:
    lengths = rep["lengths"]
    stride = "" if rep["mode"] == "nonoverlap" else f", stride {rep['stride'] or 'L/2'}"
    lines = [
        f"Length evaluation, {rep['mode']}{stride}: {rep['scored_tokens']:,} scored tokens "
        f"(targets {rep['scored_offset']:,}..{rep['scored_offset'] + rep['scored_tokens'] - 1:,}) of {rep['data']}.",
        "",
        "Perplexity:",
        "",
        "| run | position | train L | " + " | ".join(f"L={L}" for L in lengths) + " |",
        "|---|---|---:|" + "---:|" * len(lengths),
    ]
    notes = []
    for run in rep["runs"]:
        cells = []
        for r in run["results"]:
            if r["status"] == "ok":
                cells.append(_fmt(r["ppl"]))
            else:
                notes.append(f"{run['name']} at L={r['length']}: {r['reason']}")
                cells.append(f"n/a [{len(notes)}]")
        lines.append(f"| {run['name']} | {scheme(run)} | {run['train_length']} | " + " | ".join(cells) + " |")
    lines += ["", "Perplexity relative to the training length (1.00 = no change):", "",
              "| run | " + " | ".join(f"L={L}" for L in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    for run in rep["runs"]:
        base = next((r["ppl"] for r in run["results"] if r["length"] == run["train_length"] and r["ppl"]), None)
        cells = [f"{r['ppl'] / base:.3f}" if base and r["ppl"] else "-" for r in run["results"]]
        lines.append(f"| {run['name']} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "Not evaluated:", ""] + [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def write_csv(rep: dict, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for run in rep["runs"]:
            for r in run["results"]:
                w.writerow({"run": run["name"], "position": run["position"], "train_length": run["train_length"],
                            "step": run["step"], "mode": rep["mode"], "stride": rep["strides"][str(r["length"])],
                            **{k: r[k] for k in CSV_FIELDS if k in r}})


def write_positions_csv(rep: dict, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("run", "length", "bucket_start", "bucket_end", "tokens", "loss"))
        for run in rep["runs"]:
            for r in run["results"]:
                edges = r["bucket_edges"]
                for i, (loss, n) in enumerate(zip(r["bucket_loss"], r["bucket_tokens"])):
                    if n:
                        w.writerow((run["name"], r["length"], edges[i], edges[i + 1], n, f"{loss:.6f}"))


def ppl_figure(rep: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    train_lengths = set()
    for run in rep["runs"]:
        pts = [(r["length"], r["ppl"]) for r in run["results"] if r["status"] == "ok" and r["ppl"] is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{run['name']} ({scheme(run)})")
        train_lengths.add(run["train_length"])
    for L in sorted(train_lengths):
        ax.axvline(L, color="grey", linestyle="--", linewidth=1)
        ax.annotate(f"train L={L}", (L, 0), xycoords=("data", "axes fraction"), xytext=(3, 4),
                    textcoords="offset points", fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    from matplotlib.ticker import LogFormatter, ScalarFormatter

    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(3, 1)))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(3, 1)))
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity")
    stride = "" if rep["mode"] == "nonoverlap" else f", stride {rep['stride'] or 'L/2'}"
    ax.set_title(f"Perplexity vs length ({rep['mode']}{stride}, {rep['scored_tokens']:,} tokens)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def positions_figure(rep: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = rep["runs"]
    cols = min(3, len(runs))
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), dpi=100, squeeze=False, sharey=True)
    for ax, run in zip(axes.flat, runs):
        for r in run["results"]:
            if r["status"] != "ok":
                continue
            e = r["bucket_edges"]
            # a bucket [a, b) is drawn at its geometric middle (position 0 at 0.5)
            pts = [(math.sqrt(max(e[i], 0.5) * max(e[i + 1] - 1, 0.5)), loss)
                   for i, loss in enumerate(r["bucket_loss"]) if loss is not None]
            if pts:
                ax.plot(*zip(*pts), linewidth=1, label=f"L={r['length']}")
        ax.axvline(run["train_length"], color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{run['name']} ({scheme(run)})", fontsize=10)
        ax.set_xlabel("position in window")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("loss (nats)")
    for ax in list(axes.flat)[len(runs):]:
        ax.set_visible(False)
    fig.suptitle(f"Loss by position in the window ({rep['mode']})", fontsize=11)
    fig.tight_layout()
    return fig


def write_report(report: dict, out_dir: Path, runs: Optional[list] = None) -> list[Path]:
    """Write all report files for `runs` (default: all) into out_dir; returns their paths."""
    import matplotlib.pyplot as plt

    rep = report_dict(report, runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    from lmtrain.evaluate import override_suffix

    stem = out_dir / f"length_{rep['mode']}{override_suffix(rep.get('overrides', ()))}"
    paths = [stem.with_suffix(".json"), stem.with_suffix(".csv"), Path(f"{stem}_positions.csv"),
             stem.with_suffix(".md"), Path(f"{stem}_ppl.png"), Path(f"{stem}_positions.png")]
    paths[0].write_text(json.dumps(rep, indent=2) + "\n")
    write_csv(rep, paths[1])
    write_positions_csv(rep, paths[2])
    paths[3].write_text(markdown(rep))
    for fig_fn, path in ((ppl_figure, paths[4]), (positions_figure, paths[5])):
        fig = fig_fn(rep)
        fig.savefig(path)
        plt.close(fig)
    return paths


def log_tensorboard(report: dict, run) -> None:
    """Scalars and figures into the run's TensorBoard dir (RUN/tb), at the checkpoint's step:
    eval_length/MODE/ppl_L<length> and loss_L<length>, and the two plots as images."""
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    rep = report_dict(report, [run])
    mode, step = rep["mode"], max(run.trained.step, 0)
    writer = SummaryWriter(log_dir=str(run.trained.run_dir / "tb"))
    try:
        for r in run.results:
            if r.status == "ok":
                writer.add_scalar(f"eval_length/{mode}/ppl_L{r.length}", r.ppl, step)
                writer.add_scalar(f"eval_length/{mode}/loss_L{r.length}", r.loss, step)
        for name, fig_fn in (("ppl_vs_length", ppl_figure), ("loss_by_position", positions_figure)):
            fig = fig_fn(rep)
            writer.add_figure(f"eval_length/{mode}/{name}", fig, step)
            plt.close(fig)
    finally:
        writer.close()
