"""Native Hugging Face families: lmtrain models that equal a transformers architecture exactly.

A family says which configs it takes (`reasons` lists why not, one line each), writes the
`config.json` fields, and renames (and where needed reorders) the tensors. Exactness is the
rule: a family takes a model only when transformers computes the same function; everything
else leaves as remote code (lmtrain/hf/remote.py).

  mpt       ALiBi, LayerNorm, GELU MLP of 4 x d_model, no biases, tied embeddings
            (MosaicML's MPT; HF's MPT has no bias slots, and the same slopes as the ALiBi
            paper for every head count).
  gpt_neox  RoPE over the whole head, LayerNorm, an MLP (gelu, gelu_tanh, relu, silu),
            sequential residual (use_parallel_residual=false); biases or none (zeros where
            GPT-NeoX always has one); tied or untied embeddings.
  llama     RoPE, RMSNorm, SwiGLU, no biases; tied or untied embeddings.

What every family needs: softmax attention, pre-norm residuals, fixed depth, no document
mask (transformers attends across end-of-document tokens), no scaled token embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

ACT_NAMES = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}


def common_reasons(cfg) -> list[str]:
    m, out = cfg.model, []
    if m.attention.kind != "softmax":
        out.append(f"model.attention.kind={m.attention.kind} (native families use softmax attention)")
    if m.residual.kind != "prenorm":
        out.append(f"model.residual.kind={m.residual.kind} (native families are pre-norm)")
    if m.depth.kind != "fixed":
        out.append(f"model.depth.kind={m.depth.kind} (native families have a fixed stack)")
    if cfg.data.document_mask:
        out.append("data.document_mask=true (transformers attends across end-of-document tokens)")
    return out


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str
    requires: Callable[[object], list[str]]  # config -> what this family cannot take
    hf_config: Callable[[object, int], dict]  # (config, max_length) -> config.json fields
    tensors: Callable[[object, dict], dict]  # (config, lmtrain state dict) -> HF-named tensors

    def reasons(self, cfg) -> list[str]:
        return common_reasons(cfg) + self.requires(cfg)


def _heads_first(w: Tensor, n_heads: int) -> Tensor:
    """qkv rows [Q; K; V] (each heads x head_dim) -> per head [q_h; k_h; v_h] (GPT-NeoX)."""
    rest = w.shape[1:]
    return w.reshape(3, n_heads, -1, *rest).transpose(0, 1).reshape(-1, *rest)


def _layers(sd: dict) -> int:
    return 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("depth.layers."))


# MPT ---------------------------------------------------------------------------------------

def _mpt_requires(cfg) -> list[str]:
    m, out = cfg.model, []
    if m.position.kind != "alibi":
        out.append(f"model.position.kind={m.position.kind} (MPT uses ALiBi)")
    if m.norm != "layernorm":
        out.append(f"model.norm={m.norm} (MPT uses LayerNorm)")
    if m.bias:
        out.append("model.bias=true (MPT has no biases: train with model.bias=false)")
    if m.ffn.kind != "mlp" or m.ffn.activation != "gelu" or m.d_ff != 4 * m.d_model:
        out.append("model.ffn (MPT's MLP is GELU with d_ff = 4 x d_model)")
    if not m.tie_embeddings:
        out.append("model.tie_embeddings=false (MPT ties its embeddings)")
    return out


def _mpt_config(cfg, max_length: int) -> dict:
    m = cfg.model
    return {"model_type": "mpt", "d_model": m.d_model, "n_heads": m.n_heads, "n_layers": m.n_layers,
            "expansion_ratio": 4, "max_seq_len": max_length, "vocab_size": cfg.data.vocab_size,
            "layer_norm_epsilon": 1e-5, "no_bias": True, "learned_pos_emb": False,
            "norm_type": "low_precision_layernorm",
            "resid_pdrop": 0.0, "emb_pdrop": 0.0, "logit_scale": None, "use_cache": True,
            "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_pdrop": 0, "attn_type": "multihead_attention",
                            "clip_qkv": None, "qk_ln": False, "softmax_scale": None, "prefix_lm": False,
                            "attn_impl": "torch"},
            "tie_word_embeddings": True}


def _mpt_tensors(cfg, sd: dict) -> dict:
    out = {"transformer.wte.weight": sd["embed.weight"], "transformer.norm_f.weight": sd["norm.weight"],
           "lm_head.weight": sd["embed.weight"]}
    for i in range(_layers(sd)):
        p, q = f"depth.layers.{i}.", f"transformer.blocks.{i}."
        out.update({q + "norm_1.weight": sd[p + "attn_norm.weight"],
                    q + "attn.Wqkv.weight": sd[p + "attn.qkv.weight"],
                    q + "attn.out_proj.weight": sd[p + "attn.proj.weight"],
                    q + "norm_2.weight": sd[p + "ffn_norm.weight"],
                    q + "ffn.up_proj.weight": sd[p + "ffn.up.weight"],
                    q + "ffn.down_proj.weight": sd[p + "ffn.down.weight"]})
    return out


# GPT-NeoX ----------------------------------------------------------------------------------

def _rope_requires(cfg, family: str) -> list[str]:
    p = cfg.model.position
    return [] if p.kind == "rope" else [f"model.position.kind={p.kind} ({family} uses RoPE)"]


def _rope_parameters(m, **extra) -> dict:
    """transformers' rope_parameters: position interpolation is its `linear` rope type."""
    p = m.position
    if p.interpolate == 1:
        return {"rope_type": "default", "rope_theta": p.theta, **extra}
    return {"rope_type": "linear", "rope_theta": p.theta, "factor": float(p.interpolate), **extra}


