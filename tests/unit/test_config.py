"""Config loading and validation: every preset, typed axis nodes, the layering rules, keys of
earlier releases, one-line errors. The CLI's behaviour on bad input is tested in
tests/integration/test_cli.py."""

from __future__ import annotations

import re

import pytest
import torch

from lmtrain.config import ConfigError, from_dict, load_config, to_dict, with_overrides
from lmtrain.model import build_model
from tests.helpers import CONFIGS, ROOT

ALL_YAML = sorted(CONFIGS.rglob("*.yaml"))


def test_every_preset_the_docs_and_makefile_name_exists():
    """The presets named in the README, the docs and the Makefile are files of configs/ (so
    that the documented commands run), and the default is among them."""
    texts = [ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "docs").rglob("*.md")),
             *sorted((ROOT / "slurm").rglob("*.md"))]
    named = {m for t in texts for m in re.findall(r"configs/[\w/.-]+\.yaml", t.read_text())}
    assert "configs/default.yaml" in named and len(named) >= 5, named
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, missing


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_preset_loads_and_builds_tiny(path):
    cfg = load_config(path)
    # The preset's own architecture on the meta device (no memory), then a tiny real one.
    with torch.device("meta"):
        meta_model = build_model(cfg, device="meta")
    assert sum(p.numel() for p in meta_model.parameters()) > 0
    # The copy task needs L/2 - 1 symbols: a tiny vocabulary goes with a short length.
    short = ["data.seq_len=64"] if cfg.data.source == "copy" else []
    tiny = load_config(path, ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.d_ff=64",
                              "data.vocab_size=300", *short])
    model = build_model(tiny)
    out = model(torch.randint(0, 300, (1, 8)))
    assert out.logits_BLV.shape == (1, 8, 300)


def test_default_preset_is_the_documented_default():
    cfg = load_config(CONFIGS / "default.yaml")
    assert cfg.model.position.kind == "alibi" and cfg.data.source == "stdlib" and cfg.model.attention.kind == "softmax"
    assert cfg.model.ffn.kind == "mlp" and cfg.model.residual.kind == "prenorm" and cfg.model.depth.kind == "fixed"


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("model.n_layer=3", "model.n_layer", "did you mean model.n_layers"),
        ("model.ffn.activation=tanh", "model.ffn.activation", "choose one of gelu"),
        ("optim.lrr=1", "optim.lrr", "did you mean optim.lr"),
        ("model.attention.backen=sdpa", "model.attention.backen", "did you mean model.attention.backend"),
        ("model.n_layers=abc", "model.n_layers", "wrong type"),
        ("data.val_fraction=high", "data.val_fraction", "wrong type"),
        ("trainer.deterministic=maybe", "trainer.deterministic", "wrong type"),
        ("model.position=alibii", "model.position.kind", "did you mean 'alibi'"),
        ("model.residual=revers", "model.residual.kind", "did you mean 'reversible'"),
        ("model.ffn.kind=glu", "model.ffn.kind", "unknown kind"),
        ("model.attention.kind=nope", "model.attention.kind", "unknown kind"),
        ("model.d_model=100", "model.d_model", "not divisible"),
        ("data.val_fraction=1.5", "data.val_fraction", "between 0 and 1"),
        ("trainer.precision=fp8", "trainer.precision", "not one of"),
        ("optim.min_lr=1", "optim.min_lr", "between 0 and optim.lr"),
        ("model.position=rope", "model.position.kind=rope", "even head dimension"),
        ("model.rope_theta=5", "model.rope_theta", "write model.position.theta"),
        ("model.max_position=64", "model.max_position", "write model.position.max_position"),
        ("deepspeed.zero_stage=3", "deepspeed.zero_stage", "set trainer.strategy=deepspeed"),
        ("deepspeed.zero_stag=3", "deepspeed.zero_stag", "did you mean deepspeed.zero_stage"),
        ("DS deepspeed.zero_stage=4", "deepspeed.zero_stage", "not 1, 2 or 3"),
        ("DS deepspeed.offload_params=true", "deepspeed.offload_params", "zero_stage=3"),
        ("DS trainer.precision=64-true", "trainer.precision", "not supported by DeepSpeed"),
        ("DS deepspeed.raw.zero_optimization.stage=3", "deepspeed.raw.zero_optimization.stage",
         "from deepspeed.zero_stage"),
        ("DS deepspeed.raw.gradient_accumulation_steps=4", "deepspeed.raw.gradient_accumulation_steps",
         "trainer.accumulate_grad_batches"),
        ("DS deepspeed.raw.bf16.enabled=true", "deepspeed.raw.bf16.enabled", "trainer.precision"),
    ],
)
def test_bad_values_name_the_key(override, key, words):
    extra = ["model.d_model=66", "model.n_heads=6"] if override == "model.position=rope" else []
    if override.startswith("DS "):  # under trainer.strategy=deepspeed
        extra, override = ["trainer.strategy=deepspeed"], override[3:]
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "default.yaml", [*extra, override])
    msg = str(e.value)
    assert "\n" not in msg and key in msg and words in msg, msg


