"""`lmtrain submit`: render an sbatch script from the templates in lmtrain/sbatch/ (package
data, so an installed lmtrain submits too), and submit it.

Every value that reaches the shell or an #SBATCH line (job name, partition, account, qos,
time, memory, paths, the environment hook, eval-length arguments) is checked against a
strict character set first; anything else, shell metacharacters above all, is refused
with a one-line error (exit code 2) before anything is written or submitted.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path
from string import Template
from typing import Optional

from lmtrain.config import Config, ConfigError, to_yaml

NAME = re.compile(r"[A-Za-z0-9._-]+")  # job names, qos, account
PARTITION = re.compile(r"[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*")
TIME = re.compile(r"(\d+-)?\d{1,3}:\d{2}(:\d{2})?|\d+")
MEM = re.compile(r"\d+[KMGT]?")
PATH = re.compile(r"[A-Za-z0-9._/+@=,~-]+")  # no spaces, quotes, $, `, ;, &, |, <, >, (, ), *, ?, [, ], {, }, !, #
ARG = re.compile(r"[A-Za-z0-9._/+@=,:-]+")


def _check(value: str, pattern: re.Pattern, key: str, what: str) -> str:
    if not pattern.fullmatch(value):
        raise ConfigError(f"{key}: {value!r} is not allowed here ({what}); shell metacharacters and spaces are refused")
    return value


def _path(p: Path | str, key: str) -> str:
    return _check(str(p), PATH, key, "a path of letters, digits and . _ / + @ = , ~ -")


def settings(cfg: Config, python: str, workdir: Path) -> dict:
    """The template values, each validated."""
    s, t = cfg.slurm, cfg.trainer
    run_dir = (workdir / cfg.run_dir).resolve()
    gpus = t.accelerator in ("gpu", "cuda")
    if not isinstance(t.devices, int) or t.devices < 1:
        raise ConfigError(f"trainer.devices: give the GPUs (tasks) per node as a number for `lmtrain submit`, "
                          f"not {t.devices}")
    job_name = _check(s.job_name or cfg.run.name, NAME, "slurm.job_name", "letters, digits, . _ -")
    scheduling = ""
    for key, value, pattern in (("partition", s.partition, PARTITION), ("account", s.account, NAME),
                                ("qos", s.qos, NAME)):
        if value:
            scheduling += f"#SBATCH --{key}={_check(value, pattern, f'slurm.{key}', 'a SLURM name')}\n"
    env_hook = ""
    if s.env_hook:
        hook = Path(s.env_hook).expanduser()
        if not hook.is_file():
            raise ConfigError(f"slurm.env_hook: {s.env_hook} is not a file "
                              "(a shell file with module loads, venv activation)")
        env_hook = f"source {_path(hook.resolve(), 'slurm.env_hook')}\n"
    return {
        "job_name": job_name,
        "nodes": str(t.num_nodes),
        "tasks_per_node": str(t.devices),
        "gres": f"#SBATCH --gpus-per-node={t.devices}\n" if gpus else "",
        "gres_one": "#SBATCH --gpus-per-node=1\n" if gpus else "",
        "cpus_per_task": str(s.cpus_per_task),
        "mem": _check(s.mem, MEM, "slurm.mem", "a size such as 480G, or 0 for all of a node's memory"),
        "time": _check(s.time, TIME, "slurm.time", "[D-]HH:MM:SS or minutes"),
        "scheduling": scheduling,
        "signal_seconds": str(s.signal_seconds),
        "env_hook": env_hook,
        "workdir": _path(workdir.resolve(), "working directory"),
        "python": _path(python, "python executable"),
        "run_dir": _path(run_dir, "run dir (run.root/run.name)"),
        "log_dir": _path(run_dir / "slurm", "run dir (run.root/run.name)"),
        "config": _path(run_dir / "slurm" / "config.yaml", "run dir (run.root/run.name)"),
    }


def eval_args(text: str) -> str:
    """Arguments for `lmtrain eval-length` in the dependent job, checked by its own parser."""
    from lmtrain.cli import build_parser

    args = shlex.split(text)
    for a in args:
        _check(a, ARG, "--eval-length", "eval-length options such as --lengths 128,512 --mode sliding")
    _, extra = build_parser().parse_known_args(["eval-length", "RUN", *args])
    if extra:
        raise ConfigError(f"--eval-length: unknown eval-length options {' '.join(extra)}")
    return " ".join(args)


def render(name: str, values: dict) -> str:
    return Template(resources.files("lmtrain.sbatch").joinpath(name).read_text()).substitute(values)


def template_for(cfg: Config) -> str:
    return "single_node.sbatch" if cfg.trainer.num_nodes == 1 else "multi_node.sbatch"


def sbatch(script: Path, *, dependency: Optional[str] = None) -> str:
    exe = shutil.which("sbatch")
    if exe is None:
        raise ConfigError("sbatch: not found on PATH; submit from a SLURM login node (or use --dry-run)")
    cmd = [exe, "--parsable", *([f"--dependency={dependency}"] if dependency else []), str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise ConfigError(f"sbatch failed: {lines[-1] if lines else f'exit code {proc.returncode}'}")
    return proc.stdout.strip().split(";")[0]


def submit(cfg: Config, *, dry_run: bool, eval_length: Optional[str] = None, python: str = sys.executable,
           workdir: Optional[Path] = None, log=print) -> list[str]:
    """Render (and unless dry_run, write and submit) the training job, and the dependent
    length evaluation when asked. Returns the job ids (empty for a dry run)."""
    workdir = workdir or Path.cwd()
    values = settings(cfg, python, workdir)
    train_script = render(template_for(cfg), values)
    eval_script = None
    if eval_length is not None:
        eval_script = render("eval_length.sbatch", {**values, "eval_args": eval_args(eval_length)})
    if dry_run:
        log(train_script)
        if eval_script:
            log("# --- dependent job (afterok) ---")
            log(eval_script)
        return []
    run_dir = Path(values["run_dir"])
    slurm_dir = run_dir / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    (slurm_dir / "config.yaml").write_text(to_yaml(cfg))
    train_path = slurm_dir / "train.sbatch"
    train_path.write_text(train_script)
    ids = [sbatch(train_path)]
    log(f"submitted {ids[0]}: {train_path} (logs: {slurm_dir}/{values['job_name']}-{ids[0]}.out)")
    if eval_script:
        eval_path = slurm_dir / "eval_length.sbatch"
        eval_path.write_text(eval_script)
        ids.append(sbatch(eval_path, dependency=f"afterok:{ids[0]}"))
        log(f"submitted {ids[1]}: {eval_path}, after job {ids[0]} succeeds")
    return ids
