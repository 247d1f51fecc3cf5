"""The `lmtrain` command line. Parsing and error reporting only; the work lives elsewhere.

Bad input (config, data source, data dir, checkpoint) exits with code 2 and one line on
stderr naming the key or path, before anything is written. So do the conditions of the
machine a user must act on: a full, read-only or forbidden disk, a missing GPU, and a run
stopped by the non-finite guard. Anything else is a bug: a traceback and exit 1.
"""

from __future__ import annotations

import argparse
import errno
import sys

EXIT_BAD_INPUT = 2
# OS errors a user fixes (space, permissions, a path that cannot be one), not bugs.
USER_OS_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                  errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                  errno.EPERM: "operation not permitted", errno.ENAMETOOLONG: "file name too long",
                  errno.ENOTDIR: "a path component is not a directory", errno.EISDIR: "is a directory"}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (its default prints the usage first): the CLI's promise."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"lmtrain: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


OVERRIDES_HELP = """\
overrides:
  key=value pairs after the preset change its keys (OmegaConf dotlist), e.g.
    lmtrain train configs/default.yaml run.name=rope8 model.position=rope model.n_layers=8
  Nested keys use dots; lists use brackets ('trainer.loggers=[tensorboard,csv]'); null
  clears a key; quote values holding * or spaces. All overrides apply together, after the
  preset. A model axis takes its kind directly (model.position=rope is
  model.position.kind=rope). `lmtrain config PRESET [overrides]` prints the result; an
  unknown key, a wrong type or a bad combination exits 2 with one line naming the key.
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML preset, e.g. configs/default.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="OmegaConf dotlist overrides")


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="lmtrain", description="Pretrain long-context decoder language models.")
    from lmtrain import __version__

    ap.add_argument("--version", action="version", version=f"lmtrain {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("prepare-data", help="train the tokenizer and pack the corpus into token files")
    _add_config_args(p)
    p.add_argument("--force", action="store_true", help="rebuild a data.dir prepared for other inputs")

    p = sub.add_parser("train", help="train (resumes automatically from RUN/checkpoints/last.ckpt)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=OVERRIDES_HELP)
    _add_config_args(p)
    p.add_argument("--resume", metavar="PATH", help="resume from this checkpoint file or run dir")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if the run dir holds a checkpoint")

    p = sub.add_parser("config", help="print the resolved config (exit 2 if it is invalid); --describe: every key "
                                      "with its type, value, choices and help")
    p.add_argument("config", nargs="?", help="YAML preset, e.g. configs/default.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="OmegaConf dotlist overrides")
    p.add_argument("--describe", action="store_true",
                   help="list every key (each kind's options included) with type, value, choices and one line of help")

    p = sub.add_parser("plan", help="parameters, ZeRO memory per GPU, activations and a micro-batch for a config")
    _add_config_args(p)
    p.add_argument("--gpu-mem", type=float, default=80.0, metavar="GB", help="memory of one GPU (default 80)")
    p.add_argument("--gpus", type=int, metavar="N",
                   help="data-parallel ranks (default: trainer.devices x trainer.num_nodes)")

    p = sub.add_parser("submit", help="render the sbatch script into RUN/slurm/ and submit it (SLURM)")
    _add_config_args(p)
    p.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    p.add_argument("--eval-length", metavar="ARGS",
                   help="also submit `lmtrain eval-length RUN ARGS` to run after training succeeds (afterok)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="one job array over these values (repeat for a product); task K trains in run.name-K, "
                        "resuming and requeueing on its own; RUN-sweep/sweep.tsv lists the tasks")
    p.add_argument("--dependency", metavar="SPEC",
                   help="passed to sbatch for the training job, e.g. afterok:123 or singleton")

    p = sub.add_parser("export", help="write consolidated fp32 safetensors, the config and the tokenizer "
                                      "(lmtrain's own layout, or a Hugging Face model directory)")
    p.add_argument("source", metavar="RUN_OR_CKPT")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the export directory (generate and eval-length accept an lmtrain export)")
    p.add_argument("--format", default="lmtrain", choices=("lmtrain", "hf"),
                   help="hf: config.json, HF-named model.safetensors, tokenizer files; a native transformers "
                        "architecture (MPT, GPT-NeoX, Llama) where the model is exactly one, else remote code")
    p.add_argument("--max-length", type=int, default=None, metavar="N",
                   help="hf: the longest sequence the export declares (default: 4x the training length)")

    p = sub.add_parser("eval-harness", help="lm-evaluation-harness on a run, checkpoint or export (exported to "
                                            "RUN/eval/hf first); results in RUN/eval/harness.{json,md} and TensorBoard")
    p.add_argument("source", metavar="RUN_OR_EXPORT")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names; local, no network: "
                                                  "lmtrain_python_mc (lmtrain/evaluate/harness_tasks/)")
    p.add_argument("--limit", type=float, default=None,
                   help="documents per task (a count; below 1: a fraction), as lm_eval --limit")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", default="1", help="as lm_eval --batch_size (a number or auto)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-tensorboard", action="store_true", help="do not log to the run's TensorBoard")

    p = sub.add_parser("bench", help="side-by-side benchmarks that report ratios (see docs/benchmarks.md)")
    bench = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    from lmtrain.bench.attention import add_arguments as bench_attention_args

    bench_attention_args(bench.add_parser("attention",
                                          help="forward+backward time and peak memory of an attention kernel"))
    from lmtrain.bench.act import add_arguments as bench_act_args
    from lmtrain.bench.memory import add_arguments as bench_memory_args

    bench_memory_args(bench.add_parser("memory", help="activation memory and time of a training step against depth, "
                                                      "per residual wiring (prenorm, two_stream, reversible)"))

    bench_act_args(bench.add_parser("act", help="what ACT halting saves: a trained ACT model's step time, "
                                                "running positions only vs every position vs all steps"))
    from lmtrain.bench.decode import add_arguments as bench_decode_args

    bench_decode_args(bench.add_parser("decode", help="generation tokens/s and layers per token with and without "
                                                      "early exit, batch 1 and 8, side by side"))
    from lmtrain.bench.train import add_arguments as bench_train_args

    bench_train_args(bench.add_parser("train", help="training tokens/s, MFU, memory and data wait of a config, "
                                                    "optionally against peer implementations (--vs mpt,xtransformers)"))

    p = sub.add_parser("inspect", help="the model of a run, checkpoint or export, its learned per-head statistics "
                                       "(spans) and per-token statistics (ACT steps)")
    p.add_argument("source", metavar="RUN_OR_CKPT")
    p.add_argument("--windows", type=int, default=16,
                   help="validation windows to measure per-token statistics on (default 16)")
    p.add_argument("--pattern-png", metavar="PATH",
                   help="also draw each layer's attention pattern (sparse kinds) into this PNG")

    p = sub.add_parser("generate", help="sample text from a run dir, checkpoint or export")
    p.add_argument("source", metavar="RUN_OR_CKPT")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 disables top-k filtering")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--no-cache", action="store_true", help="re-run the whole sequence each step")
    p.add_argument("--show-token-stats", "--show-ponder", "--show-exits", dest="show_token_stats",
                   action="store_true", help="mark each new token with the per-token statistic of the position that "
                                             "predicted it (ACT depth: its steps; early exit: its exit layer)")
    p.add_argument("--exit", choices=("softmax", "state", "halting", "classifier"),
                   help="early-exit models: a token leaves at the first exit whose confidence reaches --threshold "
                        "(softmax: top-1 minus top-2 probability; state: cosine of a layer's output and input; "
                        "halting: the halting unit; classifier: the trained exit classifier)")
    p.add_argument("--threshold", type=float,
                   help="the exit threshold (default: the one `lmtrain calibrate-exit` wrote into the run)")
    p.add_argument("--exit-layers",
                   help="the exits whose confidence is checked: comma-separated layers or all (default: the "
                        "calibrated ones with the calibrated threshold, else all)")

    p = sub.add_parser("eval-exit", help="early-exit models: validation loss against the mean exit layer, per "
                                         "threshold of a confidence measure",
                       description="Teacher-forced validation windows with per-token exits (exited tokens' states "
                                   "copied upward) at each threshold, beside full depth and each exit alone; writes "
                                   "RUN/eval/exit_MEASURE.{json,md}.")
    p.add_argument("source", metavar="RUN_OR_CKPT")
    p.add_argument("--measure", default="softmax", choices=("softmax", "state", "halting", "classifier"))
    p.add_argument("--thresholds", default="0.99,0.95,0.9,0.8,0.7,0.6,0.5,0.4,0.3,0.2",
                   help="comma-separated thresholds")
    p.add_argument("--max-tokens", type=int, default=65536, help="validation tokens to score")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")

    p = sub.add_parser("calibrate-exit", help="early-exit models: choose the exit threshold with a stated risk "
                                              "(Learn-then-Test) and write it into the run",
                       description="The full model's greedy continuations of validation prompts are the "
                                   "reference; at each threshold, from the most conservative down, the early-exit "
                                   "model predicts each next token of them; the lowest threshold whose risk of a "
                                   "differing token is at most --delta with "
                                   "probability 1 - --epsilon is written to RUN/exit/MEASURE.json. With --measure "
                                   "classifier the exit classifier is trained first (model frozen, on the "
                                   "training split).")
    p.add_argument("source", metavar="RUN")
    p.add_argument("--measure", default="softmax", choices=("softmax", "state", "halting", "classifier"))
    p.add_argument("--delta", type=float, default=0.05, help="the tolerated share of tokens that differ")
    p.add_argument("--epsilon", type=float, default=0.05, help="the probability that the guarantee fails")
    p.add_argument("--prompts", type=int, default=512,
                   help="validation prompts (the independent samples; the guarantee needs a few hundred)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="tokens of each prompt")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated from each prompt")
    p.add_argument("--exit-layers", default="auto",
                   help="the exits whose confidence is checked: auto (at each threshold, those whose check pays "
                        "for itself on training-split windows: a softmax check costs an LM head), all, or "
                        "comma-separated layers; written with the threshold")
    p.add_argument("--classifier-steps", type=int, default=300, help="--measure classifier: its training steps")
    p.add_argument("--batch-size", type=int, default=8, help="--measure classifier: windows per training step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")

    p = sub.add_parser("eval-length", help="perplexity against context length, for one or more runs",
                       description="Score the same tokens at every length; write JSON, CSV, markdown and plots "
                                   "into RUN/eval/ (and --out), and log to the run's TensorBoard.")
    p.add_argument("sources", nargs="+", metavar="RUN_OR_CKPT")
    p.add_argument("--lengths", help="comma-separated window lengths (default: the training length x 1,2,4,8,16,32)")
    p.add_argument("--mode", default="nonoverlap", choices=("nonoverlap", "sliding"))
    p.add_argument("--stride", type=int, help="sliding mode: tokens each window moves and scores (default: L/2)")
    p.add_argument("--max-tokens", type=int, default=16384, help="how many tokens to score (0: all there are)")
    p.add_argument("--data", metavar="PATH", help="a prepared data dir (its validation split) or any data source "
                   "(text files, jsonl/parquet); default: the run's own validation split")
    p.add_argument("--batch-tokens", type=int, default=16384, help="tokens per forward batch (memory bound)")
    _add_set(p)
    p.add_argument("--buckets-per-octave", type=int, default=4,
                   help="resolution of the per-position loss curve (buckets are log-spaced)")
    p.add_argument("--out", metavar="DIR", help="also write the combined report of all runs here")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--no-tensorboard", action="store_true", help="do not log to the runs' TensorBoard")

    p = sub.add_parser("eval-retrieval", help="long-range probes: passkey retrieval by length and depth, or the "
                                              "copy task, for one or more runs",
                       description="passkey: a key hidden at each depth of filler text, retrieved or not (a table and "
                                   "a heatmap); copy: accuracy on the copied half of fresh copy-task documents (models "
                                   "trained on data.source=copy). Writes into RUN/eval/ (and --out).")
    p.add_argument("sources", nargs="+", metavar="RUN_OR_CKPT")
    p.add_argument("--task", default="passkey", choices=("passkey", "copy"))
    p.add_argument("--lengths", help="comma-separated prompt lengths in tokens (default: passkey L/4,L/2,L; "
                                     "copy L/2,L,2L of the training length L)")
    p.add_argument("--depths", type=int, default=5, help="passkey: depths from 0 (start) to 1 (end), evenly spaced")
    p.add_argument("--trials", type=int, default=10, help="keys (passkey) or documents (copy) per cell")
    p.add_argument("--seed", type=int, default=0, help="draws the keys, filler stretches and copy documents")
    _add_set(p)
    p.add_argument("--filler", default="template", metavar="template|data|SOURCE",
                   help="passkey filler: the repeated sentence of the original test (template), the run's validation "
                        "text (data), or any data source")
    p.add_argument("--out", metavar="DIR", help="also write the combined report of all runs here")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--no-tensorboard", action="store_true", help="do not log to the runs' TensorBoard")
    return ap


def _add_set(p) -> None:
    p.add_argument("--set", action="append", default=[], metavar="model.KEY=VALUE", dest="model_overrides",
                   help="evaluate every model with this change to how it computes (repeatable), e.g. "
                        "model.attention.rounds=8 for more LSH hash rounds; the weights must still fit; "
                        "reports get the change in their names")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _fail(msg: str) -> int:
    print(f"lmtrain: error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


def cmd_config(args) -> int:
    from lmtrain.config import load_config, to_yaml

    if args.describe:
        from lmtrain.describe import describe_rows, format_describe

        cfg = load_config(args.config, args.overrides) if args.config or args.overrides else None
        print(format_describe(describe_rows(cfg), args.config))
        return 0
    if args.config is None:
        return _fail("config: give a preset (e.g. configs/default.yaml), or --describe")
    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_prepare(args) -> int:
    from data_pipelines.prepare import prepare
    from lmtrain.config import load_config

    prepare(load_config(args.config, args.overrides).data, force=args.force)
    return 0


def cmd_train(args) -> int:
    from lmtrain.config import load_config
    from lmtrain.train.run import train

    cfg = load_config(args.config, args.overrides)
    train(cfg, resume=args.resume, no_resume=args.no_resume)
    return 0


def cmd_plan(args) -> int:
    from lmtrain.config import ConfigError, load_config
    from lmtrain.plan import format_plan, plan

    cfg = load_config(args.config, args.overrides)
    per_node = cfg.trainer.devices if isinstance(cfg.trainer.devices, int) and cfg.trainer.devices > 0 else 1
    n_gpus = args.gpus if args.gpus is not None else per_node * cfg.trainer.num_nodes
    if n_gpus < 1:
        raise ConfigError("--gpus: must be at least 1")
    if not args.gpu_mem > 2.0:
        raise ConfigError("--gpu-mem: give the GPU's memory in GB, more than the 2 GB kept as headroom")
    print(format_plan(plan(cfg, gpu_mem_gb=args.gpu_mem, n_gpus=n_gpus)))
    return 0


def cmd_submit(args) -> int:
    from lmtrain.config import ConfigError, load_config
    from lmtrain.slurm import parse_sweeps, submit, sweep_name

    cfg = load_config(args.config, args.overrides)
    tasks = None
    if args.sweep:
        if any(s.split("=", 1)[0] in ("run.name", "run.root") for s in args.sweep):
            raise ConfigError("--sweep: run.name and run.root name the task run dirs (run.name-K); sweep other keys")
        tasks = [load_config(args.config, [*args.overrides, *o, f"run.name={sweep_name(cfg.run.name, k)}"])
                 for k, o in enumerate(parse_sweeps(args.sweep))]
    submit(cfg, dry_run=args.dry_run, eval_length=args.eval_length, sweep_tasks=tasks, dependency=args.dependency)
    return 0


def cmd_export(args) -> int:
    from lmtrain.export import export

    if args.max_length is not None and args.max_length < 1:
        return _fail(f"--max-length {args.max_length}: must be positive (the longest sequence the export declares)")
    export(args.source, args.out, fmt=args.format, max_length=args.max_length)
    return 0


def cmd_bench(args) -> int:
    from lmtrain.bench import act, attention, decode, memory, train

    return {"attention": attention.main, "act": act.main, "memory": memory.main, "train": train.main,
            "decode": decode.main}[args.bench](args)


def cmd_inspect(args) -> int:
    from lmtrain.inspection import inspect

    if args.windows < 1:
        return _fail("--windows: must be at least 1")
    print(inspect(args.source, windows=args.windows, pattern_png=args.pattern_png))
    return 0


def cmd_generate(args) -> int:
    import math

    import torch

    from data_pipelines.tokenizer import encode, eos_token_of, eot_id, load_tokenizer
    from lmtrain.generate import generate
    from lmtrain.train.checkpoint import load_trained, tokenizer_path

    if args.max_new_tokens < 1 or args.num_samples < 1:
        return _fail("--max-new-tokens and --num-samples: must be at least 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        return _fail("--temperature: must be 0 (greedy) or positive")
    if args.top_k < 0:
        return _fail("--top-k: must be 0 (off) or positive")
    if args.seed < 0:
        return _fail("--seed: must be 0 or positive")
    trained = load_trained(args.source, device=args.device)
    cfg, model = trained.cfg, trained.model
    tok_path = tokenizer_path(trained)
    if not tok_path.is_file():
        return _fail(f"the tokenizer of this model is missing: {tok_path} (data.dir of the run)")
    tok = load_tokenizer(tok_path)
    eot = eot_id(tok, eos_token_of(cfg.data))
    ids = encode(tok, args.prompt) if args.prompt else [eot]
    if model.max_len is not None and len(ids) + args.max_new_tokens > model.max_len:
        return _fail(f"--max-new-tokens: this model's {cfg.model.position.kind} positions end at {model.max_len}; "
                     f"the prompt has {len(ids)} tokens, so at most {model.max_len - len(ids)} new ones fit")
    if args.exit:
        from lmtrain.exits import apply_exit, parse_checked_exits

        args.threshold, _ = apply_exit(model, trained.run_dir, args.exit, args.threshold, trained.step,
                                       parse_checked_exits(args.exit_layers))
    elif args.threshold is not None or args.exit_layers is not None:
        return _fail("--threshold and --exit-layers: give them with --exit")
    else:  # generation runs every layer unless --exit asks otherwise (the config's measure is for evaluation)
        with_exits = getattr(model.depth, "set_exit_policy", None)
        if with_exits is not None:
            with_exits("none", 1.0)
    stat = model.depth.primary_token_stat
    if args.show_token_stats and stat == "exit_layer" and not args.exit:
        return _fail("--show-exits: give --exit MEASURE (without it every token runs every layer)")
    if args.show_token_stats and stat is None:
        return _fail(f"--show-token-stats: model.depth.kind={cfg.model.depth.kind} reports no per-token statistic "
                     "(depth kinds such as act do)")
    prompt = torch.tensor([ids] * args.num_samples, device=args.device)
    stats: list = []
    out = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                   seed=args.seed, use_cache=not args.no_cache, token_stats=stats if args.show_token_stats else None)
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i} ---")
        if args.show_token_stats:
            print(stat_marked(tok, row[len(ids):], [int(s[stat][i]) for s in stats], args.prompt, eot, stat))
            continue
        text = tok.decode([t for t in row if t != eot]) if not args.prompt else tok.decode(row[len(ids):])
        print(args.prompt + text)
    return 0


def stat_marked(tok, new_ids: list[int], values: list[int], prompt: str, eot: int, name: str) -> str:
    """The prompt, then each new token followed by its statistic in brackets, then a summary."""
    parts = [prompt]
    for t, n in zip(new_ids, values):
        parts.append(("<eot>" if t == eot else tok.decode([t])) + f"[{n}]")
    hist = {k: values.count(k) for k in sorted(set(values))}
    mean = sum(values) / max(1, len(values))
    return "".join(parts) + f"\n({name} per new token: mean {mean:.2f}; " + \
        ", ".join(f"{k}: {v}" for k, v in hist.items()) + ")"


def cmd_eval_length(args) -> int:
    from pathlib import Path

    from lmtrain.evaluate.length import EvalError
    from lmtrain.evaluate.report import log_tensorboard, markdown, report_dict, write_report
    from lmtrain.evaluate.runner import evaluate_runs, parse_lengths

    if args.max_tokens is not None and args.max_tokens < 0:
        raise EvalError("--max-tokens: must be 0 (all) or positive")
    report = evaluate_runs(args.sources, lengths=parse_lengths(args.lengths) if args.lengths else None,
                           mode=args.mode, stride=args.stride, max_tokens=args.max_tokens or None, data=args.data,
                           batch_tokens=args.batch_tokens, buckets_per_octave=args.buckets_per_octave,
                           device=args.device, progress_bar=True, log=lambda s: print(s, file=sys.stderr),
                           overrides=args.model_overrides)
    print(markdown(report_dict(report)), end="")
    written = []
    for run in report["runs"]:
        written += write_report(report, run.trained.run_dir / "eval", runs=[run])
        if not args.no_tensorboard:
            log_tensorboard(report, run)
    if args.out:
        written += write_report(report, Path(args.out))
    dirs = sorted({str(p.parent) for p in written})
    print(f"\nwrote {len(written)} files into {', '.join(dirs)} ({report['seconds']} s)", file=sys.stderr)
    return 0


def cmd_eval_retrieval(args) -> int:
    from pathlib import Path

    from lmtrain.evaluate.probes import evaluate_retrieval, log_tensorboard, markdown, write_report
    from lmtrain.evaluate.runner import parse_lengths

    report = evaluate_retrieval(args.sources, task=args.task,
                                lengths=parse_lengths(args.lengths) if args.lengths else None, depths=args.depths,
                                trials=args.trials, seed=args.seed, filler=args.filler, device=args.device,
                                log=lambda s: print(s, file=sys.stderr), overrides=args.model_overrides)
    print(markdown(report), end="")
    written = []
    for run in report["runs"]:
        run_dir = Path(run["run_dir"])
        one = {**report, "runs": [run]}
        written += write_report(one, run_dir / "eval")
        if not args.no_tensorboard and (run_dir / "tb").is_dir():
            log_tensorboard(report, run_dir, run)
    if args.out:
        written += write_report(report, Path(args.out))
    print(f"\nwrote {len(written)} files into {', '.join(sorted({str(p.parent) for p in written}))} "
          f"({report['seconds']} s)", file=sys.stderr)
    return 0


def cmd_eval_exit(args) -> int:
    import json
    from pathlib import Path

    from lmtrain.exits import exit_tradeoff, load_classifier, require_measure, tradeoff_markdown
    from lmtrain.train.checkpoint import load_trained
    from lmtrain.train.data import WindowDataset, validation_sample

    try:
        thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    except ValueError:
        return _fail(f"--thresholds {args.thresholds}: give comma-separated numbers, e.g. 0.9,0.8")
    if not thresholds:
        return _fail("--thresholds: give at least one")
    if args.max_tokens < 1:
        return _fail("--max-tokens: must be at least 1")
    trained = load_trained(args.source, device=args.device)
    model, cfg = trained.model, trained.cfg
    depth = require_measure(model, args.measure)
    if args.measure == "classifier":
        depth.classifier = load_classifier(model, trained.run_dir)
    val = WindowDataset(cfg.data.dir, "val", cfg.data.seq_len)
    n = max(1, min(len(val), args.max_tokens // cfg.data.seq_len))
    rep = exit_tradeoff(model, validation_sample(val, n), measure=args.measure, thresholds=thresholds,
                        log=lambda s: print(s, file=sys.stderr))
    rep.update({"source": str(trained.checkpoint), "step": trained.step})
    print(tradeoff_markdown(rep), end="")
    out = Path(trained.run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"exit_{args.measure}.json").write_text(json.dumps(rep, indent=2) + "\n")
    (out / f"exit_{args.measure}.md").write_text(tradeoff_markdown(rep))
    print(f"wrote {out}/exit_{args.measure}.{{json,md}}", file=sys.stderr)
    return 0


def cmd_calibrate_exit(args) -> int:
    import json

    import torch

    from data_pipelines.shards import open_tokens
    from lmtrain.exits import (
        CLASSIFIER_FILE,
        SELECT_WINDOWS,
        ExitError,
        calibrate,
        describe_checked,
        exit_dir,
        exit_prompts,
        parse_checked_exits,
        require_measure,
        train_classifier,
    )
    from lmtrain.train.checkpoint import load_trained

    for name in ("prompts", "prompt_tokens", "new_tokens", "classifier_steps", "batch_size"):
        if getattr(args, name) < 1:
            return _fail(f"--{name.replace('_', '-')}: must be at least 1")
    if not (0 < args.delta < 1 and 0 < args.epsilon < 1):
        return _fail("--delta and --epsilon: must be in (0, 1)")
    auto = args.exit_layers == "auto"
    checked = None if auto else parse_checked_exits(args.exit_layers)  # bad input fails before any work
    trained = load_trained(args.source, device=args.device)
    model, cfg = trained.model, trained.cfg
    require_measure(model, args.measure)
    if model.max_len is not None and args.prompt_tokens + args.new_tokens > model.max_len:
        return _fail(f"--prompt-tokens + --new-tokens: this model's positions end at {model.max_len}")
    val = torch.from_numpy(open_tokens(cfg.data.dir, "val").astype("int64"))
    span = args.prompt_tokens
    try:  # the first half of the validation split (bench decode checks on the second)
        prompts = exit_prompts(val, args.prompts, span, "calibration").to(args.device)
    except ExitError as e:
        return _fail(f"--prompts x --prompt-tokens: {e}")
    out = exit_dir(trained.run_dir)
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    if checked is not None:
        try:
            model.depth.set_exit_policy("none", 1.0, None, checked)
        except ValueError as e:
            return _fail(f"--exit-layers: {e}")
    # Training-split windows: the classifier's data, and where `--exit-layers auto` weighs each
    # exit's check against what it saves (never the calibration prompts).
    train = torch.from_numpy(open_tokens(cfg.data.dir, "train").astype("int64"))
    L = cfg.data.seq_len
    n = min(4096 if args.measure == "classifier" else SELECT_WINDOWS, train.numel() // L)
    g = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, train.numel() - L, (n,), generator=g)
    windows = torch.stack([train[s:s + L] for s in starts.tolist()]).to(args.device)
    facts = {}
    if args.measure == "classifier":
        from safetensors.torch import save_model

        clf, facts = train_classifier(model, windows, steps=args.classifier_steps, batch_size=args.batch_size,
                                      seed=args.seed, log=log)
        out.mkdir(parents=True, exist_ok=True)
        save_model(clf, str(out / CLASSIFIER_FILE))
        model.depth.classifier = clf.to(dtype=next(model.parameters()).dtype)
    rep = calibrate(model, prompts, measure=args.measure, delta=args.delta, epsilon=args.epsilon,
                    new_tokens=args.new_tokens, checked=checked,
                    select_windows=windows[:SELECT_WINDOWS] if auto else None, log=log)
    rep.update({"source": str(trained.checkpoint), "step": trained.step, "prompt_tokens": span, **(
        {"classifier": facts} if facts else {})})
    if rep["threshold"] is None:
        return _fail(f"no threshold of --measure {args.measure} keeps the risk at most --delta {args.delta} with "
                     f"{args.prompts} prompts (the most conservative had risk {rep['tested'][0]['risk']}); raise "
                     "--delta or --prompts")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.measure}.json"
    path.write_text(json.dumps(rep, indent=2) + "\n")
    at = rep["checked_exits"]
    print(f"threshold {rep['threshold']} for --exit {args.measure}: risk {rep['risk']} (at most {args.delta} with "
          f"probability {1 - args.epsilon:.2f}), mean exit layer {rep['mean_exit_layer']} of {rep['n_layers']}, "
          f"exits checked: {describe_checked(at)}")
    print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_eval_harness(args) -> int:
    import torch

    from lmtrain.evaluate.harness import evaluate_harness, write_report

    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    rep = evaluate_harness(args.source, tasks=[t for t in args.tasks.split(",") if t], limit=limit,
                           batch_size=args.batch_size, num_fewshot=args.num_fewshot,
                           device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                           log=lambda s: print(s, file=sys.stderr))
    print(rep["table"], end="")
    written = write_report(rep, tensorboard=not args.no_tensorboard)
    print(f"wrote {', '.join(str(p) for p in written)} ({rep['seconds']} s)", file=sys.stderr)
    return 0


COMMANDS = {"config": cmd_config, "eval-retrieval": cmd_eval_retrieval, "eval-harness": cmd_eval_harness,
            "prepare-data": cmd_prepare, "train": cmd_train, "generate": cmd_generate,
            "eval-length": cmd_eval_length, "calibrate-exit": cmd_calibrate_exit,
            "eval-exit": cmd_eval_exit, "plan": cmd_plan,
            "submit": cmd_submit,
            "export": cmd_export, "inspect": cmd_inspect, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Options may follow the overrides (`train cfg a=1 --no-resume b=2`): collect the rest.
    stray = [x for x in extra if "=" not in x or x.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from data_pipelines.shards import DataDirError
    from data_pipelines.sources import SourceError
    from lmtrain.config import ConfigError
    from lmtrain.evaluate.length import EvalError
    from lmtrain.exits import ExitError
    from lmtrain.train.checkpoint import CheckpointError
    from lmtrain.train.run import ResumeError, TrainingStopped
    from lmtrain.train.rundir import RunDirError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, SourceError, DataDirError, ResumeError, EvalError, CheckpointError, RunDirError, ExitError,
            TrainingStopped, FileNotFoundError, FileExistsError) as e:
        return _fail(_one_line(e))
    except OSError as e:
        if e.errno not in USER_OS_ERRORS:
            raise
        where = e.filename or "the disk"
        return _fail(f"{where}: {USER_OS_ERRORS[e.errno]} ({e.strerror})")
    except KeyboardInterrupt:
        print("lmtrain: interrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    text = str(e)
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: the original message is last
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
