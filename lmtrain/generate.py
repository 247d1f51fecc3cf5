"""Sampling from a trained model, with a KV cache where the attention kind supports one."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lmtrain.model import Decoder
from lmtrain.model.layer import KVCache


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
             top_k: Optional[int] = None, seed: int = 0, use_cache: bool = True, stop_token: Optional[int] = None,
             token_stats: Optional[list] = None) -> Tensor:
    """Continue `prompt_BL` by `max_new_tokens` tokens. With a cache each step feeds one token;
    without, the whole sequence is re-run (the reference the cache is tested against).

    `token_stats`, a list, receives for each new token the per-token statistics (`Aux.tokens`,
    such as ACT steps) of the position that predicted it: {name: B values}."""
    gen = torch.Generator(device=prompt_BL.device).manual_seed(seed)
    limit = model.max_len
    if limit is not None and prompt_BL.shape[1] + max_new_tokens > limit:
        raise ValueError(f"this model's positions end at {limit}: prompt + new tokens must not exceed it")
    use_cache = use_cache and model.supports_kv_cache()
    cache = KVCache() if use_cache else None
    seq, step_input = prompt_BL, prompt_BL
    for _ in range(max_new_tokens):
        out = model(step_input if use_cache else seq, cache=cache)
        logits = out.logits_BLV[:, -1]
        if token_stats is not None:
            token_stats.append({name: v[:, -1] for name, v in out.aux.tokens.items()})
        nxt = sample_next(logits, temperature=temperature, top_k=top_k, generator=gen)
        seq = torch.cat((seq, nxt), dim=1)
        step_input = nxt
        if stop_token is not None and bool((nxt == stop_token).all()):
            break
    return seq
