"""`lmtrain config --describe`: every key `lmtrain config` prints, for every kind of every
model axis, is listed with its type and a help line (taken from the comment at its field)."""

from __future__ import annotations

from lmtrain.config import AXES, flatten, load_config, to_dict
from lmtrain.describe import describe_rows, format_describe
from tests.helpers import CONFIGS, combo_id, combo_overrides, pairwise_combos, run_cli

PRESETS = sorted(str(p) for p in CONFIGS.rglob("*.yaml") if "base" not in p.stem)


def described(cfg) -> dict:
    """(key, kind or None) -> row, for the rows describing cfg's keys."""
    return {(r.key, r.kind): r for r in describe_rows(cfg)}


def kind_of_key(cfg, key: str):
    node = key.rsplit(".", 1)[0]
    if node in {f"model.{a}" for a in AXES} and not key.endswith(".kind"):
        return getattr(cfg.model, node.split(".")[1]).kind
    return None


def assert_all_described(cfg, where: str) -> None:
    rows = described(cfg)
    for key, value in flatten(to_dict(cfg)).items():
        row = rows.get((key, kind_of_key(cfg, key)))
        assert row is not None, f"{where}: {key} is not described"
        assert row.help and row.type, f"{where}: {key} has no help line (write a comment at its field)"
        assert row.default == value, f"{where}: {key} shows {row.default!r}, the config has {value!r}"


def test_every_key_of_every_kind_is_described():
    """The pairwise combinations hold every kind of every axis (with its test options)."""
    seen = set()
    for combo in pairwise_combos():
        cfg = load_config(CONFIGS / "debug.yaml", combo_overrides(dict(combo)))
        assert_all_described(cfg, combo_id(dict(combo)))
        seen |= set(combo)
    assert seen == {(a, k) for a, reg in AXES.items() for k in reg}


def test_every_preset_is_described():
    for preset in PRESETS:
        assert_all_described(load_config(preset), preset)


def test_describe_on_the_command_line():
    proc = run_cli("config", "--describe", str(CONFIGS / "default.yaml"), check=True)
    lines = proc.stdout.splitlines()
    kinds = "one of none, alibi, exp_decay, gaussian, kerple_log, rel_buckets, rope"
    assert any(line.startswith("model.position.kind") and kinds in line for line in lines)
    assert any(line.startswith("model.position.theta") and "[kind=rope]" in line for line in lines)
    assert any(line.startswith("trainer.precision") and "one of 32-true" in line for line in lines)
    assert run_cli("config", "--describe", check=True).stdout == format_describe(describe_rows()) + "\n"
    bare = run_cli("config")
    assert bare.returncode == 2 and "give a preset" in bare.stderr
