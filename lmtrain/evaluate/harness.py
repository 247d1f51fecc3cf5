"""`lmtrain eval-harness RUN_OR_EXPORT --tasks ...`: lm-evaluation-harness on a trained model.

A run, checkpoint or lmtrain export is first exported with `--format hf` into RUN/eval/hf/
(native MPT / GPT-NeoX / Llama where the model is one, else remote code); a Hugging Face
export directory is used as it is. Then lm-evaluation-harness scores it through its own `hf`
model (`lm_eval --model hf`), so the numbers are the ones `lm_eval` prints when run directly
on that directory. Results: RUN/eval/harness.json and harness.md, TensorBoard scalars
`harness/TASK/METRIC` at the model's step.

Tasks: any lm-evaluation-harness task (those that download data need the network: the
user's business) and the local ones in lmtrain/evaluate/harness_tasks/ (no network), which
`lm_eval --include_path lmtrain/evaluate/harness_tasks` also finds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

from lmtrain.evaluate.length import EvalError

TASKS_DIR = Path(__file__).with_name("harness_tasks")
EXPORT_SUBDIR = "hf"


def _model_dir(source: Path, log: Callable[[str], None]) -> tuple[Path, Path, int]:
    """(HF directory to score, directory the results go to, step)."""
    from lmtrain.export import export
    from lmtrain.train.checkpoint import EXPORT_META, load_trained

    meta = source / EXPORT_META
    if source.is_dir() and (source / "config.json").is_file():  # a Hugging Face export
        step = json.loads(meta.read_text()).get("step", -1) if meta.is_file() else -1
        return source, source, int(step)
    t = load_trained(source, with_model=False, log=log)
    out = t.run_dir / "eval" / EXPORT_SUBDIR
    export(source, out, fmt="hf", log=log)
    return out, t.run_dir, t.step


def _metrics(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results ('acc,none' -> 'acc'; stderr kept)."""
    out = {}
    for task, values in results.items():
        out[task] = {k.split(",")[0]: float(v) for k, v in values.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out


def evaluate_harness(source: str, *, tasks: list[str], limit: Optional[float], batch_size: str,
                     num_fewshot: Optional[int], device: str, log: Callable[[str], None] = print) -> dict:
    try:
        import accelerate  # noqa: F401  (lm-eval's hf model imports it)
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalError("eval-harness needs lm-evaluation-harness with its hf extra: pip install 'lmtrain[eval]' "
                        "(lm_eval[hf]>=0.4.13)") from None
    if not tasks:
        raise EvalError("--tasks: name at least one task, e.g. --tasks lmtrain_python_mc")
    if limit is not None and limit <= 0:
        raise EvalError(f"--limit {limit:g}: must be positive (a count, or a fraction below 1)")
    manager = TaskManager(include_path=str(TASKS_DIR))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        local = ", ".join(sorted(p.stem for p in TASKS_DIR.glob("*.yaml")))
        raise EvalError(f"--tasks: unknown task(s) {', '.join(unknown)}; local tasks: {local}; "
                        "list all with `lm_eval ls tasks`")
    model_dir, out_dir, step = _model_dir(Path(source), log)
    t0 = time.time()
    res = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(model_dir), "trust_remote_code": True,
                                                          "dtype": "float32"},
                                  tasks=tasks, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                                  device=device, task_manager=manager, log_samples=False)
    from lm_eval.utils import make_table

    return {"model_dir": str(model_dir), "out_dir": str(out_dir), "step": step, "tasks": tasks, "limit": limit,
            "num_fewshot": num_fewshot, "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "seconds": round(time.time() - t0, 1),
            "metrics": _metrics(res["results"]), "table": make_table(res)}


def write_report(rep: dict, tensorboard: bool) -> list[Path]:
    out = Path(rep["out_dir"]) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "harness.json", out / "harness.md"
    js.write_text(json.dumps({k: v for k, v in rep.items() if k != "table"}, indent=2) + "\n")
    md.write_text(f"lm-evaluation-harness {rep['lm_eval_version']} on {rep['model_dir']} (step {rep['step']}), "
                  f"limit {rep['limit']}, {rep['date']}\n\n{rep['table']}")
    run_dir = Path(rep["out_dir"])
    if tensorboard and (run_dir / "tb").is_dir():
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(run_dir / "tb")) as w:
            for task, metrics in rep["metrics"].items():
                for name, value in metrics.items():
                    if not name.endswith("_stderr"):
                        w.add_scalar(f"harness/{task}/{name}", value, rep["step"])
    return [js, md]
