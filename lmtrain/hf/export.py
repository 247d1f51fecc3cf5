"""`lmtrain export SOURCE --format hf --out DIR`: a directory transformers loads.

  config.json               a native family's config (lmtrain/hf/native.py), else the lmtrain
                            config with `auto_map` onto lmtrain/hf/remote.py
  model.safetensors         HF-named float32 tensors (tied tensors stored under both names)
  tokenizer.json            the model's tokenizer, with tokenizer_config.json (end of sequence)
  generation_config.json    end-of-sequence and padding ids for generate()
  lmtrain.yaml, export.json the training config and where the export came from
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmtrain.config import to_dict, to_yaml
from lmtrain.hf.native import native_family
from lmtrain.train.checkpoint import HF_EXPORT_CONFIG

WEIGHTS = "model.safetensors"
MODEL_TYPE = "lmtrain"  # lmtrain/hf/remote.py's config class (writing an export needs no transformers)
# The two files an export carries: transformers imports them by the names in auto_map.
CONFIG_FILE = ("configuration_lmtrain.py",
               '"""lmtrain export: the config class lives in the installed lmtrain package."""\n'
               "from lmtrain.hf.remote import LmtrainConfig  # noqa: F401\n")
MODELING_FILE = ("modeling_lmtrain.py",
                 '"""lmtrain export: the model class lives in the installed lmtrain package."""\n'
                 "from lmtrain.hf.remote import LmtrainConfig, LmtrainForCausalLM  # noqa: F401\n")
AUTO_MAP = {"AutoConfig": "configuration_lmtrain.LmtrainConfig",
            "AutoModelForCausalLM": "modeling_lmtrain.LmtrainForCausalLM"}


def default_max_length(cfg) -> int:
    """The length the export declares (MPT builds its ALiBi table for it): 4x the training length."""
    return 4 * cfg.data.seq_len


def _owned(tensors: dict) -> dict:
    """Float32, contiguous, no two names sharing storage (safetensors refuses shared tensors)."""
    seen, out = set(), {}
    for name, t in tensors.items():
        t = t.detach().to(torch.float32).contiguous()
        if t.data_ptr() in seen:
            t = t.clone()
        seen.add(t.data_ptr())
        out[name] = t
    return out


def special_tokens(cfg, tok_path: Path) -> dict:
    """Token strings and ids: end of sequence (`data.eos_token`), and beginning, padding and
    unknown where the tokenizer declares them (its tokenizer_config.json beside tokenizer.json)."""
    from data_pipelines.tokenizer import declared_special, eos_token_of, load_tokenizer

    tok = load_tokenizer(tok_path)
    names = {**declared_special(tok_path.parent), "eos_token": eos_token_of(cfg.data)}
    out = {}
    for key, name in names.items():
        i = tok.token_to_id(name)
        if i is None and key == "eos_token":
            raise ValueError(f"{tok_path}: no end-of-sequence token {name!r}")
        if i is not None:
            out[key], out[f"{key}_id"] = name, i
    return out


def write_hf(t, tok_path: Path, out: Path, *, max_length: int | None = None) -> dict:
    """Write the HF directory into `out` (an empty directory); returns what export.json says."""
    from safetensors.torch import save_file

    cfg = t.cfg
    max_length = max_length or default_max_length(cfg)
    sd = t.model.float().state_dict()
    family, why = native_family(cfg)
    special = special_tokens(cfg, tok_path)
    ids = {k: special.get(k) for k in ("eos_token_id", "bos_token_id", "pad_token_id")}
    if family is not None:
        hf = {"architectures": [family.architecture], **family.hf_config(cfg, max_length), **ids}
        tensors = family.tensors(cfg, sd)
    else:
        hf = {"architectures": ["LmtrainForCausalLM"], "model_type": MODEL_TYPE, "auto_map": AUTO_MAP,
              "lmtrain": to_dict(cfg), "vocab_size": cfg.data.vocab_size, "max_position_embeddings": max_length,
              "hidden_size": cfg.model.d_model, "num_hidden_layers": cfg.model.n_layers,
              "num_attention_heads": cfg.model.n_heads, "tie_word_embeddings": False, **ids}
        tensors = {f"model.{k}": v for k, v in sd.items()}
        for name, text in (CONFIG_FILE, MODELING_FILE):
            (out / name).write_text(text)
    hf["torch_dtype"] = "float32"
    save_file(_owned(tensors), str(out / WEIGHTS), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    (out / "tokenizer.json").write_bytes(tok_path.read_bytes())
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast",
               **{k: v for k, v in special.items() if not k.endswith("_id")},
               "model_max_length": max_length, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    gen = {"eos_token_id": special["eos_token_id"],
           "pad_token_id": special.get("pad_token_id", special["eos_token_id"])}
    if "bos_token_id" in special:
        gen["bos_token_id"] = special["bos_token_id"]
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    (out / HF_EXPORT_CONFIG).write_text(to_yaml(cfg))
    return {"hf_family": family.name if family else "remote", "hf_architecture": hf["architectures"][0],
            "max_length": max_length, "not_native": why if family is None else {}}

