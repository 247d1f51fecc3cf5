"""`lmtrain bench train CONFIG [overrides] [--vs mpt,xtransformers]`: training throughput
against the machine's limit and against peer implementations, side by side in one run.

Each case runs in its own process, `--rounds` times, alternating, on the same batches from
lmtrain's data pipeline, with the same thread count, precision, AdamW settings and gradient
clipping; after `--warmup` steps, `--steps` steps are timed.

  * lmtrain: the real training path: LMModule, the data module and a Lightning Trainer
    (no logger, checkpoints or validation).
  * a peer (lmtrain/bench/peers.py): its model in a plain PyTorch loop (forward, float32
    cross-entropy, backward, clipping, AdamW), which gives the peer no framework overhead.

Reported per case: tokens/s, model FLOPs per token (the same formula for all, see below),
MFU, peak memory, and the share of step time spent waiting for the next batch.

FLOPs per token = 6 N + attention, N the parameters in matrix multiplies (the LM head
included), attention = 12 n_layers d_model L for softmax (PaLM: both halves of the causal
L x L products). MFU's denominator on CPU is measured on the spot, in the precision the run
uses (bf16 matmuls for bf16-mixed, which run on AMX or AVX-512 BF16 units where the CPU has
them; fp32 otherwise), at the same thread count and the size where each peaks (1024^3 products
in fp32, 2048^3 in bf16; `hardware.cpu_matmul_peak`); both peaks are printed, with the CPU
model and its relevant flags beside every table. On CUDA the datasheet bf16 peak, with the
measured matmul peak printed beside it. Peers run in the same precision (autocast for the mixed ones).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

from lmtrain.bench.process import alternate, limit_memory, medians, out_of_memory, reset_peak, rss_kb

IMPLEMENTATIONS = ("lmtrain", "mpt", "xtransformers")
# Peers with activation checkpointing of their own (transformers' gradient checkpointing): a
# peer that runs out of memory at a length is run again with it (`--lengths`).
CHECKPOINTING_PEERS = ("mpt",)


# -- the child: one implementation, one process ------------------------------------------------


def _train_loader(cfg):
    """lmtrain's training batches, in lmtrain's order (the same for every case)."""
    from lmtrain.train.data import TokenDataModule

    dm = TokenDataModule(cfg)
    dm.setup("fit")
    return dm.train_dataloader()


def _measure_lmtrain(cfg, warmup: int, steps: int) -> dict:
    import lightning.pytorch as pl
    import torch

    from lmtrain.train.data import TokenDataModule
    from lmtrain.train.module import LMModule
    from lmtrain.train.strategy import build_strategy

    times, waits, marks = [], [], {}

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            now = time.perf_counter()
            if "end" in marks and batch_idx >= warmup:
                waits.append(now - marks["end"])
            if batch_idx == warmup:
                marks["peak"] = reset_peak()
                marks["rss0"] = rss_kb("VmRSS")
            marks["start"] = now

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            if batch_idx >= warmup:
                times.append(now - marks["start"])
            marks["end"] = now

    t = cfg.trainer
    module = LMModule(cfg)
    trainer = pl.Trainer(accelerator="gpu" if t.accelerator == "cuda" else t.accelerator, devices=1,
                         strategy=build_strategy(cfg, on_cpu=t.accelerator == "cpu"), precision=t.precision,
                         max_steps=warmup + steps, limit_val_batches=0, num_sanity_val_steps=0,
                         gradient_clip_val=cfg.optim.grad_clip or None, gradient_clip_algorithm="norm",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Timer()], use_distributed_sampler=False)
    trainer.fit(module, datamodule=TokenDataModule(cfg))
    return {"model": module.model, "times": times, "waits": waits, "peak_ok": marks.get("peak", False),
            "rss0": marks.get("rss0"), "version": f"lmtrain (Lightning {pl.__version__})"}


def _measure_peer(cfg, peer: str, warmup: int, steps: int, checkpointing: bool = False) -> dict:
    import torch
    import torch.nn.functional as F

    from lmtrain.bench.peers import PEERS

    model, forward, version = PEERS[peer](cfg)
    model.train()
    precision = str(cfg.trainer.precision)
    device_type = "cuda" if cfg.trainer.accelerator in ("cuda", "gpu") else "cpu"
    if precision == "bf16-true":
        model.to(torch.bfloat16)
    # The same precision as lmtrain's Lightning run: autocast for the mixed precisions.
    autocast = torch.autocast(device_type, dtype=torch.bfloat16 if precision.startswith("bf16") else torch.float16,
                              enabled=precision.endswith("-mixed"))
    if checkpointing:
        model.gradient_checkpointing_enable()
        version += ", activation checkpointing"
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    it = iter(_train_loader(cfg))
    times, waits, peak_ok, rss0 = [], [], False, None
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        if i == warmup:
            peak_ok, rss0 = reset_peak(), rss_kb("VmRSS")
            t1 = time.perf_counter()
        x, y = batch[:, :-1], batch[:, 1:]
        with autocast:
            logits = forward(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        if o.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if i >= warmup:
            waits.append(t1 - t0)
            times.append(t2 - t1)
    return {"model": model, "times": times, "waits": waits, "peak_ok": peak_ok, "rss0": rss0, "version": version}


def measure(spec: dict) -> dict:
    import torch

    from lmtrain.config import load_config
    from lmtrain.model import build_model
    from lmtrain.model.flops import training_flops_per_token
    from lmtrain.train.hardware import cpu_description, cpu_matmul_peak, measured_matmul_peak, peak_flops

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    limit_memory(spec.get("memory_gb", 0))
    cfg = load_config(spec["config"], spec["overrides"])
    torch.manual_seed(cfg.run.seed)
    reference = build_model(cfg, device="meta")
    flops_per_token = training_flops_per_token(reference, cfg.data.seq_len)
    params_lmtrain = sum(p.numel() for p in reference.parameters())
    impl = spec["impl"]
    try:
        res = (_measure_lmtrain if impl == "lmtrain" else lambda c, w, s: _measure_peer(
            c, impl, w, s, spec.get("checkpointing", False)))(cfg, spec["warmup"], spec["steps"])
    except (RuntimeError, MemoryError) as e:
        if not out_of_memory(e):
            raise
        return {"impl": impl, "failed": f"out of memory at L={cfg.data.seq_len} "
                                        f"(peak resident {rss_kb('VmHWM') / 2**20:.1f} GiB)"}
    params = sum(p.numel() for p in res["model"].parameters())
    peak_kb = rss_kb("VmHWM")
    device = torch.device("cuda" if cfg.trainer.accelerator in ("cuda", "gpu") else "cpu")
    peak, source = peak_flops(cfg.trainer.peak_tflops, device, cfg.trainer.precision)
    if device.type == "cpu":  # both peaks, whatever the precision: their ratio says what bf16 can gain
        matmul, matmul_bf16 = cpu_matmul_peak(), cpu_matmul_peak(torch.bfloat16)
    else:
        matmul = matmul_bf16 = measured_matmul_peak(torch.bfloat16, 4096, device=device)
    step = statistics.median(res["times"])
    tokens = cfg.data.batch_size * cfg.data.seq_len
    tps = tokens / step
    return {"impl": impl, "version": res["version"], "params": params, "params_lmtrain": params_lmtrain,
            "step_s": step, "tokens_per_s": tps, "flops_per_token": flops_per_token,
            "mfu": tps * flops_per_token / peak,
            "peak_flops": peak, "peak_source": source, "matmul_flops": matmul, "matmul_bf16_flops": matmul_bf16,
            "precision": str(cfg.trainer.precision), "machine": cpu_description() if device.type == "cpu" else
            f"{torch.cuda.get_device_name(device)} ({cpu_description()})",
            "data_wait": sum(res["waits"]) / (sum(res["waits"]) + sum(res["times"])),
            "peak_mb": (peak_kb - res["rss0"]) / 1024 if res["peak_ok"] and res["rss0"] else None,
            "threads": torch.get_num_threads(), "step_times_s": res["times"]}


# -- the parent ---------------------------------------------------------------------------------


KEYS = ("tokens_per_s", "step_s", "mfu", "data_wait", "peak_flops", "matmul_flops", "matmul_bf16_flops", "peak_mb")


def _argv(args, kind: str, extra: list[str], checkpointing: bool = False) -> list[str]:
    spec = {"impl": kind, "config": args.config, "overrides": [*args.overrides, *extra], "warmup": args.warmup,
            "steps": args.steps, "threads": args.threads, "memory_gb": args.memory_limit_gb,
            "checkpointing": checkpointing}
    return [sys.executable, "-m", "lmtrain.bench.train", "--child", json.dumps(spec)]


def _summary(label: str, runs: list[dict]) -> dict:
    """Medians over the rounds; a case that failed in any round is reported as failed."""
    failed = next((r for r in runs if "failed" in r), None)
    return {"impl": label, "failed": failed["failed"]} if failed else {**medians(runs, KEYS), "impl": label}


def _show(_, r) -> str:
    return (f"{r['tokens_per_s']:9.0f} tok/s  step {r['step_s']:.3f} s  mfu {r['mfu']:.1%}  "
            f"peak {r['peak_mb'] or 0:.0f} MB")


def run(args, log=print, extra: tuple[str, ...] = ()) -> list[dict]:
    # Cases: lmtrain, lmtrain with each --variant's extra overrides, then the peers.
    cases = [("lmtrain", "lmtrain", [])]
    cases += [(f"lmtrain {v}", "lmtrain", v.split()) for v in args.variant]
    cases += [(p, p, []) for p in args.peers]
    argv = [(label, _argv(args, kind, [*extra, *more])) for label, kind, more in cases]
    results = alternate(argv, args.rounds, log=log, show=_show, allow_failure=bool(extra))
    out = [_summary(label, results[label]) for label, _, _ in cases]
    # A peer that ran out of memory runs again with its own activation checkpointing, if it has it.
    retry = [r["impl"] for r in out if r["impl"] in CHECKPOINTING_PEERS and "out of memory" in r.get("failed", "")]
    if retry:
        again = alternate([(f"{p}, checkpointing", _argv(args, p, list(extra), checkpointing=True)) for p in retry],
                          args.rounds, log=log, show=_show, allow_failure=True)
        out += [_summary(label, runs) for label, runs in again.items()]
    return out


def run_lengths(args, log=print) -> dict[int, list[dict]]:
    """`run` at each of --lengths (data.seq_len=L); a case that cannot run at L is reported so."""
    out = {}
    for L in args.lengths:
        log(f"-- L = {L}")
        out[L] = run(args, log=log, extra=(f"data.seq_len={L}",))
    return out


def format_scaling(by_length: dict[int, list[dict]]) -> str:
    """Step time and peak memory of each case at each length, and their growth per doubling of L."""
    lengths = sorted(by_length)
    labels = list(dict.fromkeys(r["impl"] for L in lengths for r in by_length[L]))
    find = {(L, r["impl"]): r for L in lengths for r in by_length[L]}

    def cell(r, key, fmt):
        if r is None:
            return "-"  # not run at this length (a retry with checkpointing is run only where needed)
        return "cannot run" if "failed" in r or r.get(key) is None else fmt(r[key])

    def growth(key):
        out = []
        for a, b in zip(lengths, lengths[1:]):
            ra, rb = find.get((a, label)), find.get((b, label))
            ok = all(r is not None and "failed" not in r and r.get(key) for r in (ra, rb))
            per_doubling = (rb[key] / ra[key]) ** (1 / math.log2(b / a)) if ok else None
            out.append(f"{per_doubling:.2f}x" if per_doubling else "-")
        return out

    head = " | ".join(f"L={L}" for L in lengths)
    steps = " | ".join(f"{a}->{b}" for a, b in zip(lengths, lengths[1:]))
    lines = [f"| case | step time (s): {head} | time per doubling: {steps} | peak memory (MB): {head} | "
             f"memory per doubling: {steps} |",
             "|---|" + "---:|" * (2 * len(lengths) + 2 * (len(lengths) - 1))]
    for label in labels:
        times = [cell(find.get((L, label)), "step_s", lambda v: f"{v:.2f}") for L in lengths]
        mems = [cell(find.get((L, label)), "peak_mb", lambda v: f"{v:.0f}") for L in lengths]
        lines.append(f"| {label} | " + " | ".join([*times, *growth("step_s"), *mems, *growth("peak_mb")]) + " |")
    return "\n".join(lines)


def format_results(results: list[dict]) -> str:
    ours = results[0]
    lines = ["| implementation | version | parameters | tokens/s | step (s) | MFU | peak memory (MB) | data wait | "
             "lmtrain / this |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    if "failed" in ours:
        return f"lmtrain cannot run: {ours['failed']}"
    for r in results:
        if "failed" in r:
            lines.append(f"| {r['impl']} | | | cannot run: {r['failed']} | | | | | |")
            continue
        mem = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "n/a"
        lines.append(f"| {r['impl']} | {r['version']} | {r['params']:,} | {r['tokens_per_s']:.0f} | "
                     f"{r['step_s']:.3f} | {r['mfu']:.1%} | {mem} | {r['data_wait']:.1%} | "
                     f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f}x |")
    lines.append("")
    fp32, bf16 = ours["matmul_flops"], ours["matmul_bf16_flops"]
    lines.append(f"FLOPs per token: {ours['flops_per_token'] / 1e6:.1f} M (6 N + 12 n_layers d_model L); MFU against "
                 f"{ours['peak_flops'] / 1e12:.3f} TFLOP/s ({ours['peak_source']}, the peak of {ours['precision']}); "
                 f"measured matmul peaks fp32 {fp32 / 1e12:.3f}, bf16 {bf16 / 1e12:.3f} TFLOP/s "
                 f"(bf16 {bf16 / fp32:.1f}x)")
    lines.append(f"machine: {ours['machine']}")
    peers = [r for r in results if not r["impl"].startswith("lmtrain") and "failed" not in r]
    if peers:
        best_peer = max(peers, key=lambda r: r["tokens_per_s"])
        memory = (f", with {ours['peak_mb'] / best_peer['peak_mb']:.2f} of its peak memory"
                  if ours["peak_mb"] and best_peer["peak_mb"] else "")
        lines.append(f"lmtrain is {ours['tokens_per_s'] / best_peer['tokens_per_s']:.2f}x the faster peer "
                     f"({best_peer['impl']}){memory}")
    elif any(not r["impl"].startswith("lmtrain") for r in results):
        lines.append("no peer can run this case")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML config")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--vs", default="", help=f"comma-separated peers: {', '.join(IMPLEMENTATIONS[1:])}")
    p.add_argument("--variant", action="append", default=[], metavar="OVERRIDES",
                   help="also time lmtrain with these extra overrides (space-separated), e.g. "
                        "'model.position=none' for the cost of ALiBi; repeatable")
    p.add_argument("--steps", type=int, default=10, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=3, help="processes per implementation, alternating (median)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--lengths", default="",
                   help="comma-separated sequence lengths (data.seq_len) to run every case at, e.g. 4096,8192,16384; "
                        "adds a table of step time and peak memory against L; a case that runs out of memory is "
                        "reported as unable to run, and a peer with activation checkpointing is retried with it")
    p.add_argument("--memory-limit-gb", type=float, default=0.0,
                   help="cap each case's address space (0: 90%% of this machine's memory with --lengths, else none)")


def main(args) -> int:
    import torch

    from lmtrain.bench.peers import PEERS, PeerMismatch, _common_checks
    from lmtrain.config import ConfigError, load_config

    args.peers = [p for p in args.vs.split(",") if p]
    unknown = [p for p in args.peers if p not in PEERS]
    if unknown:
        raise ConfigError(f"bench train: --vs {','.join(unknown)}: unknown peer; choose from {', '.join(PEERS)}")
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1:
        raise ConfigError("bench train: --steps, --warmup and --rounds must be at least 1")
    try:
        args.lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"bench train: --lengths {args.lengths}: give comma-separated integers, e.g. "
                          "4096,8192,16384") from None
    if any(L < 2 for L in args.lengths):
        raise ConfigError("bench train: --lengths: every length must be at least 2")
    if args.memory_limit_gb < 0:
        raise ConfigError("bench train: --memory-limit-gb must be 0 (default) or positive")
    if args.lengths and not args.memory_limit_gb:
        args.memory_limit_gb = 0.9 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    for L in args.lengths:  # every length's config is valid before any process starts
        load_config(args.config, [*args.overrides, f"data.seq_len={L}"])
    cfg = load_config(args.config, args.overrides)  # bad keys fail here, before any process starts
    for v in args.variant:
        load_config(args.config, [*args.overrides, *v.split()])
    for peer in args.peers:
        try:
            _common_checks(cfg, peer, needs_no_bias=peer == "mpt")
        except PeerMismatch as e:
            raise ConfigError(str(e)) from None
    from lmtrain.train.hardware import cpu_description

    print(f"bench train: {args.config} {' '.join(args.overrides)}; {cfg.model.n_layers} layers, d_model "
          f"{cfg.model.d_model}, {cfg.model.n_heads} heads, d_ff {cfg.model.d_ff}, vocab {cfg.data.vocab_size}, "
          f"L {cfg.data.seq_len}, batch {cfg.data.batch_size}, {cfg.trainer.precision}; "
          f"{cpu_description()}, torch {torch.__version__}; "
          f"{args.rounds} rounds x ({args.warmup} + {args.steps}) steps", flush=True)
    if args.lengths:
        return _main_lengths(args)
    results = run(args)
    print()
    print(format_results(results))
    mismatched = [r for r in results if r["params"] != r["params_lmtrain"]]
    for r in results[1:]:
        if r["impl"].startswith("lmtrain "):
            print(f"{r['impl']}: {r['tokens_per_s'] / results[0]['tokens_per_s']:.3f}x the throughput of lmtrain as "
                  f"configured")
    for r in mismatched:
        print(f"warning: {r['impl']} has {r['params']:,} parameters, lmtrain {r['params_lmtrain']:,}: "
              f"not the same model", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "func"}, "date": time.strftime("%Y-%m-%d"),
                       "results": results}, f, indent=2)
    return 1 if mismatched else 0


def _main_lengths(args) -> int:
    by_length = run_lengths(args)
    for L, results in by_length.items():
        print(f"\nL = {L}:\n")
        print(format_results(results))
    print("\nScaling in L:\n")
    print(format_scaling(by_length))
    mismatched = [(L, r) for L, results in by_length.items() for r in results
                  if "failed" not in r and r["params"] != r["params_lmtrain"]]
    for L, r in mismatched:
        print(f"warning: L={L}: {r['impl']} has {r['params']:,} parameters, lmtrain {r['params_lmtrain']:,}: "
              f"not the same model", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "func"}, "date": time.strftime("%Y-%m-%d"),
                       "results": {str(L): r for L, r in by_length.items()}}, f, indent=2)
    return 1 if mismatched else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(measure(json.loads(sys.argv[2]))))
        sys.exit(0)
    print("use `lmtrain bench train ...`", file=sys.stderr)
    sys.exit(2)
