"""`lmtrain bench decode RUN`: generation speed with and without early exit, side by side.

Greedy decoding with the KV cache from prompts of the run's validation split, at each batch
size (`--batches`, default 1 and 8; at least `--timed-prompts` prompts per case and round, in
batches of that size): every token through every layer ("full depth"), and with
exits at the measure's threshold (the run's calibrated one unless `--threshold`). The cases
alternate round by round in one process (the same weights, the same prompts); each case's
time is the median over rounds. Reported per batch size: new tokens per second, the mean
number of layers a new token ran, the speed-up, and two agreements with full depth: the share
of the full-depth continuation's tokens that the early-exit model predicts over the same
tokens (given the same context: the quantity `calibrate-exit` bounds), measured on
`--agreement-prompts` prompts from the half of the validation split that calibration leaves
out (exits are decided per row, so it does not depend on the batch size), and the share of
the timed generations' tokens equal to the full-depth generation's at the same place (one
differing token usually changes the rest of a free-running generation).

Exits are decided per row: a layer is skipped for a batch only where every row has exited,
so a batch gains less than one row alone (the other rows' work is still done).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="RUN_OR_CKPT", help="a trained model with model.depth.kind=early_exit")
    p.add_argument("--exit", default="softmax", choices=("softmax", "state", "halting", "classifier"),
                   help="the confidence measure of the early-exit case")
    p.add_argument("--threshold", type=float, help="default: the run's calibrated threshold (calibrate-exit)")
    p.add_argument("--exit-layers", help="the exits whose confidence is checked: comma-separated layers or all "
                                         "(default: the calibrated ones with the calibrated threshold, else all)")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="timed generations per case, alternating (median)")
    p.add_argument("--timed-prompts", type=int, default=8,
                   help="prompts generated per case and round (in batches of each size; at least one batch)")
    p.add_argument("--agreement-prompts", type=int, default=256,
                   help="validation prompts over which the same-context agreement is measured")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


def _prompts(cfg, batch: int, span: int, device):
    """`batch` prompts from the second half of the validation split, which `calibrate-exit`
    leaves out: the agreement is measured on prompts the threshold was not chosen on."""
    import torch

    from data_pipelines.shards import open_tokens
    from lmtrain.config import ConfigError
    from lmtrain.exits import ExitError, exit_prompts

    val = torch.from_numpy(open_tokens(cfg.data.dir, "val").astype("int64"))
    try:
        return exit_prompts(val, batch, span, "test").to(device)
    except ExitError as e:
        raise ConfigError(f"bench decode: {e}") from None


def main(args) -> int:
    import torch

    from lmtrain.config import ConfigError
    from lmtrain.evaluate.runner import parse_lengths
    from lmtrain.exits import (
        agreement,
        apply_exit,
        describe_checked,
        early_exit_depth,
        full_continuations,
        parse_checked_exits,
    )
    from lmtrain.generate import generate
    from lmtrain.train.checkpoint import load_trained

    if min(args.rounds, args.prompt_tokens, args.new_tokens, args.agreement_prompts, args.timed_prompts) < 1:
        raise ConfigError("bench decode: --rounds, --prompt-tokens, --new-tokens, --timed-prompts and "
                          "--agreement-prompts must be at least 1")
    try:
        batches = parse_lengths(args.batches)
    except ValueError:
        raise ConfigError(f"bench decode: --batches {args.batches}: give comma-separated sizes, e.g. 1,8") from None
    checked = parse_checked_exits(args.exit_layers)  # bad input fails before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    t = load_trained(args.source)
    cfg, model = t.cfg, t.model
    depth = early_exit_depth(model)
    if model.max_len is not None and args.prompt_tokens + args.new_tokens > model.max_len:
        raise ConfigError(f"bench decode: --prompt-tokens + --new-tokens: this model's positions end at "
                          f"{model.max_len}")
    threshold, checked = apply_exit(model, t.run_dir, args.exit, args.threshold, t.step, checked)
    exit_policy = depth.policy
    device = next(model.parameters()).device
    print(f"bench decode: {t.checkpoint} (step {t.step}), {cfg.model.n_layers} layers, d_model {cfg.model.d_model}, "
          f"vocabulary {cfg.data.vocab_size}; greedy, KV cache, prompts of {args.prompt_tokens} and "
          f"{args.new_tokens} new tokens; exit {args.exit} at {threshold:g}, exits checked: "
          f"{describe_checked(checked)}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {args.rounds} rounds", flush=True)

    def run(prompt_batches, policy) -> tuple[float, torch.Tensor, float]:
        """Every batch of prompts generated in turn: total time, the new tokens, mean layers."""
        depth.policy = policy
        stats: list = []
        outs = []
        t0 = time.perf_counter()
        for prompts in prompt_batches:
            seq = generate(model, prompts, args.new_tokens, temperature=0, token_stats=stats)
            outs.append(seq[:, prompts.shape[1]:])
        dt = time.perf_counter() - t0
        layers = [s["exit_layer"].float().mean().item() for s in stats if "exit_layer" in s]
        return dt, torch.cat(outs), (sum(layers) / len(layers)) if layers else float(cfg.model.n_layers)

    from lmtrain.model.early_exit import ExitPolicy

    cases = [("full depth", ExitPolicy()), (f"exit {args.exit} {threshold:g}", exit_policy)]
    # Same-context agreement over many prompts: the full model's greedy continuations, then
    # each case's next-token predictions over them (batched; decisions are per row).
    sample = _prompts(cfg, args.agreement_prompts, args.prompt_tokens, device)
    full_seq = full_continuations(model, sample, args.new_tokens)
    same_context = {}
    for label, policy in cases:
        depth.policy = policy
        same_context[label] = float(agreement(model, full_seq, args.prompt_tokens)[0].mean())
    print(f"same-context agreement with full depth over {args.agreement_prompts} prompts: "
          + ", ".join(f"{label} {100 * v:.1f}%" for label, v in same_context.items()), flush=True)
    rows = []
    for B in batches:
        # At least --timed-prompts prompts per round, in batches of B: one prompt alone is a thin
        # sample (a greedy generation that falls into a loop exits early at every token).
        n_batches = -(-args.timed_prompts // B)
        prompts = _prompts(cfg, n_batches * B, args.prompt_tokens, device).split(B)
        for _, policy in cases:
            run(prompts[:1], policy)  # warm-up
        times: dict[str, list[float]] = {label: [] for label, _ in cases}
        outs, layers = {}, {}
        for r in range(args.rounds):
            for label, policy in cases:
                dt, out, mean_layers = run(prompts, policy)
                times[label].append(dt)
                outs[label], layers[label] = out, mean_layers
                print(f"batch {B} round {r + 1}/{args.rounds}  {label:<24} "
                      f"{n_batches * B * args.new_tokens / dt:9.1f} tokens/s", flush=True)
        full = cases[0][0]
        for label, _ in cases:
            med = statistics.median(times[label])
            free = float((outs[label] == outs[full]).float().mean())
            rows.append((B, label, n_batches * B * args.new_tokens / med, layers[label],
                         statistics.median(times[full]) / med, same_context[label], free))
    depth.policy = ExitPolicy()
    print()
    print(f"| batch | case | tokens/s | layers per token | speed-up | next token as full depth's (same context, "
          f"{args.agreement_prompts} prompts) | timed generations' tokens equal to full depth's |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for B, label, tps, lay, speed, same, free in rows:
        print(f"| {B} | {label} | {tps:.1f} | {lay:.2f} of {cfg.model.n_layers} | {speed:.2f}x | {100 * same:.1f}% "
              f"| {100 * free:.1f}% |")
    return 0