def test_deepspeed_json_is_generated_from_the_config_with_raw_keys_merged():
    from lmtrain.train.strategy import deepspeed_json

    cfg = load_config(CONFIGS / "default.yaml", [
        "trainer.strategy=deepspeed", "deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true",
        "deepspeed.offload_params=true", "optim.grad_clip=0.5", "data.batch_size=3",
        "deepspeed.raw.zero_optimization.stage3_max_live_parameters=1e8",
        "deepspeed.raw.zero_optimization.overlap_comm=false",
        "deepspeed.raw.communication_data_type=fp32"])
    ds = deepspeed_json(cfg)
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert z["stage3_max_live_parameters"] == 1e8 and z["overlap_comm"] is False and z["contiguous_gradients"] is True
    assert ds["communication_data_type"] == "fp32"
    assert ds["gradient_clipping"] == 0.5 and ds["train_micro_batch_size_per_gpu"] == 3
    # Stage 1 without offload carries no offload blocks; its buckets are capped at the model's
    # 2,557,632 parameters (a bucket larger than the model holds nothing more).
    plain = deepspeed_json(load_config(CONFIGS / "default.yaml",
                                       ["trainer.strategy=deepspeed", "deepspeed.zero_stage=1"]))
    assert plain["zero_optimization"] == {"stage": 1, "overlap_comm": True, "contiguous_gradients": True,
                                          "reduce_bucket_size": 2_557_632, "allgather_bucket_size": 2_557_632}
    assert z["stage3_prefetch_bucket_size"] == z["reduce_bucket_size"] == 2_557_632
    # A model larger than DeepSpeed's default buckets keeps them; raw keys still win.
    big = deepspeed_json(load_config(CONFIGS / "experiments" / "multinode" / "gpt_6b7_zero3.yaml",
                                     ["deepspeed.raw.zero_optimization.reduce_bucket_size=2e8"]))["zero_optimization"]
    assert (big["reduce_bucket_size"], big["allgather_bucket_size"], big["stage3_prefetch_bucket_size"]) == \
        (2e8, 5e8, 5e7)


def test_options_of_another_kind_are_unknown():
    # model.attention is typed by its kind: softmax has `backend`, and no `span`.
    with pytest.raises(ConfigError, match="model.attention.span: unknown key"):
        load_config(CONFIGS / "default.yaml", ["model.attention.span=3"])
    with pytest.raises(ConfigError, match="model.position.theta: unknown key"):
        load_config(CONFIGS / "default.yaml", ["model.position.theta=3"])  # alibi has no theta


def test_saved_config_round_trips():
    cfg = load_config(CONFIGS / "default.yaml", ["model.attention.backend=reference", "run.name=x",
                                                  "model.position=rope", "model.position.theta=500000"])
    assert from_dict(to_dict(cfg)) == cfg


def test_a_bare_kind_is_the_kinds_node_and_order_of_overrides_does_not_matter():
    a = load_config(CONFIGS / "default.yaml", ["model.position=rope", "model.position.theta=5"])
    b = load_config(CONFIGS / "default.yaml", ["model.position.theta=5", "model.position=rope"])
    c = load_config(CONFIGS / "default.yaml", ["model.position={kind: rope, theta: 5}"])
    assert a == b == c and a.model.position.kind == "rope" and a.model.position.theta == 5.0


