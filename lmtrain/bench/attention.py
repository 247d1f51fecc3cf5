"""`lmtrain bench attention`: forward+backward time and peak memory of one attention kernel
call, for several configurations side by side.

`--kind KIND` sweeps the length (`--lengths`, default 1k to 32k): at each L the kind and
causal softmax attention through SDPA (no bias: its fused causal kernel), each in its own
process. The table gives both times and memories, their ratio, time(L) / time(first L) for
each, and the crossover: the shortest L at which the kind is faster. Every registered kind
can be swept; `--chunk` and `--features` reach kinds that have those options, and
`--option KEY=VALUE` any option of the kind (`--kind sparse --option pattern=window
--option window=256`).

`--kind sparse --patterns window,bigbird,window+globals` runs each pattern at `--length`
beside dense causal softmax and reports, per pattern, the blocks it computed and its time
against what the first pattern's time per block predicts.

`--kind adaptive_span` compares every head's span at S (`--max-span`, default the kind's
default S = 1024) with every span at S/8, at length `--length` (default 4096), and shows
dense causal softmax attention over all keys beside them for context. Memory is the process's peak resident memory
during one forward+backward minus its resident memory just before it (Linux: the peak is
reset through /proc/self/clear_refs), i.e. what the attention call itself allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

from lmtrain.bench.process import alternate, medians
from lmtrain.bench.process import reset_peak as _reset_peak
from lmtrain.bench.process import rss_kb as _rss_kb
from lmtrain.bench.process import trim as _trim

BASELINE = "softmax"  # what every kind is compared with: causal softmax attention through SDPA


@dataclass
class Case:
    label: str
    kind: str
    length: int
    options: dict = field(default_factory=dict)  # model.attention options of the kind
    spans: float | None = None  # adaptive_span: every head's z, in positions
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    position: str = "none"
    threads: int = 0
    repeats: int = 5


def adaptive_span_cases(args) -> list[Case]:
    S = args.max_span
    opts = {"max_span": S, "ramp": args.ramp, "block": args.block}
    common = dict(kind="adaptive_span", length=args.length, options=opts, batch=args.batch, heads=args.heads,
                  head_dim=args.head_dim, position=args.position, threads=args.threads, repeats=args.repeats)
    plain = {**common, "kind": BASELINE, "options": {"backend": "sdpa"}}
    return [Case(label=f"span S={S}", spans=float(S), **common),
            Case(label=f"span S/8={S // 8}", spans=float(S // 8), **common),
            # For context: dense causal softmax over all L keys (SDPA's fused kernel where it applies).
            Case(label="softmax, all keys", **plain)]


def kind_options(args) -> dict:
    """The kind's options from --chunk/--features (where it has them) and every --option KEY=VALUE."""
    from dataclasses import fields

    import yaml

    from lmtrain.config import ConfigError
    from lmtrain.model.attention import ATTENTION

    options = {f.name for f in fields(ATTENTION.get(args.kind).Config)}
    opts = {name: getattr(args, name) for name in ("chunk", "features") if name in options}
    for item in args.option or []:
        key, sep, value = item.partition("=")
        if not sep or key not in options or key == "kind":
            raise ConfigError(f"bench attention: --option {item!r}: give KEY=VALUE with KEY one of "
                              f"{', '.join(sorted(options - {'kind'}))}")
        opts[key] = yaml.safe_load(value)
    return opts


def check_cases(cases: list[Case]) -> None:
    """Each case's kind and options, checked as the config loader checks a model (one line per
    error, naming the key), before any process starts."""
    from lmtrain.config import load_config

    for c in cases:
        opts = [f"model.attention.{k}={v if not isinstance(v, list) else '[' + ','.join(map(str, v)) + ']'}"
                for k, v in c.options.items()]
        load_config(None, [f"model.attention.kind={c.kind}", *opts, f"model.n_heads={c.heads}",
                           f"model.d_model={c.heads * c.head_dim}", f"model.position={c.position}",
                           f"data.seq_len={c.length}"])


def sparse_cases(args) -> list[Case]:
    """--patterns: each pattern at --length beside dense causal softmax, so that time per
    computed block can be compared with the first pattern's (the window, usually)."""
    common = dict(length=args.length, batch=args.batch, heads=args.heads, head_dim=args.head_dim,
                  position=args.position, threads=args.threads, repeats=args.repeats)
    opts = kind_options(args)
    cases = [Case(label=p, kind="sparse", options={**opts, "pattern": p}, **common) for p in args.pattern_list]
    return cases + [Case(label="softmax, all keys", kind=BASELINE, options={"backend": "sdpa"}, **common)]


