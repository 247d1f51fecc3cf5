"""An installed (not editable) lmtrain works outside the checkout: `pip install .` puts the
package and its data (the sbatch templates) in place, and `lmtrain submit --dry-run` renders
a job from a directory that is not the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from tests.helpers import CONFIGS, ROOT


def test_a_non_editable_install_submits_from_outside_the_checkout(tmp_path):
    target, work, src = tmp_path / "site", tmp_path / "work", tmp_path / "src"
    work.mkdir()
    src.mkdir()
    # A copy of what the sdist holds, so that the build writes nothing into the checkout.
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("lmtrain", "data_pipelines"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target",
                            str(target), str(src)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    assert (target / "lmtrain" / "sbatch" / "single_node.sbatch").is_file()
    preset = work / "job.yaml"
    preset.write_text((CONFIGS / "default.yaml").read_text())
    env = {**os.environ, "PYTHONPATH": str(target)}  # the installed copy comes first on sys.path
    where = subprocess.run([sys.executable, "-c", "import lmtrain; print(lmtrain.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=120)
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr
    proc = subprocess.run([sys.executable, "-m", "lmtrain", "submit", "job.yaml", "slurm.partition=gpu",
                           "--dry-run"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("#!/bin/bash") and "#SBATCH --partition=gpu" in proc.stdout
    assert f"--output={work / 'runs' / 'default' / 'slurm'}" in proc.stdout
    assert not (work / "runs").exists()  # a dry run writes nothing
