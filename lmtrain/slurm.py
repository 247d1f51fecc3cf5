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
# slurm.extra: one sbatch option per entry (node lists need brackets: --exclude=node[01-04]).
EXTRA = re.compile(r"--[a-z][a-z0-9-]*(=[A-Za-z0-9._:,@/+%=\[\]-]+)?")
# Options lmtrain writes itself: their own key (or none: lmtrain needs them as they are).
OWNED = {"job-name": "slurm.job_name", "partition": "slurm.partition", "account": "slurm.account",
         "qos": "slurm.qos", "time": "slurm.time", "mem": "slurm.mem", "cpus-per-task": "slurm.cpus_per_task",
         "nodes": "trainer.num_nodes", "ntasks-per-node": "trainer.devices", "gpus-per-node": "trainer.devices",
         "signal": "slurm.signal_seconds", "output": None, "error": None, "open-mode": None, "requeue": None,
         "no-requeue": None, "array": None, "dependency": None}
_AFTER = r"(after(ok|any|notok|corr|burstbuffer)?(:\d+(_\d+)?(\+\d+)?)+|singleton)"
DEPENDENCY = re.compile(rf"{_AFTER}([,?]{_AFTER})*")


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
    extra = ""
    for item in s.extra:
        _check(item, EXTRA, "slurm.extra", "sbatch options such as --constraint=a100 or --exclusive")
        option = item[2:].split("=", 1)[0]
        if option in OWNED:
            where = f"set it with {OWNED[option]}" if OWNED[option] else "lmtrain writes it itself"
            raise ConfigError(f"slurm.extra: --{option} is not allowed here ({where})")
        extra += f"#SBATCH {item}\n"
    return {
        "job_name": job_name,
        "extra": extra,
        "array": "",
        "log_name": "%x-%j",
        "config_block": f"CONFIG={_path(run_dir / 'slurm' / 'config.yaml', 'run dir (run.root/run.name)')}\n",
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


class _Writes:
    """Files written for a submission, undone if sbatch refuses it: a failed submission leaves
    the run dirs as they were (files restored, directories it made removed)."""

    def __init__(self):
        self.files: list[tuple[Path, Optional[bytes]]] = []
        self.dirs: list[Path] = []

    def mkdir(self, d: Path) -> None:
        missing = [p for p in [d, *d.parents] if not p.exists()]
        d.mkdir(parents=True, exist_ok=True)
        self.dirs.extend(reversed(missing))

    def write(self, path: Path, text: str) -> Path:
        self.mkdir(path.parent)
        self.files.append((path, path.read_bytes() if path.is_file() else None))
        path.write_text(text)
        return path

    def undo(self) -> None:
        for path, old in reversed(self.files):
            if old is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(old)
        for d in reversed(self.dirs):
            try:
                d.rmdir()
            except OSError:
                pass


def parse_sweeps(items: list[str]) -> list[list[str]]:
    """`--sweep key=v1,v2` (each may repeat) -> the overrides of every task, the product of the
    sweeps in order (the last varies fastest). Commas inside brackets stay with their value."""
    axes = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"--sweep {item}: write key=value1,value2")
        parts, depth, cur = [], 0, ""
        for ch in values:
            depth += ch in "[{" and 1 or 0
            depth -= ch in "]}" and 1 or 0
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        parts.append(cur)
        if any(not v for v in parts) or len(set(parts)) != len(parts):
            raise ConfigError(f"--sweep {item}: give distinct, non-empty values separated by commas")
        axes.append([f"{key}={v}" for v in parts])
    tasks = [[]]
    for axis in axes:
        tasks = [[*t, o] for t in tasks for o in axis]
    return tasks


def sweep_name(name: str, k: int) -> str:
    return f"{name}-{k}"