def test_another_kind_starts_the_node_afresh_but_typos_are_still_caught(tmp_path):
    # The adaptive-span preset's options do not apply to softmax: switching drops them.
    cfg = load_config(CONFIGS / "experiments" / "adaptive_span" / "adaptive.yaml", ["model.attention.kind=softmax"])
    assert cfg.model.attention == load_config(CONFIGS / "default.yaml").model.attention
    # The same kind keeps the preset's options.
    same = load_config(CONFIGS / "experiments" / "adaptive_span" / "adaptive.yaml", ["model.attention.ramp=16"])
    assert same.model.attention.max_span == 512 and same.model.attention.ramp == 16
    # A misspelled option of the kind being replaced (in a preset) is reported, not dropped.
    preset = tmp_path / "mine.yaml"
    preset.write_text(f"base: {CONFIGS / 'experiments' / 'performer.yaml'}\nmodel:\n  position:\n    thet: 3\n")
    with pytest.raises(ConfigError, match=r"model.position.thet: unknown key \(did you mean model.position.theta\?\)"):
        load_config(preset, ["model.position=learned"])


def test_configs_saved_by_earlier_releases_still_load():
    """Checkpoints and run dirs of earlier releases hold `model.position: rope`, the flat
    `model.rope_theta` and `model.max_position`, `model.residual: prenorm`, and no ffn."""
    old = to_dict(load_config(CONFIGS / "default.yaml"))
    model = {k: v for k, v in old["model"].items() if k not in ("position", "residual", "ffn")}
    # (a saved rope node gets the options added since at their defaults: interpolate 1, none)
    for pos, theta, rows, want in (("rope", 5e5, 0, {"kind": "rope", "theta": 5e5, "interpolate": 1.0}),
                                   ("learned", 1e4, 256, {"kind": "learned", "max_position": 256}),
                                   ("alibi", 1e4, 0, {"kind": "alibi"})):
        saved = {**old, "model": {**model, "position": pos, "rope_theta": theta, "max_position": rows,
                                  "residual": "reversible"}}
        cfg = from_dict(saved)
        assert to_dict(cfg)["model"]["position"] == want
        assert cfg.model.residual.kind == "reversible" and cfg.model.ffn.kind == "mlp"


def test_lightning_spellings_of_devices_and_precision_are_accepted():
    from lmtrain.config import load_config
    from tests.helpers import DEBUG

    cfg = load_config(DEBUG, ["trainer.devices=auto", "trainer.precision=bf16"])
    assert (cfg.trainer.devices, cfg.trainer.precision) == ("auto", "bf16-mixed")
    for given, meant in (("16", "16-mixed"), ("32", "32-true"), ("64", "64-true"), ("bf16-true", "bf16-true")):
        assert load_config(DEBUG, [f"trainer.precision={given}", "trainer.accelerator=gpu"]).trainer.precision == meant
    assert load_config(DEBUG, ["trainer.devices=2"]).trainer.devices == 2


def test_cli_version_and_train_help_explain_overrides():
    import lmtrain
    from tests.helpers import run_cli

    assert run_cli("--version").stdout.strip() == f"lmtrain {lmtrain.__version__}"
    out = run_cli("train", "--help").stdout
    assert "overrides:" in out and "model.position=rope is" in out and "lmtrain config PRESET" in out


def test_overrides_on_a_saved_config_change_the_model_only_and_are_checked():
    cfg = load_config(CONFIGS / "debug.yaml", ["model.position.kind=sinusoidal", "model.attention.kind=lsh"])
    assert with_overrides(cfg, []) is cfg
    more = with_overrides(cfg, ["model.attention.rounds=8", "model.attention.chunk=32"])
    assert (more.model.attention.rounds, more.model.attention.chunk) == (8, 32)
    assert cfg.model.attention.rounds != 8  # the saved config itself is unchanged
    assert to_dict(more)["data"] == to_dict(cfg)["data"]
    for bad, words in [("data.seq_len=64", "only model.* keys"), ("model.attention.roundz=2", "did you mean"),
                       ("model.position=rope", "rope"), ("model.attention.rounds", "key=value")]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            with_overrides(cfg, [bad])
