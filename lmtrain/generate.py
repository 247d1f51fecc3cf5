"""Sampling from a trained model, with a KV cache where the attention kind supports one."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from lmtrain.model import Decoder, build_model
from lmtrain.model.layer import KVCache


def load_model(path: str | Path, device: str = "cpu"):
    """A run directory (its last checkpoint) or a checkpoint file -> (config, model in eval mode)."""
    from lmtrain.train.checkpoint import last_checkpoint, load_config_from_checkpoint

    path = Path(path)
    ckpt_path = last_checkpoint(path) if path.is_dir() else path
    if ckpt_path is None or not ckpt_path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (expected a .ckpt file or a run dir with checkpoints/last.ckpt)")
    cfg, ckpt = load_config_from_checkpoint(ckpt_path)
    model = build_model(cfg, device=device)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    return cfg, model.eval()


def sample_next(logits_BV: Tensor, *, temperature: float, top_k: Optional[int], generator: torch.Generator) -> Tensor:
    if temperature <= 0:
        return logits_BV.argmax(-1, keepdim=True)
    logits_BV = logits_BV.float() / temperature
    if top_k:
        kth = torch.topk(logits_BV, min(top_k, logits_BV.shape[-1])).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    return torch.multinomial(logits_BV.softmax(-1), 1, generator=generator)


@torch.no_grad()
def generate(model: Decoder, prompt_BL: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: Optional[int] = None, seed: int = 0, use_cache: bool = True, stop_token: Optional[int] = None) -> Tensor:
    """Continue `prompt_BL` by `max_new_tokens` tokens. With a cache each step feeds one token;
    without, the whole sequence is re-run (the reference the cache is tested against)."""
    gen = torch.Generator(device=prompt_BL.device).manual_seed(seed)
    limit = model.max_len
    if limit is not None and prompt_BL.shape[1] + max_new_tokens > limit:
        raise ValueError(f"this model's positions end at {limit}: prompt + new tokens must not exceed it")
    use_cache = use_cache and model.supports_kv_cache()
    cache = KVCache() if use_cache else None
    seq, step_input = prompt_BL, prompt_BL
    for _ in range(max_new_tokens):
        logits = model(step_input if use_cache else seq, cache=cache).logits_BLV[:, -1]
        nxt = sample_next(logits, temperature=temperature, top_k=top_k, generator=gen)
        seq = torch.cat((seq, nxt), dim=1)
        step_input = nxt
        if stop_token is not None and bool((nxt == stop_token).all()):
            break
    return seq
