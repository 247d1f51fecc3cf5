"""Rules of the codebase's shape that a reviewer would otherwise check by hand."""

from __future__ import annotations

import re
import sys

from tests.helpers import ROOT

SOURCES = sorted((ROOT / "lmtrain").rglob("*.py")) + sorted((ROOT / "data_pipelines").rglob("*.py"))


def test_model_code_is_free_of_lightning_and_deepspeed():
    for path in (ROOT / "lmtrain" / "model").rglob("*.py"):
        text = path.read_text()
        for banned in ("lightning", "deepspeed", "torch.distributed"):
            assert f"import {banned}" not in text and f"from {banned}" not in text, (path, banned)


# A comparison of a config node's kind with a literal: code that branches on another axis's
# kind name instead of asking the variant what it declares.
AXIS_KIND = r"\b(position|attention|ffn|residual|depth)\.kind\b"
KIND_TEST = re.compile(AXIS_KIND + r"""\s*(==|!=|\bin\b|\bnot in\b)\s*[("'\[{]|["']\s*(==|!=)\s*[\w.]*""" + AXIS_KIND)
# The peers of `bench train` and the native families of the HF export are fixed external
# architectures: matching a config against them by kind is their purpose.
KIND_TEST_ALLOWED = {ROOT / "lmtrain" / "bench" / "peers.py", ROOT / "lmtrain" / "hf" / "native.py"}


def test_no_code_branches_on_a_kind_name():
    found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in SOURCES if p not in KIND_TEST_ALLOWED
             for i, line in enumerate(p.read_text().splitlines(), 1) if KIND_TEST.search(line)]
    assert not found, "\n".join(found)


def test_no_module_shadows_the_standard_library():
    names = {p.stem for p in SOURCES} | {p.name for p in (ROOT / "lmtrain").rglob("*") if p.is_dir()}
    assert not names & set(sys.stdlib_module_names) - {"__init__", "__main__"}, names & set(sys.stdlib_module_names)


def test_sbatch_templates_are_package_data():
    from importlib import resources

    names = sorted(p.name for p in resources.files("lmtrain.sbatch").iterdir() if p.name.endswith(".sbatch"))
    assert names == ["eval_length.sbatch", "multi_node.sbatch", "single_node.sbatch"]
    assert '"lmtrain.sbatch" = ["*.sbatch"]' in (ROOT / "pyproject.toml").read_text()
