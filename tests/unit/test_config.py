"""Config loading, validation, and the CLI's behaviour on bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmtrain.config import ConfigError, load_config, to_dict, from_dict
from lmtrain.model import build_model
from tests.conftest import CONFIGS, run_cli

ALL_YAML = sorted(CONFIGS.rglob("*.yaml"))


def test_presets_exist():
    assert (CONFIGS / "default.yaml") in ALL_YAML


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_preset_loads_and_builds_tiny(path):
    cfg = load_config(path)
    # The preset's own architecture on the meta device (no memory), then a tiny real one.
    with torch.device("meta"):
        meta_model = build_model(cfg, device="meta")
    assert sum(p.numel() for p in meta_model.parameters()) > 0
    tiny = load_config(path, ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.d_ff=64",
                              "data.vocab_size=300"])
    model = build_model(tiny)
    out = model(torch.randint(0, 300, (1, 8)))
    assert out.logits_BLV.shape == (1, 8, 300)


def test_default_preset_is_the_documented_default():
    cfg = load_config(CONFIGS / "default.yaml")
    assert cfg.model.position == "alibi" and cfg.data.source == "stdlib" and cfg.model.attention.kind == "softmax"


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("model.n_layer=3", "model.n_layer", "did you mean model.n_layers"),
        ("optim.lrr=1", "optim.lrr", "did you mean optim.lr"),
        ("model.attention.backen=sdpa", "model.attention.backen", "did you mean model.attention.backend"),
        ("model.n_layers=abc", "model.n_layers", "wrong type"),
        ("data.val_fraction=high", "data.val_fraction", "wrong type"),
        ("trainer.deterministic=maybe", "trainer.deterministic", "wrong type"),
        ("model.position=alibii", "model.position", "did you mean 'alibi'"),
        ("model.attention.kind=nope", "model.attention.kind", "unknown kind"),
        ("model.d_model=100", "model.d_model", "not divisible"),
        ("data.val_fraction=1.5", "data.val_fraction", "between 0 and 1"),
        ("trainer.precision=fp8", "trainer.precision", "not one of"),
        ("optim.min_lr=1", "optim.min_lr", "between 0 and optim.lr"),
        ("model.position=rope", "model.position=rope", "even head dimension"),
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
        "deepspeed.raw.zero_optimization.stage3_max_live_parameters=1e8", "deepspeed.raw.zero_optimization.overlap_comm=false",
        "deepspeed.raw.communication_data_type=fp32"])
    ds = deepspeed_json(cfg)
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert z["stage3_max_live_parameters"] == 1e8 and z["overlap_comm"] is False and z["contiguous_gradients"] is True
    assert ds["communication_data_type"] == "fp32"
    assert ds["gradient_clipping"] == 0.5 and ds["train_micro_batch_size_per_gpu"] == 3
    # Stage 1 without offload carries no offload blocks.
    plain = deepspeed_json(load_config(CONFIGS / "default.yaml", ["trainer.strategy=deepspeed", "deepspeed.zero_stage=1"]))
    assert plain["zero_optimization"] == {"stage": 1, "overlap_comm": True, "contiguous_gradients": True}


def test_options_of_another_kind_are_unknown():
    # model.attention is typed by its kind: softmax has `backend`, and no `span`.
    with pytest.raises(ConfigError, match="model.attention.span: unknown key"):
        load_config(CONFIGS / "default.yaml", ["model.attention.span=3"])


def test_saved_config_round_trips():
    cfg = load_config(CONFIGS / "default.yaml", ["model.attention.backend=reference", "run.name=x"])
    assert from_dict(to_dict(cfg)) == cfg


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
    assert "n_layers: 7" in proc.stdout and "position: alibi" in proc.stdout


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

    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, "-m", "data_pipelines.prepare", str(CONFIGS / "debug.yaml"), "data.vocab=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "data.vocab: unknown key (did you mean data.vocab_size?)" in proc.stderr


def test_data_too_short_for_seq_len_exits_2_without_a_run_dir(tmp_path, tiny_data):
    proc = run_cli("train", str(CONFIGS / "debug.yaml"), *tiny_data, f"run.root={tmp_path}/runs", "data.seq_len=100000",
                   cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "data.seq_len" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "runs").exists()
