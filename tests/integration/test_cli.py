"""The CLI on bad input: exit code 2, one line on stderr naming the key, nothing written.
And `lmtrain config`, which prints the resolved config, and `lmtrain plan`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import CONFIGS, run_cli


@pytest.mark.parametrize("command", ["train", "prepare-data", "config"])
@pytest.mark.parametrize(
    "override, key",
    [("model.n_layer=3", "model.n_layer"), ("model.n_layers=abc", "model.n_layers"),
     ("data.val_fraction=2", "data.val_fraction")],
)
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, command, override, key):
    before = set(Path(tmp_path).rglob("*"))
    proc = run_cli(command, str(CONFIGS / "default.yaml"), f"run.root={tmp_path}/runs",
                   f"data.dir={tmp_path}/data", override, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], proc.stderr
    assert proc.stdout == ""
    assert set(Path(tmp_path).rglob("*")) == before  # nothing written, nothing lost


def test_cli_config_prints_resolved_yaml(tmp_path):
    proc = run_cli("config", str(CONFIGS / "default.yaml"), "model.n_layers=7", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "n_layers: 7" in proc.stdout and "  position:\n    kind: alibi\n" in proc.stdout


def test_cli_unknown_option_exits_2(tmp_path):
    proc = run_cli("config", str(CONFIGS / "default.yaml"), "--bogus", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2


def test_missing_data_source_exits_2_and_writes_nothing(tmp_path):
    proc = run_cli("train", str(CONFIGS / "debug.yaml"), f"run.root={tmp_path}/runs", f"data.dir={tmp_path}/data",
                   f"data.source={tmp_path}/nothing/*.txt", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "data.source" in proc.stderr and "no files match" in proc.stderr
    assert list(Path(tmp_path).iterdir()) == []


def test_data_pipelines_runs_as_a_module(tmp_path):
    import subprocess
    import sys

    from tests.helpers import ROOT

    proc = subprocess.run([sys.executable, "-m", "data_pipelines.prepare", str(CONFIGS / "debug.yaml"), "data.vocab=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "data.vocab: unknown key (did you mean data.vocab_size?)" in proc.stderr


def test_data_too_short_for_seq_len_exits_2_without_a_run_dir(tmp_path, tiny_data):
    proc = run_cli("train", str(CONFIGS / "debug.yaml"), *tiny_data, f"run.root={tmp_path}/runs", "data.seq_len=100000",
                   cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "data.seq_len" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "runs").exists()


def test_cli_prints_the_table_and_refuses_bad_input():
    proc = run_cli("plan", str(CONFIGS / "default.yaml"), "--gpus", "4", check=True)
    assert "| ZeRO-3 |" in proc.stdout and "parameters" in proc.stdout and "suggestion:" in proc.stdout
    assert "this config          DP:" in proc.stdout
    bad = run_cli("plan", str(CONFIGS / "default.yaml"), "--gpus", "0")
    assert bad.returncode == 2 and "--gpus" in bad.stderr
    bad = run_cli("plan", str(CONFIGS / "default.yaml"), "model.n_layer=3")
    assert bad.returncode == 2 and "model.n_layer" in bad.stderr
