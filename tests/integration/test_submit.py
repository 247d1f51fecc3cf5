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
