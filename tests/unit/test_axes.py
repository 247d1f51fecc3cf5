"""Registry-wide tests: every variant of every axis (position, attention, ffn, residual, depth)
is tested the moment it is registered.

  * properties, on pairwise combinations of kinds (tests/helpers.py): causality, a batch
    equals its samples one by one, the fast paths equal the references (outputs and
    gradients, float64 and float32, at the kernels' declared tolerances) and really ran,
    KV-cache decoding equals full recompute, the parameter count from the config equals
    the built model's;
  * declarations: each variant's Config is typed by its axis, its init options reach the
    built model, every option named like an initial value is declared as one.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmtrain.generate import generate
from lmtrain.model.axes import AXES
from lmtrain.model.count import parameter_count
from tests.helpers import (
    V,
    assert_batch_equals_one_by_one,
    assert_causal,
    combo_id,
    combo_overrides,
    fast_vs_reference,
    kernel_tolerance,
    make_model,
    pairwise_combos,
    property_config,
    variant_overrides,
)

COMBOS = [dict(c) for c in pairwise_combos()]
IDS = [combo_id(c) for c in COMBOS]
VARIANTS = [(axis, kind) for axis, reg in AXES.items() for kind in sorted(reg)]


def test_pairwise_combinations_cover_every_kind_and_pair():
    from itertools import combinations

    from tests.helpers import valid_combos

    want = {p for c in valid_combos() for p in combinations(c, 2)}
    got = {p for c in pairwise_combos() for p in combinations(c, 2)}
    assert got == want
    assert {(axis, kind) for c in COMBOS for axis, kind in c.items()} == set(VARIANTS)
    assert len(COMBOS) < len(valid_combos()) / 4  # far fewer than the product


# ---- properties ------------------------------------------------------------------------------------


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
def test_causality(combo):
    assert_causal(make_model(*combo_overrides(combo)))


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
def test_batch_equals_samples_one_by_one(combo):
    assert_batch_equals_one_by_one(make_model(*combo_overrides(combo)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
def test_fast_path_matches_reference(combo, dtype):
    model = make_model(*combo_overrides(combo), dtype=dtype, train=True)  # dropout is 0: train mode, grads on
    x = torch.randint(0, V, (2, 40))
    (fast_out, fast_grads), (ref_out, ref_grads) = fast_vs_reference(model, x)
    tol = kernel_tolerance(model, dtype)
    torch.testing.assert_close(fast_out, ref_out, **tol)
    assert fast_grads.keys() == ref_grads.keys() and fast_grads
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], **tol, msg=name)
    # The fast path really ran (no silent fallback to the reference).
    for k in model.attention_kernels():
        assert sum(v for p, v in k.path_counts.items() if p != "reference") >= 1, k.path_counts


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
def test_kv_cache_decoding_equals_full_recompute(combo):
    model = make_model(*combo_overrides(combo))
    prompt = torch.randint(0, V, (2, 5))
    with_cache = generate(model, prompt, 8, temperature=0.0, use_cache=True)
    assert torch.equal(with_cache, generate(model, prompt, 8, temperature=0.0, use_cache=False))


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
def test_parameter_count_from_the_config_equals_the_built_model(combo):
    cfg = property_config(*combo_overrides(combo), "model.tie_embeddings=false", "model.bias=false")
    for c in (property_config(*combo_overrides(combo)), cfg):
        from lmtrain.model import build_model

        built = sum(p.numel() for p in build_model(c, device="meta").parameters())
        assert parameter_count(c.model, vocab_size=c.data.vocab_size, seq_len=c.data.seq_len) == built


# ---- declarations --------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis, kind", VARIANTS, ids=[f"{a}-{k}" for a, k in VARIANTS])
def test_each_variant_types_its_config_node(axis, kind):
    """A kind's config node is typed by its own Config, with the options it declares."""
    from lmtrain.registry import KindConfig

    variant = AXES[axis].get(kind)
    assert issubclass(variant.Config, KindConfig)
    node = getattr(property_config(*variant_overrides(axis, kind)).model, axis)
    assert type(node) is variant.Config and node.kind == kind
    assert all(getattr(node, k) == v for k, v in variant.test_options.items())


INIT_OPTIONS = [(axis, kind, option) for axis, kind in VARIANTS for option in AXES[axis].get(kind).init_options]


def _nondefault(value):
    return (not value) if isinstance(value, bool) else value * 2 + 0.5


@pytest.mark.parametrize("axis, kind, option", INIT_OPTIONS, ids=["-".join(x) for x in INIT_OPTIONS])
def test_init_options_reach_the_built_model(axis, kind, option):
    """Set to a value other than its default, an init option fills its tensor in the model the
    decoder builds (the decoder's generic initialisation must not overwrite it)."""
    variant = AXES[axis].get(kind)
    tensor_path, expected_of = variant.init_options[option]
    default = getattr(variant.Config(kind=kind, **variant.test_options), option)
    value = _nondefault(default)
    model = make_model(*variant_overrides(axis, kind), f"model.{axis}.{option}={value}", dtype=torch.float32)
    node = getattr(model.cfg, axis)
    assert getattr(node, option) == pytest.approx(value)
    expected = expected_of(node)
    assert expected != pytest.approx(expected_of(dataclasses.replace(node, **{option: default})))  # not the default
    modules = [m for m in model.modules() if isinstance(m, variant)]
    assert modules, f"no {variant.__name__} in the model"
    for m in modules:
        tensor = m.get_parameter(tensor_path) if "." in tensor_path else getattr(m, tensor_path)
        torch.testing.assert_close(tensor.detach(), torch.full_like(tensor, expected), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("axis, kind", VARIANTS, ids=[f"{a}-{k}" for a, k in VARIANTS])
def test_options_that_set_initial_values_are_declared(axis, kind):
    """An option named like an initial value (`init_*`, `*_init`) must be one of the
    variant's `init_options`, so that the test above checks it."""
    variant = AXES[axis].get(kind)
    named = {f.name for f in dataclasses.fields(variant.Config)
             if f.name.startswith("init_") or f.name.endswith("_init")}
    assert named <= set(variant.init_options), named - set(variant.init_options)


def test_attention_kernels_declare_their_contract():
    from lmtrain.model.attention import ATTENTION, Capabilities

    for kind, cls in ATTENTION.items():
        assert isinstance(cls.caps, Capabilities), kind
        assert {torch.float64, torch.float32} <= set(cls.tolerances), kind
        assert "auto" not in cls.backends and "reference" not in cls.backends, kind
        assert set(cls.refusals) <= {f.name for f in dataclasses.fields(Capabilities)}, kind
