"""`lmtrain submit`: rendered sbatch scripts, refusal of unsafe values, and submission
through a stand-in `sbatch` that records its arguments."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from tests.helpers import CONFIGS, run_cli

DEFAULT = str(CONFIGS / "default.yaml")


def test_dry_run_renders_a_valid_single_node_script_and_writes_nothing(tmp_path):
    proc = run_cli("submit", DEFAULT, f"run.root={tmp_path / 'runs'}", "trainer.devices=2", "slurm.partition=debug",
                   "slurm.qos=normal", "slurm.time=1-02:00:00", "--dry-run", check=True)
    script = proc.stdout
    for line in ("#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=2", "#SBATCH --partition=debug",
                 "#SBATCH --qos=normal",
                 "#SBATCH --time=1-02:00:00", "#SBATCH --open-mode=append", "#SBATCH --signal=USR1@300",
                 "#SBATCH --requeue", f"#SBATCH --output={tmp_path / 'runs' / 'default' / 'slurm'}/%x-%j.out",
                 "export MASTER_PORT=", "srun --kill-on-bad-exit=1"):
        assert line in script, line
    assert "--gpus-per-node" not in script and "--account" not in script  # CPU job, no account given
    assert not (tmp_path / "runs").exists()
    check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr


def test_multi_node_gpu_script_and_the_dependent_eval_job(tmp_path):
    proc = run_cli("submit", DEFAULT, f"run.root={tmp_path}", "trainer.accelerator=gpu", "trainer.devices=8",
                   "trainer.num_nodes=4", "--dry-run", "--eval-length", "--lengths 128,512 --mode sliding", check=True)
    train, _, evaljob = proc.stdout.partition("# --- dependent job (afterok) ---")
    assert "#SBATCH --nodes=4" in train and "#SBATCH --gpus-per-node=8" in train and "ntasks-per-node=8" in train
    assert "-m lmtrain eval-length" in evaljob and "--lengths 128,512 --mode sliding" in evaljob
    assert "#SBATCH --gpus-per-node=1" in evaljob


@pytest.mark.parametrize("override,key", [
    ("slurm.job_name=x; rm -rf ~", "slurm.job_name"),
    ("slurm.partition=gpu&&reboot", "slurm.partition"),
    ("slurm.account=$(whoami)", "slurm.account"),
    ("slurm.time=`date`", "slurm.time"),
    ("slurm.mem=4G;ls", "slurm.mem"),
    ("run.name=a b", "run.name"),
])
def test_unsafe_values_are_refused_with_exit_2(tmp_path, override, key):
    proc = run_cli("submit", DEFAULT, f"run.root={tmp_path}", override, "--dry-run")
    assert proc.returncode == 2, proc.stdout
    assert key in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stdout == "" and not any(tmp_path.iterdir())


def test_unsafe_paths_and_eval_arguments_are_refused(tmp_path):
    hook = tmp_path / "hook;x.sh"
    hook.write_text("true\n")
    proc = run_cli("submit", DEFAULT, f"run.root={tmp_path / 'r'}", f"slurm.env_hook={hook}", "--dry-run")
    assert proc.returncode == 2 and "slurm.env_hook" in proc.stderr
    proc = run_cli("submit", DEFAULT, f"run.root={tmp_path / 'r'}", "--dry-run", "--eval-length", "--lengths 128;ls")
    assert proc.returncode == 2 and "--eval-length" in proc.stderr
    proc = run_cli("submit", DEFAULT, f"run.root={tmp_path / 'r'}", "--dry-run", "--eval-length", "--bogus 1")
    assert proc.returncode == 2 and "--bogus" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_submit_writes_the_run_files_and_chains_the_eval_job(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    fake = bin_dir / "sbatch"
    fake.write_text(f"#!/bin/bash\necho \"$@\" >> {calls}\necho $((1000 + $(wc -l < {calls})))\\;local\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    hook = tmp_path / "env.sh"
    hook.write_text("export LMTRAIN_HOOKED=1\n")
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = run_cli("submit", DEFAULT, f"run.root={tmp_path / 'runs'}", f"slurm.env_hook={hook}",
                   "--eval-length", "--lengths 128,256", env_extra=env, check=True)
    run = tmp_path / "runs" / "default" / "slurm"
    assert "submitted 1001" in proc.stdout and "submitted 1002" in proc.stdout
    lines = calls.read_text().splitlines()
    assert lines[0] == f"--parsable {run / 'train.sbatch'}"
    assert lines[1] == f"--parsable --dependency=afterok:1001 {run / 'eval_length.sbatch'}"
    from lmtrain.config import load_config

    assert load_config(run / "config.yaml").run.name == "default"
    assert f"source {hook}" in (run / "train.sbatch").read_text()


def test_missing_sbatch_exits_2(tmp_path):
    proc = run_cli("submit", DEFAULT, f"run.root={tmp_path}", env_extra={"PATH": "/nonexistent"})
    assert proc.returncode == 2 and "sbatch" in proc.stderr


def fake_tool(bin_dir, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / name
    tool.write_text("#!/bin/bash\n" + body)
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)


def test_a_failed_sbatch_writes_nothing_into_the_run_dir(tmp_path):
    """sbatch refuses (or is missing): the run dir is as it was, an earlier config included."""
    fake_tool(tmp_path / "bin", "sbatch", "echo 'sbatch: error: Batch job submission failed: Invalid account' >&2\n"
                                          "exit 1\n")
    env = {"PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    proc = run_cli("submit", DEFAULT, f"run.root={tmp_path / 'runs'}", "slurm.account=nobody", env_extra=env)
    assert proc.returncode == 2 and "Invalid account" in proc.stderr
    assert not (tmp_path / "runs").exists()
    old = tmp_path / "runs" / "default" / "slurm"
    old.mkdir(parents=True)
    (old / "config.yaml").write_text("earlier\n")
    proc = run_cli("submit", DEFAULT, f"run.root={tmp_path / 'runs'}", "--sweep", "optim.lr=1e-3,2e-3",
                   env_extra=env)
    assert proc.returncode == 2
    assert (old / "config.yaml").read_text() == "earlier\n" and sorted(p.name for p in old.iterdir()) == ["config.yaml"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["default"]


def test_sweep_extra_and_dependency_reach_sbatch(tmp_path):
    calls = tmp_path / "calls.txt"
    fake_tool(tmp_path / "bin", "sbatch", f'echo "$@" >> {calls}\necho 77\n')
    env = {"PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    proc = run_cli("submit", DEFAULT, f"run.root={tmp_path / 'runs'}", "run.name=s", "--sweep", "optim.lr=1e-3,2e-3",
                   "--sweep", "model.position=alibi,rope", "slurm.extra=[--constraint=a100,'--exclude=node[01-02]']",
                   "--dependency", "afterok:12", env_extra=env, check=True)
    assert "a job array of 4 tasks" in proc.stdout
    sweep = tmp_path / "runs" / "s-sweep"
    script = (sweep / "train.sbatch").read_text()
    for line in ("#SBATCH --array=0-3", "#SBATCH --constraint=a100", "#SBATCH --exclude=node[01-02]",
                 "#SBATCH --job-name=s\n", f"CONFIG={tmp_path / 'runs'}/s-${{SLURM_ARRAY_TASK_ID}}/slurm/config.yaml",
                 "%x-%A_%a.out"):
        assert line in script, line
    assert calls.read_text().split() == ["--parsable", "--dependency=afterok:12", str(sweep / "train.sbatch")]
    from lmtrain.config import load_config

    got = [(c.optim.lr, c.model.position.kind, c.run.name) for c in
           (load_config(tmp_path / "runs" / f"s-{k}" / "slurm" / "config.yaml") for k in range(4))]
    assert got == [(1e-3, "alibi", "s-0"), (1e-3, "rope", "s-1"), (2e-3, "alibi", "s-2"), (2e-3, "rope", "s-3")]
    rows = (sweep / "sweep.tsv").read_text().splitlines()
    assert len(rows) == 5 and "optim.lr=0.002" in rows[3] and "model.position.kind=alibi" in rows[3]


@pytest.mark.parametrize("args, message", [
    (["slurm.extra=[--job-name=x]"], "slurm.extra: --job-name is not allowed here (set it with slurm.job_name)"),
    (["slurm.extra=[--array=0-3]"], "slurm.extra: --array is not allowed here (lmtrain writes it itself)"),
    (["slurm.extra=['--comment=a b']"], "slurm.extra: '--comment=a b' is not allowed here"),
    (["slurm.extra=[constraint=a100]"], "slurm.extra: 'constraint=a100' is not allowed here"),
    (["--dependency", "afterok:12;reboot"], "--dependency: 'afterok:12;reboot' is not a SLURM dependency"),
    (["--sweep", "optim.lr"], "--sweep optim.lr: write key=value1,value2"),
    (["--sweep", "optim.lr=1,1"], "give distinct, non-empty values"),
    (["--sweep", "run.name=a,b"], "--sweep: run.name and run.root name the task run dirs"),
    (["--sweep", "trainer.devices=1,2"], "these differ between them: tasks_per_node"),
    (["--sweep", "model.n_layer=2,4"], "model.n_layer: unknown key"),
])
def test_bad_sweeps_extras_and_dependencies_exit_2(tmp_path, args, message):
    proc = run_cli("submit", DEFAULT, f"run.root={tmp_path / 'runs'}", *args, "--dry-run")
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "runs").exists()


def test_a_request_no_node_can_hold_is_refused_where_sinfo_tells(tmp_path):
    """The default slurm.cpus_per_task=8 on 2-CPU nodes would pend forever (PartitionConfig)."""
    fake_tool(tmp_path / "bin", "sinfo", 'echo "debug*|2|1024|2|(null)"\necho "big|64|512000|8|gpu:a100:8"\n')
    env = {"PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    proc = run_cli("submit", DEFAULT, f"run.root={tmp_path}", "--dry-run", env_extra=env)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "lmtrain: error: slurm.cpus_per_task: 8 CPUs x 1 task(s) per node = 8, but nodes of partition debug have 2; "
        "set slurm.cpus_per_task=2"), proc.stderr
    for extra, message in ((["slurm.cpus_per_task=2", "trainer.num_nodes=3"], "trainer.num_nodes: 3 nodes, but"),
                           (["slurm.cpus_per_task=2", "slurm.mem=4G"], "slurm.mem: 4G per node, but nodes"),
                           (["slurm.partition=big", "trainer.accelerator=gpu", "trainer.devices=16",
                             "slurm.cpus_per_task=4"],
                            "trainer.devices: 16 GPUs per node, but nodes of partition big have 8")):
        proc = run_cli("submit", DEFAULT, f"run.root={tmp_path}", *extra, "--dry-run", env_extra=env)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert run_cli("submit", DEFAULT, f"run.root={tmp_path}", "slurm.cpus_per_task=2", "--dry-run",
                   env_extra=env).returncode == 0
