"""Shared fixtures: a tiny prepared stdlib slice and helpers to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# Small and fast, but a real pipeline: the stdlib corpus, a trained BPE, packed shards.
TINY_DATA = ["data.source=stdlib", "data.vocab_size=512", "data.max_documents=120", "data.val_fraction=0.05",
             "data.num_workers=0"]
TINY_MODEL = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.d_ff=256"]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env_extra: dict | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "lmtrain", *args], cwd=cwd or ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"lmtrain {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def train_and_signal(args: list[str], metrics: Path, after_step: int, timeout: float = 300) -> tuple[int, str]:
    """Start `lmtrain train ARGS`, send SIGUSR1 once metrics.jsonl shows `after_step`, and wait:
    (exit code, stdout + stderr)."""
    import signal
    import time

    from lmtrain.train.callbacks.metrics_file import read_metrics

    proc = subprocess.Popen([sys.executable, "-m", "lmtrain", "train", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if metrics.exists() and max(read_metrics(metrics), default=0) >= after_step:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while `fn()` runs (its result is
    dropped before returning)."""
    import torch

    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> list[str]:
    """Overrides pointing at a prepared tiny data dir (prepared once per session)."""
    from data_pipelines.prepare import prepare
    from lmtrain.config import load_config

    data_dir = tmp_path_factory.mktemp("data") / "stdlib-512"
    overrides = [*TINY_DATA, f"data.dir={data_dir}"]
    prepare(load_config(CONFIGS / "debug.yaml", overrides).data, log=lambda s: None)
    return overrides


@pytest.fixture
def tiny_cfg(tiny_data):
    from lmtrain.config import load_config

    def make(*extra: str):
        return load_config(CONFIGS / "debug.yaml", [*tiny_data, *TINY_MODEL, *extra])

    return make