def sweep_cases(args) -> list[Case]:
    opts = kind_options(args)
    cases = []
    for L in args.length_list:
        common = dict(length=L, batch=args.batch, heads=args.heads, head_dim=args.head_dim, position="none",
                      threads=args.threads, repeats=args.repeats)
        cases.append(Case(label=f"{args.kind} L={L}", kind=args.kind, options=opts, **common))
        cases.append(Case(label=f"softmax L={L}", kind=BASELINE, options={"backend": "sdpa"}, **common))
    return cases


# Kinds compared otherwise than by a length sweep against softmax: adaptive span, whose cost
# follows its learned spans, at one length with spans S and S/8.
COMPARISONS = {"adaptive_span": adaptive_span_cases}


# -- the child: one configuration, one process ---------------------------------------------


def measure(case: Case) -> dict:
    import torch

    from lmtrain.model.attention import ATTENTION, AttentionInputs
    from lmtrain.model.outputs import Aux
    from lmtrain.model.positions import build_position

    if case.threads:
        torch.set_num_threads(case.threads)
    torch.manual_seed(0)
    cls = ATTENTION.get(case.kind)
    cfg = cls.Config(kind=case.kind, **case.options)
    d_model = case.heads * case.head_dim
    kernel = cls(cfg, d_model=d_model, n_heads=case.heads, dropout=0.0).train()
    if case.spans is not None:
        with torch.no_grad():
            kernel.span_frac.fill_(case.spans / cfg.max_span)
    position = build_position(case.position, d_model=d_model, n_heads=case.heads, seq_len=case.length)
    B, H, L, D = case.batch, case.heads, case.length, case.head_dim
    q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))
    pos = torch.arange(L)

    keys = q if kernel.shared_qk else k  # shared query-key kinds (LSH): the keys are the queries

    def step():
        out = kernel(q, keys, v, AttentionInputs(position=position, q_pos=pos, k_pos=pos, aux=Aux()))
        out.backward(torch.ones_like(out))
        q.grad = k.grad = v.grad = None
        kernel.zero_grad(set_to_none=True)

    step()  # warm-up
    _trim()
    before = _rss_kb("VmRSS")
    peak_ok = _reset_peak()
    step()
    peak = _rss_kb("VmHWM")
    times = []
    for _ in range(case.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    extra = {"window": kernel.window()} if hasattr(kernel, "window") else {}
    if hasattr(kernel, "computed_blocks"):
        extra["blocks"] = kernel.computed_blocks
    return {"label": case.label, "time_s": statistics.median(times), "times_s": times,
            "peak_mb": (peak - before) / 1024 if peak_ok else None, "threads": torch.get_num_threads(),
            "paths": dict(kernel.path_counts), **extra}


# -- the parent: cases side by side --------------------------------------------------------
def run_cases(cases: list[Case], rounds: int, log=print) -> list[dict]:
    """Each case in its own process, `rounds` times, alternating; the median per case."""
    argv = [(c.label, [sys.executable, "-m", "lmtrain.bench.attention", "--child", json.dumps(asdict(c))])
            for c in cases]
    results = alternate(argv, rounds, log=log, show=lambda _, r: f"{r['time_s'] * 1e3:9.1f} ms  peak "
                        f"{r['peak_mb'] if r['peak_mb'] is None else round(r['peak_mb'], 1)} MB")
    return [{**medians(results[c.label], ("time_s", "peak_mb")), "case": asdict(c)} for c in cases]


def format_results(results: list[dict]) -> str:
    base = results[0]
    lines = ["| case | window (keys per query) | fwd+bwd (ms) | peak memory (MB) | time vs first | memory vs first |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        t_ratio = base["time_s"] / r["time_s"]
        m_ratio = (base["peak_mb"] / r["peak_mb"]) if r["peak_mb"] and base["peak_mb"] else float("nan")
        lines.append(f"| {r['label']} | {r.get('window', '-')} | {r['time_s'] * 1e3:.1f} | "
                     f"{r['peak_mb']:.1f} | {t_ratio:.2f}x faster | {m_ratio:.2f}x less |")
    return "\n".join(lines)


def format_patterns(results: list[dict]) -> str:
    """Patterns side by side: time against the blocks each computed, relative to the first."""
    first = results[0]
    per_block = first["time_s"] / first["blocks"]
    lines = ["| case | blocks computed (per head) | fwd+bwd (ms) | peak memory (MB) | time / predicted from "
             f"{first['label']}'s time per block | time vs dense |", "|---|---:|---:|---:|---:|---:|"]
    dense = results[-1]
    for r in results:
        blocks = r.get("blocks")
        predicted = f"{r['time_s'] / (per_block * blocks):.2f}" if blocks else "-"
        mem = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "n/a"
        lines.append(f"| {r['label']} | {blocks if blocks else '-'} | {r['time_s'] * 1e3:.1f} | {mem} | {predicted} | "
                     f"{r['time_s'] / dense['time_s']:.3f} |")
    return "\n".join(lines)


def format_sweep(results: list[dict], kind: str) -> str:
    """One row per length: the kernelized kind beside softmax, and the crossover."""
    by_len: dict[int, dict[str, dict]] = {}
    for r in results:
        by_len.setdefault(r["case"]["length"], {})[r["case"]["kind"]] = r
    lengths = sorted(by_len)
    first = by_len[lengths[0]]
    lines = [f"| L | {kind} fwd+bwd (ms) | softmax fwd+bwd (ms) | softmax / {kind} time | {kind} peak (MB) | "
             f"softmax peak (MB) | {kind} time / at L={lengths[0]} | softmax time / at L={lengths[0]} |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    crossover = None
    for L in lengths:
        k, s = by_len[L][kind], by_len[L][BASELINE]
        if crossover is None and k["time_s"] < s["time_s"]:
            crossover = L
        mem = [f"{x['peak_mb']:.0f}" if x["peak_mb"] is not None else "n/a" for x in (k, s)]
        lines.append(f"| {L} | {k['time_s'] * 1e3:.1f} | {s['time_s'] * 1e3:.1f} | {s['time_s'] / k['time_s']:.2f} | "
                     f"{mem[0]} | {mem[1]} | {k['time_s'] / first[kind]['time_s']:.1f} | "
                     f"{s['time_s'] / first[BASELINE]['time_s']:.1f} |")
    lines.append("")
    lines.append(f"crossover: {kind} is faster than softmax from L = {crossover}" if crossover else
                 f"crossover: {kind} is not faster than softmax at any measured length")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", default="adaptive_span", help="attention kind to benchmark (any registered kind but "
                                                           "softmax, the baseline)")
    p.add_argument("--length", type=int, default=4096, help="adaptive_span: sequence length L")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768",
                   help="other kinds: the lengths to sweep against softmax, comma-separated")
    p.add_argument("--features", type=int, default=256, help="kinds with random features (performer, rfa): M")
    p.add_argument("--chunk", type=int, default=64, help="kinds with a chunk option (performer, rfa, linear)")
    p.add_argument("--max-span", type=int, default=1024, help="adaptive_span: S (compared with S/8)")
    p.add_argument("--ramp", type=int, default=32, help="adaptive_span: R")
    p.add_argument("--block", type=int, default=64, help="adaptive_span: block")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--position", default="none", help="positional scheme (alibi adds its score bias)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per process (median)")
    p.add_argument("--rounds", type=int, default=3, help="processes per case, alternating (median)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="an option of the kind (repeatable), e.g. --option pattern=window --option window=256")
    p.add_argument("--patterns", help="sparse: patterns to compare side by side at --length (e.g. "
                                      "window,bigbird,window+globals), beside dense softmax")
    p.add_argument("--out", help="also write the results as JSON here")


def main(args) -> int:
    from lmtrain.config import ConfigError

    try:
        args.length_list = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        raise ConfigError(f"bench attention: --lengths must be integers separated by commas, got {args.lengths!r}") \
            from None
    if args.length < 2 or args.max_span < 8 or args.rounds < 1 or args.repeats < 1 or min(args.length_list) < 2:
        raise ConfigError("bench attention: --length and --lengths >= 2, --max-span >= 8, --rounds and --repeats >= 1")
    import torch

    from lmtrain.model.attention import ATTENTION

    if args.kind not in ATTENTION or args.kind == BASELINE:
        others = ", ".join(k for k in sorted(ATTENTION) if k != BASELINE)
        raise ConfigError(f"bench attention: --kind {args.kind}: choose one of {others} (softmax is the baseline)")
    args.pattern_list = [p for p in (args.patterns or "").split(",") if p]
    if args.pattern_list and args.kind != "sparse":
        raise ConfigError("bench attention: --patterns is for --kind sparse")
    if args.pattern_list:
        cases, sweep = sparse_cases(args), False
    else:
        sweep = args.kind not in COMPARISONS
        cases = sweep_cases(args) if sweep else COMPARISONS[args.kind](args)
    check_cases(cases)
    lengths = args.lengths if sweep else args.length
    print(f"bench attention: {args.kind}, L={lengths}, batch {args.batch}, {args.heads} heads x {args.head_dim}, "
          f"position {args.position}, fp32, forward+backward; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}; {args.rounds} rounds x {args.repeats} steps", flush=True)
    results = run_cases(cases, args.rounds)
    print()
    if args.pattern_list:
        print(format_patterns(results))
    else:
        print(format_sweep(results, args.kind) if sweep else format_results(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "date": time.strftime("%Y-%m-%d"), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(measure(Case(**json.loads(sys.argv[2])))))
        sys.exit(0)
    print("use `lmtrain bench attention ...`", file=sys.stderr)
    sys.exit(2)
