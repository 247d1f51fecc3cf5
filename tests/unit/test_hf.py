"""Hugging Face export (lmtrain/hf): native families and remote code load in transformers and
compute lmtrain's logits (float32, 1e-5 relative) at L = 64 and 4x the training length, and
greedy `generate()` gives lmtrain's greedy tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmtrain.config import load_config
from lmtrain.generate import generate
from lmtrain.hf.export import write_hf
from lmtrain.hf.native import native_family
from lmtrain.model import build_model
from lmtrain.train.checkpoint import Trained
from tests.helpers import CONFIGS, PROPERTY_MODEL, axis_overrides

transformers = pytest.importorskip("transformers")

NATIVE = {  # family -> overrides of the property model (debug.yaml is ALiBi, LayerNorm, GELU MLP)
    "mpt": ["model.bias=false", "model.d_ff=128"],
    "gpt_neox": ["model.position=rope"],
    "gpt_neox-untied-nobias-tanh": ["model.position=rope", "model.bias=false", "model.tie_embeddings=false",
                                    "model.ffn.activation=gelu_tanh"],
    "llama": ["model.position=rope", "model.bias=false", "model.norm=rmsnorm", "model.ffn=swiglu"],
    # context extension: position interpolation is transformers' `linear` rope type, base scaling its theta
    "llama-interpolated": ["model.position=rope", "model.position.interpolate=4", "model.position.theta=50000",
                           "model.bias=false", "model.norm=rmsnorm", "model.ffn=swiglu"],
    "gpt_neox-interpolated": ["model.position=rope", "model.position.interpolate=2.5"],
}
REMOTE = {"adaptive_span": axis_overrides("attention", "adaptive_span"),
          "act": axis_overrides("depth", "act"),
          "performer": [*axis_overrides("attention", "performer"), "model.position=rope"]}


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    from data_pipelines.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(["def f(x):\n    return x + 1\n"] * 20, 257, show_progress=False).save(str(path))
    return path


def exported(overrides: list[str], tokenizer_file: Path, out: Path):
    """A property-size model with weights moved off their init (no zero biases or unit norms
    that would hide a misplaced tensor), exported into `out`."""
    cfg = load_config(CONFIGS / "debug.yaml", [*PROPERTY_MODEL, *overrides])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    t = Trained(cfg=cfg, model=model, checkpoint=out / "src", step=7, run_dir=out)
    return cfg, model, write_hf(t, tokenizer_file, out)


def check_same_function(cfg, model, hf):
    for L in (64, 4 * cfg.data.seq_len):
        ids = torch.randint(0, cfg.data.vocab_size, (2, L), generator=torch.Generator().manual_seed(L))
        with torch.no_grad():
            a, b = model(ids).logits_BLV, hf(ids).logits
        rel = ((a - b).abs().max() / a.abs().max()).item()
        assert rel < 1e-5, (L, rel)
    prompt = torch.randint(0, cfg.data.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    ours = generate(model, prompt, 12, temperature=0.0)
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("case", list(NATIVE))
def test_native_family_computes_lmtrain_logits(case, tokenizer_file, tmp_path):
    cfg, model, meta = exported(NATIVE[case], tokenizer_file, tmp_path)
    assert meta["hf_family"] == case.split("-")[0]
    assert not (tmp_path / "modeling_lmtrain.py").exists()
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                                 output_loading_info=True)
    assert type(hf).__name__ == meta["hf_architecture"]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    check_same_function(cfg, model, hf.eval())


@pytest.mark.parametrize("case", list(REMOTE))
def test_remote_code_model_computes_lmtrain_logits(case, tokenizer_file, tmp_path):
    cfg, model, meta = exported(REMOTE[case], tokenizer_file, tmp_path)
    assert meta["hf_family"] == "remote" and meta["not_native"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_lmtrain.LmtrainForCausalLM"
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True,
                                                                 dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    check_same_function(cfg, model, hf.eval())


def test_tokenizer_files_name_the_end_of_sequence(tokenizer_file, tmp_path):
    exported(NATIVE["mpt"], tokenizer_file, tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    assert tok.decode(tok("def f(x):")["input_ids"]) == "def f(x):"
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 0 and json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == 0


def test_remote_model_refuses_left_padding(tokenizer_file, tmp_path):
    cfg, model, _ = exported(REMOTE["act"], tokenizer_file, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    ids = torch.randint(0, cfg.data.vocab_size, (2, 12))
    right = torch.ones(2, 12, dtype=torch.long)
    right[1, 8:] = 0
    with torch.no_grad():
        out = hf(ids, attention_mask=right).logits  # right padding: the real positions are unchanged
        assert torch.allclose(out[1, :8], model(ids[1:, :8]).logits_BLV[0], rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="right-padded"):
            hf(ids, attention_mask=right.flip(-1))


def test_default_preset_maps_natively_and_the_reasons_name_keys():
    family, _ = native_family(load_config(CONFIGS / "default.yaml"))
    assert family is not None and family.architecture == "MptForCausalLM"
    family, why = native_family(load_config(CONFIGS / "default.yaml", ["model.bias=true"]))
    assert family is None and any("model.bias=true" in r for r in why["mpt"])
    assert any("model.position.kind=alibi" in r for r in why["gpt_neox"])


def test_every_non_persistent_buffer_can_be_recomputed():
    """Loaders that build on the meta device (transformers) fill only saved tensors: each module
    with a non-persistent buffer recomputes it (`reset_buffers`), in every pairwise combination."""
    from tests.helpers import combo_overrides, make_model, pairwise_combos

    seen = set()
    token_globals = ["model.attention.kind=sparse", "model.attention.pattern=window+globals", "model.attention.block=8",
                     "model.attention.window=8", "model.attention.global_token_ids=[0,5]"]
    for overrides in [combo_overrides(dict(c)) for c in pairwise_combos()] + [token_globals]:
        model = make_model(*overrides)
        for name, module in model.named_modules():
            own = [b for b in module._non_persistent_buffers_set if getattr(module, b, None) is not None]
            if not own:
                continue
            seen.add(type(module).__name__)
            assert callable(getattr(module, "reset_buffers", None)), f"{type(module).__name__} ({name}) has {own}"
            before = {b: getattr(module, b).clone() for b in own}
            for b in own:
                getattr(module, b).zero_()
            module.reset_buffers()
            for b in own:
                assert torch.equal(getattr(module, b), before[b]), (name, b)
    assert {"ALiBi", "Decoder"} <= seen, seen


def test_lmtrain_tools_name_the_way_for_a_native_export(tokenizer_file, tmp_path):
    from lmtrain.export import _write_meta
    from lmtrain.train.checkpoint import CheckpointError, load_trained

    cfg, model, meta = exported(NATIVE["llama"], tokenizer_file, tmp_path)
    _write_meta(Trained(cfg=cfg, model=model, checkpoint=tmp_path / "src", step=7, run_dir=tmp_path), tmp_path,
                {"format_name": "hf", **meta})
    with pytest.raises(CheckpointError, match="Hugging Face export as LlamaForCausalLM; load it with transformers"):
        load_trained(tmp_path)