def _neox_requires(cfg) -> list[str]:
    m, out = cfg.model, _rope_requires(cfg, "GPT-NeoX")
    if m.norm != "layernorm":
        out.append(f"model.norm={m.norm} (GPT-NeoX uses LayerNorm)")
    if m.ffn.kind != "mlp" or m.ffn.activation not in ACT_NAMES:
        out.append(f"model.ffn.kind={m.ffn.kind} (GPT-NeoX has an MLP)")
    return out


def _neox_config(cfg, max_length: int) -> dict:
    m = cfg.model
    return {"model_type": "gpt_neox", "hidden_size": m.d_model, "num_attention_heads": m.n_heads,
            "num_hidden_layers": m.n_layers, "intermediate_size": m.d_ff, "hidden_act": ACT_NAMES[m.ffn.activation],
            "vocab_size": cfg.data.vocab_size, "max_position_embeddings": max_length, "layer_norm_eps": 1e-5,
            "use_parallel_residual": False, "attention_bias": bool(m.bias), "attention_dropout": 0.0,
            "hidden_dropout": 0.0, "rotary_pct": 1.0, "rotary_emb_base": m.position.theta,
            "rope_parameters": _rope_parameters(m, partial_rotary_factor=1.0),
            "tie_word_embeddings": bool(m.tie_embeddings), "use_cache": True, "initializer_range": 0.02}


def _zeros_if_none(t, n: int) -> Tensor:
    return t if t is not None else torch.zeros(n)


def _neox_tensors(cfg, sd: dict) -> dict:
    m = cfg.model
    head = sd["embed.weight"] if m.tie_embeddings else sd["head.weight"]
    out = {"gpt_neox.embed_in.weight": sd["embed.weight"], "embed_out.weight": head,
           "gpt_neox.final_layer_norm.weight": sd["norm.weight"],
           "gpt_neox.final_layer_norm.bias": _zeros_if_none(sd.get("norm.bias"), m.d_model)}
    for i in range(_layers(sd)):
        p, q = f"depth.layers.{i}.", f"gpt_neox.layers.{i}."
        out.update({
            q + "input_layernorm.weight": sd[p + "attn_norm.weight"],
            q + "input_layernorm.bias": _zeros_if_none(sd.get(p + "attn_norm.bias"), m.d_model),
            q + "post_attention_layernorm.weight": sd[p + "ffn_norm.weight"],
            q + "post_attention_layernorm.bias": _zeros_if_none(sd.get(p + "ffn_norm.bias"), m.d_model),
            q + "attention.query_key_value.weight": _heads_first(sd[p + "attn.qkv.weight"], m.n_heads),
            q + "attention.dense.weight": sd[p + "attn.proj.weight"],
            q + "mlp.dense_h_to_4h.weight": sd[p + "ffn.up.weight"],
            q + "mlp.dense_h_to_4h.bias": _zeros_if_none(sd.get(p + "ffn.up.bias"), m.d_ff),
            q + "mlp.dense_4h_to_h.weight": sd[p + "ffn.down.weight"],
            q + "mlp.dense_4h_to_h.bias": _zeros_if_none(sd.get(p + "ffn.down.bias"), m.d_model)})
        if m.bias:
            out[q + "attention.query_key_value.bias"] = _heads_first(sd[p + "attn.qkv.bias"], m.n_heads)
            out[q + "attention.dense.bias"] = sd[p + "attn.proj.bias"]
    return out


