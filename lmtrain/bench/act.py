"""`lmtrain bench act RUN`: what ACT's halting saves, measured on a trained ACT model.

On validation windows of the run's own data (so the halting is the learned one), one
training step's forward+backward (no optimizer) is timed for three configurations of the
same weights, alternating case by case in one process, median over rounds:

  * act, running positions only - `skip_halted` (the default): the loop stops when every
                                  position has halted, and before that only running
                                  positions' queries, projections and feed-forward are computed;
  * act, every position         - the loop still stops when all have halted, but each step
                                  computes every position and keeps the running ones;
  * all steps                   - the same block applied max_steps times to every position
                                  (the cost of the all-steps control, whose weights differ
                                  but whose shapes do not).

It reports the times, their ratios, and the share of the all-steps position-steps computed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="RUN_OR_CKPT", help="a trained model with model.depth.kind=act")
    p.add_argument("--batch", type=int, default=0, help="windows per step (default: the run's data.batch_size)")
    p.add_argument("--rounds", type=int, default=5, help="timed steps per case, alternating (median)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


def _cases(model, cfg):
    from dataclasses import replace

    act = model.depth.cfg
    return [("act, running positions only", replace(act, skip_halted=True), None),
            ("act, every position", replace(act, skip_halted=False), None),
            (f"all {act.max_steps} steps", replace(act, skip_halted=False), act.max_steps)]


def main(args) -> int:
    import torch
    import torch.nn.functional as F

    from lmtrain.config import ConfigError
    from lmtrain.train.checkpoint import load_trained
    from lmtrain.train.data import WindowDataset, validation_sample

    if args.rounds < 1 or args.batch < 0:
        raise ConfigError("bench act: --rounds must be at least 1 and --batch 0 or more")
    if args.threads:
        torch.set_num_threads(args.threads)
    from lmtrain.model.universal import ACTDepth

    t = load_trained(args.source)
    cfg, model = t.cfg, t.model
    if not isinstance(model.depth, ACTDepth):
        raise ConfigError(f"bench act: {args.source} has model.depth.kind={cfg.model.depth.kind}; it needs an ACT "
                          "model (model.depth.kind=act)")
    L, B = cfg.data.seq_len, args.batch or cfg.data.batch_size
    windows = validation_sample(WindowDataset(cfg.data.dir, "val", L), B)
    x, y = windows[:, :-1], windows[:, 1:]
    model.train()
    depth = model.depth
    original_cfg, original_halt_bias = depth.cfg, depth.halt.bias.detach().clone()

    def step(case) -> tuple[float, float, float]:
        _, act_cfg, all_steps = case
        depth.cfg = act_cfg
        with torch.no_grad():  # all steps: a halting unit that never halts (p = 0) runs every position T times
            depth.halt.bias.fill_(-1e4) if all_steps else depth.halt.bias.copy_(original_halt_bias)
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        out = model(x)
        loss = F.cross_entropy(out.logits_BLV.flatten(0, 1), y.flatten()) + out.aux.total_loss()
        loss.backward()
        dt = time.perf_counter() - t0
        return dt, float(out.aux.stats["act/computed_fraction"]), float(out.aux.stats["ponder/mean"])

    cases = _cases(model, cfg)
    print(f"bench act: {t.checkpoint} (step {t.step}), batch {B} x {L} validation tokens, forward+backward, fp32; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {args.rounds} rounds", flush=True)
    for case in cases:
        step(case)  # warm-up
    times: dict[str, list[float]] = {c[0]: [] for c in cases}
    facts: dict[str, tuple[float, float]] = {}
    for r in range(args.rounds):
        for case in cases:
            dt, frac, ponder = step(case)
            times[case[0]].append(dt)
            facts[case[0]] = (frac, ponder)
            print(f"round {r + 1}/{args.rounds}  {case[0]:<30} {dt * 1e3:9.1f} ms", flush=True)
    depth.cfg = original_cfg
    with torch.no_grad():
        depth.halt.bias.copy_(original_halt_bias)
    base = statistics.median(times[cases[-1][0]])
    print()
    print("| case | position-steps computed | mean ponder | fwd+bwd (ms) | vs all steps |")
    print("|---|---:|---:|---:|---:|")
    for label, _, _ in cases:
        med = statistics.median(times[label])
        frac, ponder = facts[label]
        ratio = f"{base / med:.2f}x faster" if label != cases[-1][0] else "1.00 (baseline)"
        print(f"| {label} | {100 * frac:.1f}% | {ponder:.2f} | {med * 1e3:.1f} | {ratio} |")
    return 0
