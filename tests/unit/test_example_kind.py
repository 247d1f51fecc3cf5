"""The worked example of docs/architecture.md: a new attention kind in one file, built from the
page itself, registered, and put through the registry-wide tests of tests/unit/test_axes.py
and its own test. Nothing else in the codebase changes for it."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest
import torch

from lmtrain.config import ConfigError
from lmtrain.model.attention import ATTENTION
from tests import helpers
from tests.helpers import ROOT
from tests.unit import test_axes

DOC = ROOT / "docs" / "architecture.md"


def example(name: str) -> str:
    """The code block that follows `<!-- example: NAME -->` in the architecture page."""
    m = re.search(rf"<!-- example: {re.escape(name)} -->\n```python\n(.*?)```", DOC.read_text(), re.S)
    assert m, f"no example {name} in {DOC}"
    return m.group(1)


def load(name: str, source: str, tmp_path):
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cosine(tmp_path_factory):
    module = load("lmtrain_doc_example_cosine", example("lmtrain/model/attention/cosine.py"),
                  tmp_path_factory.mktemp("example"))
    helpers.valid_combos.cache_clear()
    helpers.pairwise_combos.cache_clear()
    yield module
    ATTENTION.unregister("cosine")
    helpers.valid_combos.cache_clear()
    helpers.pairwise_combos.cache_clear()


def test_the_example_registers_a_configurable_kind(cosine):
    cfg = helpers.property_config("model.attention.kind=cosine", "model.position=rope",
                                  "model.attention.init_scale=3.0")
    assert type(cfg.model.attention) is cosine.CosineConfig and cfg.model.attention.init_scale == 3.0
    with pytest.raises(ConfigError, match=r"model.attention.kind=cosine cannot apply the additive score bias of "
                                          r"model.position.kind=alibi \(this example's fast path"):
        helpers.property_config("model.attention.kind=cosine", "model.position=alibi")
    with pytest.raises(ConfigError, match="model.attention.init_scale must be positive"):
        helpers.property_config("model.attention.kind=cosine", "model.position=rope", "model.attention.init_scale=0")


def test_the_registry_wide_tests_pick_it_up(cosine):
    combos = [dict(c) for c in helpers.pairwise_combos() if ("attention", "cosine") in c]
    # it meets every scheme it accepts, every feed-forward, wiring and depth
    from lmtrain.model.axes import AXES

    for axis, want in (("position", {"none", "rope", "sinusoidal", "learned"}), ("ffn", set(AXES["ffn"])),
                       ("residual", set(AXES["residual"])), ("depth", set(AXES["depth"]))):
        assert {c[axis] for c in combos} == want, axis
    for combo in combos:
        test_axes.test_causality(combo)
        test_axes.test_batch_equals_samples_one_by_one(combo)
        for dtype in (torch.float64, torch.float32):
            test_axes.test_fast_path_matches_reference(combo, dtype)
        test_axes.test_kv_cache_decoding_equals_full_recompute(combo)
        test_axes.test_parameter_count_from_the_config_equals_the_built_model(combo)
    test_axes.test_each_variant_types_its_config_node("attention", "cosine")
    test_axes.test_init_options_reach_the_built_model("attention", "cosine", "init_scale")
    test_axes.test_options_that_set_initial_values_are_declared("attention", "cosine")


def test_its_own_test_passes(cosine, tmp_path):
    tests = load("lmtrain_doc_example_test_cosine", example("tests/unit/test_cosine.py"), tmp_path)
    names = [n for n in dir(tests) if n.startswith("test_")]
    assert names
    for name in names:
        getattr(tests, name)()