# Llama -------------------------------------------------------------------------------------

def _llama_requires(cfg) -> list[str]:
    m, out = cfg.model, _rope_requires(cfg, "Llama")
    if m.norm != "rmsnorm":
        out.append(f"model.norm={m.norm} (Llama uses RMSNorm)")
    if m.ffn.kind != "swiglu":
        out.append(f"model.ffn.kind={m.ffn.kind} (Llama uses SwiGLU)")
    if m.bias:
        out.append("model.bias=true (this Llama layout has no biases)")
    return out


# torch.nn.RMSNorm(eps=None) uses the input dtype's machine epsilon; exports are float32.
RMS_EPS = float(torch.finfo(torch.float32).eps)


def _llama_config(cfg, max_length: int) -> dict:
    m = cfg.model
    return {"model_type": "llama", "hidden_size": m.d_model, "num_attention_heads": m.n_heads,
            "num_key_value_heads": m.n_heads, "num_hidden_layers": m.n_layers, "intermediate_size": m.d_ff,
            "hidden_act": "silu", "vocab_size": cfg.data.vocab_size, "max_position_embeddings": max_length,
            "rms_norm_eps": RMS_EPS, "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            "rope_theta": m.position.theta, "rope_parameters": _rope_parameters(m),
            "head_dim": m.d_model // m.n_heads, "tie_word_embeddings": bool(m.tie_embeddings), "use_cache": True,
            "initializer_range": 0.02}


def _llama_tensors(cfg, sd: dict) -> dict:
    m = cfg.model
    head = sd["embed.weight"] if m.tie_embeddings else sd["head.weight"]
    out = {"model.embed_tokens.weight": sd["embed.weight"], "lm_head.weight": head,
           "model.norm.weight": sd["norm.weight"]}
    for i in range(_layers(sd)):
        p, q = f"depth.layers.{i}.", f"model.layers.{i}."
        wq, wk, wv = sd[p + "attn.qkv.weight"].chunk(3, dim=0)
        gate, up = sd[p + "ffn.up.weight"].chunk(2, dim=0)
        out.update({q + "input_layernorm.weight": sd[p + "attn_norm.weight"],
                    q + "post_attention_layernorm.weight": sd[p + "ffn_norm.weight"],
                    q + "self_attn.q_proj.weight": wq, q + "self_attn.k_proj.weight": wk,
                    q + "self_attn.v_proj.weight": wv, q + "self_attn.o_proj.weight": sd[p + "attn.proj.weight"],
                    q + "mlp.gate_proj.weight": gate, q + "mlp.up_proj.weight": up,
                    q + "mlp.down_proj.weight": sd[p + "ffn.down.weight"]})
    return out


FAMILIES = (
    Family("mpt", "MptForCausalLM", _mpt_requires, _mpt_config, _mpt_tensors),
    Family("gpt_neox", "GPTNeoXForCausalLM", _neox_requires, _neox_config, _neox_tensors),
    Family("llama", "LlamaForCausalLM", _llama_requires, _llama_config, _llama_tensors),
)


def native_family(cfg) -> tuple[Family | None, dict[str, list[str]]]:
    """The first family that takes this config, and for each family why it does not."""
    why = {}
    for f in FAMILIES:
        r = f.reasons(cfg)
        if not r:
            return f, why
        why[f.name] = r
    return None, why
