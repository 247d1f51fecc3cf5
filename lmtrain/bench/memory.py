"""`lmtrain bench memory`: activation memory and time of one training step against depth,
for residual wirings side by side (prenorm, two_stream, reversible).

Each (wiring, depth) runs in its own process. The model trains one warm-up step (AdamW,
so that gradients and optimizer state exist and stay allocated), then the measured step:

  * activation memory - the peak during forward + backward minus what was held just before
                        the forward (weights, gradients, optimizer state): on CUDA the
                        allocator's peak, on CPU the process's peak resident memory (VmHWM,
                        reset through /proc/self/clear_refs; glibc's mmap threshold is
                        fixed so that freed memory leaves the process, see `child_env`).
                        The optimizer step's
                        temporaries are not activations and are left out;
  * time              - the median of `--repeats` further whole steps (with the optimizer),
                        then the median over `--rounds` processes per case, the cases
                        alternating round by round.

`two_stream` is the same function as `reversible` under plain autograd, so the pair shows
what the reconstruction costs in time and saves in memory; `prenorm` is the ordinary stack.
A long sequence and a small batch make activations dominate, as the issue asks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

from lmtrain.bench.process import alternate, medians

WIRINGS = ("prenorm", "two_stream", "reversible")


def child(spec: dict) -> dict:
    import torch

    from lmtrain.bench.process import reset_peak, rss_kb, trim
    from lmtrain.config import load_config
    from lmtrain.model import build_model
    from lmtrain.model.reversible import reconstruction_error
    from lmtrain.train.module import lm_loss

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    cuda = spec["device"] == "cuda"
    cfg = load_config(None, [
        f"model.residual={spec['residual']}", f"model.n_layers={spec['layers']}", f"model.d_model={spec['d_model']}",
        f"model.n_heads={spec['heads']}", f"model.d_ff={4 * spec['d_model']}", f"data.seq_len={spec['length']}",
        f"data.vocab_size={spec['vocab']}", f"model.dropout={spec['dropout']}", f"model.position={spec['position']}",
        *spec.get("overrides", [])])
    torch.manual_seed(0)
    model = build_model(cfg, device=spec["device"]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, spec["vocab"], (spec["batch"], spec["length"] + 1), device=spec["device"])

    def forward_backward():
        out = model(x[:, :-1])
        lm_loss(out.logits_BLV, x[:, 1:]).backward()
        if cuda:
            torch.cuda.synchronize()

    def step():
        forward_backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # gradients stay allocated: they are not activations
        if cuda:
            torch.cuda.synchronize()

    step()  # warm-up: gradients and optimizer state now exist
    trim()
    # Activations: the peak of forward + backward over what was held before it. The optimizer
    # step's temporaries (one per parameter tensor) are not activations and are left out.
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        forward_backward()
        activation = torch.cuda.max_memory_allocated() - before
    else:
        before = rss_kb("VmRSS") * 1024
        ok = reset_peak()
        forward_backward()
        activation = rss_kb("VmHWM") * 1024 - before if ok else None
    opt.step()
    opt.zero_grad(set_to_none=False)
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    err = None
    if spec["residual"] == "reversible":
        from lmtrain.model.layer import Context
        from lmtrain.model.outputs import Aux

        model.eval()
        with torch.no_grad():
            emb = model.embed(x[:, :-1])
            ctx = Context(pos_L=torch.arange(spec["length"], device=emb.device), position=model.position, aux=Aux())
            err = reconstruction_error(list(model.depth.layers), emb, ctx)
    return {"activation_mb": None if activation is None else activation / 2**20, "time_s": statistics.median(times),
            "held_mb": before / 2**20, "reconstruction_error": err, "threads": torch.get_num_threads()}


def child_env(device: str) -> dict:
    """On CPU, glibc's malloc keeps freed chunks and raises its mmap threshold as it goes, so
    the resident peak includes freed memory in a pattern that depends on the allocation
    history (it grew with depth for the reversible wiring whose live memory does not). A
    fixed mmap threshold returns every large freed tensor to the OS, so the resident peak is
    the live peak. Page faults make every step slower, for all wirings alike."""
    env = dict(os.environ)
    if device == "cpu":
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    return env


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", default="4,8,16,32", help="comma-separated depths")
    p.add_argument("--residual", default=",".join(WIRINGS), help=f"comma-separated wirings ({', '.join(WIRINGS)})")
    p.add_argument("--length", type=int, default=2048, help="sequence length (long: activations dominate)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512, help="vocabulary (small: the logits do not dominate)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--position", default="rope",
                   help="positional scheme (default rope; on CPU alibi materialises its bias in every layer's "
                        "forward, which a recomputing wiring pays twice)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per process (median)")
    p.add_argument("--rounds", type=int, default=3, help="processes per case, alternating (median)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="a config override for every case (repeatable), e.g. --set model.attention.kind=lsh "
                        "--set model.ffn_chunk=1024 (the Reformer recipe)")
    p.add_argument("--out", help="also write the results as JSON here")


def main(args) -> int:
    from lmtrain.config import ConfigError

    try:
        depths = [int(v) for v in args.layers.split(",")]
    except ValueError:
        raise ConfigError(f"--layers {args.layers}: give comma-separated integers, e.g. 4,8,16,32") from None
    wirings = args.residual.split(",")
    bad = [w for w in wirings if w not in WIRINGS]
    if bad or not depths or min(depths) < 1 or args.length < 2 or args.repeats < 1 or args.rounds < 1:
        raise ConfigError(f"bench memory: --residual from {', '.join(WIRINGS)}; --layers, --length, --repeats positive")
    import torch

    from lmtrain.config import load_config

    load_config(None, [f"data.seq_len={args.length}", f"model.position={args.position}", *args.overrides])
    print(f"bench memory: L={args.length}, batch {args.batch}, d_model {args.d_model}, {args.heads} heads, "
          f"position {args.position}, vocab "
          f"{args.vocab}, fp32, one training step (AdamW) on {args.device}; "
          f"{platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}"
          + (f"; {' '.join(args.overrides)}" if args.overrides else ""), flush=True)
    specs = {}
    for n in depths:
        for w in wirings:
            specs[f"{w} x {n}"] = {"residual": w, "layers": n, "length": args.length, "batch": args.batch,
                                   "d_model": args.d_model, "heads": args.heads, "vocab": args.vocab,
                                   "dropout": args.dropout, "position": args.position, "repeats": args.repeats,
                                   "threads": args.threads, "device": args.device, "overrides": args.overrides}
    runs = alternate([(label, [sys.executable, "-m", "lmtrain.bench.memory", json.dumps(spec)])
                      for label, spec in specs.items()], args.rounds, env=child_env(args.device),
                     show=lambda _, r: f"activations {r['activation_mb']:9.1f} MB  step {r['time_s']:7.3f} s")
    results = [{**specs[label], **medians(rs, ("time_s", "activation_mb")), "times_s": [x["time_s"] for x in rs]}
               for label, rs in runs.items()]
    print()
    print(format_table(results, depths, wirings))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "date": time.strftime("%Y-%m-%d"), "results": results}, f, indent=2)
    return 0


def format_table(results: list[dict], depths: list[int], wirings: list[str]) -> str:
    by = {(r["residual"], r["layers"]): r for r in results}
    lo = min(depths)
    lines = ["| wiring | " + " | ".join(f"{n} layers: MB / s" for n in depths)
             + f" | memory {max(depths)} vs {lo} layers |",
             "|---|" + "---:|" * (len(depths) + 1)]
    for w in wirings:
        cells = [f"{by[w, n]['activation_mb']:.0f} / {by[w, n]['time_s']:.2f}" for n in depths]
        ratio = by[w, max(depths)]["activation_mb"] / by[w, lo]["activation_mb"]
        lines.append(f"| {w} | " + " | ".join(cells) + f" | {ratio:.2f}x |")
    if "reversible" in wirings and "two_stream" in wirings:
        ratios = [by["reversible", n]["time_s"] / by["two_stream", n]["time_s"] for n in depths]
        lines += ["", "reversible step time vs two_stream (same function, plain autograd): " +
                  ", ".join(f"{n} layers {r:.2f}x" for n, r in zip(depths, ratios))]
        errs = [by["reversible", n]["reconstruction_error"] for n in depths]
        lines.append("largest relative reconstruction error of the layer inputs: " +
                     ", ".join(f"{n} layers {e:.1e}" for n, e in zip(depths, errs)))
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