def check_partition(cfg: Config, run=subprocess.run) -> Optional[str]:
    """Refuse a request no node of the partition can hold, when `sinfo` can tell (CPUs, memory
    and GPUs per node, node count); None when it fits or sinfo cannot answer. Such a job would
    pend forever (reason PartitionConfig) without a word."""
    exe = shutil.which("sinfo")
    if exe is None:
        return None
    s, t = cfg.slurm, cfg.trainer
    cmd = [exe, "-h", "-o", "%P|%c|%m|%D|%G"] + (["-p", s.partition.split(",")[0]] if s.partition else [])
    try:
        proc = run(cmd, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    rows = [line.split("|") for line in proc.stdout.strip().splitlines() if line.count("|") == 4]
    if proc.returncode != 0 or not rows:
        return None
    if s.partition:
        rows = [r for r in rows if r[0].rstrip("*") == s.partition.split(",")[0]] or rows
    else:
        rows = [r for r in rows if r[0].endswith("*")] or rows[:1]
    part = rows[0][0].rstrip("*")
    rows = [r for r in rows if r[0].rstrip("*") == part]

    def number(text: str) -> int:
        m = re.match(r"\d+", text)
        return int(m.group()) if m else 0

    cpus = max(number(r[1]) for r in rows)
    mem_mb = max(number(r[2]) for r in rows)
    nodes = sum(number(r[3]) for r in rows)
    gpus = max((int(g.group(1)) for r in rows for g in re.finditer(r"gpu(?::[^:,()]+)?:(\d+)", r[4])), default=0)
    tasks = t.devices if isinstance(t.devices, int) and t.devices > 0 else 1
    if s.cpus_per_task * tasks > cpus:
        fit = max(cpus // tasks, 1)
        return (f"slurm.cpus_per_task: {s.cpus_per_task} CPUs x {tasks} task(s) per node = {s.cpus_per_task * tasks}, "
                f"but nodes of partition {part} have {cpus}; set slurm.cpus_per_task={fit}")
    if t.num_nodes > nodes:
        return f"trainer.num_nodes: {t.num_nodes} nodes, but partition {part} has {nodes}; lower trainer.num_nodes"
    want_mb = _megabytes(s.mem)
    if want_mb and want_mb > mem_mb:
        return (f"slurm.mem: {s.mem} per node, but nodes of partition {part} have {mem_mb} MB; "
                f"set slurm.mem={mem_mb}M or 0")
    if t.accelerator in ("gpu", "cuda") and tasks > gpus:
        return (f"trainer.devices: {tasks} GPUs per node, but nodes of partition {part} have {gpus}; set "
                f"trainer.devices={gpus}" if gpus else f"trainer.accelerator: partition {part} has no GPUs")
    return None


def _megabytes(mem: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)", mem)
    if not m:
        return 0
    return int(m.group(1)) * {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 ** 2}[m.group(2)]


def submit(cfg: Config, *, dry_run: bool, eval_length: Optional[str] = None, python: str = sys.executable,
           workdir: Optional[Path] = None, log=print, sweep_tasks: Optional[list] = None,
           dependency: Optional[str] = None) -> list[str]:
    """Render (and unless dry_run, write and submit) the training job, and the dependent
    length evaluation when asked. `sweep_tasks`: one config per array task (their run dirs
    `run.name-K`), submitted as one job array. Returns the job ids (empty for a dry run)."""
    workdir = workdir or Path.cwd()
    if dependency is not None and not DEPENDENCY.fullmatch(dependency):
        raise ConfigError(f"--dependency: {dependency!r} is not a SLURM dependency (e.g. afterok:123, "
                          "afterany:123:124, singleton)")
    configs = sweep_tasks or [cfg]
    per_task = [settings(c, python, workdir) for c in configs]  # all checked before anything is written
    values, run_dirs = per_task[0], [Path(v["run_dir"]) for v in per_task]
    if sweep_tasks:
        # One script serves every task: what it requests must not depend on the task.
        shared = [k for k in per_task[0] if k not in ("job_name", "run_dir", "log_dir", "config", "config_block")]
        differ = sorted({k for v in per_task[1:] for k in shared if v[k] != per_task[0][k]})
        if differ:
            raise ConfigError(f"--sweep: the tasks of one job array share its request, and these differ between "
                              f"them: {', '.join(differ)}; sweep other keys, or submit separately")
        base = Path(values["run_dir"]).parent
        sweep_dir = base / f"{cfg.run.name}-sweep"
        values = {**values, "job_name": settings(cfg, python, workdir)["job_name"],
                  "array": f"#SBATCH --array=0-{len(configs) - 1}\n", "log_name": "%x-%A_%a",
                  "log_dir": _path(sweep_dir, "run.root"), "run_dir": _path(sweep_dir, "run.root"),
                  "config_block": f"CONFIG={_path(base, 'run.root')}/{cfg.run.name}-"
                                  + "${SLURM_ARRAY_TASK_ID}/slurm/config.yaml\n"}
    train_script = render(template_for(cfg), values)
    eval_script = None
    if eval_length is not None:
        eval_script = render("eval_length.sbatch", {**values, "run_dir": " ".join(str(d) for d in run_dirs),
                                                    "eval_args": eval_args(eval_length)})
    problem = check_partition(cfg)
    if problem:
        raise ConfigError(problem)
    if dry_run:
        log(train_script)
        if eval_script:
            log("# --- dependent job (afterok) ---")
            log(eval_script)
        return []
    slurm_dir = Path(values["log_dir"])
    writes = _Writes()
    try:
        for c, d in zip(configs, run_dirs):
            writes.write(d / "slurm" / "config.yaml", to_yaml(c))
        if sweep_tasks:
            writes.write(slurm_dir / "sweep.tsv", "task\trun_dir\toverrides\n" + "".join(
                f"{k}\t{d}\t{' '.join(o)}\n" for k, (d, o) in enumerate(zip(run_dirs, sweep_overrides(configs)))))
        train_path = writes.write(slurm_dir / "train.sbatch", train_script)
        ids = [sbatch(train_path, dependency=dependency)]
    except BaseException:
        writes.undo()
        raise
    what = f"a job array of {len(configs)} tasks" if sweep_tasks else str(train_path)
    log(f"submitted {ids[0]}: {what} (logs: {slurm_dir}/{values['job_name']}-{ids[0]}"
        f"{'_K' if sweep_tasks else ''}.out)")
    if sweep_tasks:
        for k, d in enumerate(run_dirs):
            log(f"  task {k}: {d}")
    if eval_script:
        eval_path = slurm_dir / "eval_length.sbatch"
        eval_path.write_text(eval_script)
        ids.append(sbatch(eval_path, dependency=f"afterok:{ids[0]}"))
        log(f"submitted {ids[1]}: {eval_path}, after job {ids[0]} succeeds")
    return ids


def sweep_overrides(configs: list) -> list[list[str]]:
    """Per task, the keys whose values differ between the tasks (sweep.tsv)."""
    from lmtrain.config import flatten, to_dict

    flats = [flatten(to_dict(c)) for c in configs]
    varying = [k for k in flats[0] if k != "run.name" and len({repr(f.get(k)) for f in flats}) > 1]
    return [[f"{k}={f.get(k)}" for k in varying] for f in flats]
