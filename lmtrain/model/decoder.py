"""The decoder: embeddings -> depth module (layers + residual wiring) -> norm -> LM head.

Every choice is made once, here, from the config's registries; `forward` never branches
on a kind. Shapes: B batch, L length, M model dim, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from lmtrain.model.depth import DEPTH
from lmtrain.model.layer import Context, KVCache, make_norm
from lmtrain.model.outputs import Aux, ModelOutput
from lmtrain.model.positions import build_position
from lmtrain.model.residual import RESIDUAL


class Decoder(nn.Module):
    def __init__(self, cfg, *, vocab_size: int, max_len: int):
        """cfg: ModelConfig. max_len: the table size for schemes that have one."""
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.position = build_position(
            cfg.position, d_model=cfg.d_model, n_heads=cfg.n_heads, max_len=max_len, rope_theta=cfg.rope_theta
        )
        self.embed_scale = math.sqrt(cfg.d_model) if self.position.scales_tokens else 1.0
        self.drop = nn.Dropout(cfg.dropout)
        self.depth = DEPTH.get(cfg.depth.kind)(cfg, RESIDUAL.get(cfg.residual)())
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.bias)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    @property
    def max_len(self) -> Optional[int]:
        return self.position.max_len

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, std), residual output projections scaled by 1/sqrt(2 depth),
        where depth counts layer applications (a shared block applied T times counts T times)."""
        std = self.cfg.init_std
        depth = DEPTH.get(self.cfg.depth.kind).layer_applications(self.cfg)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                if name.endswith("bias"):
                    nn.init.zeros_(p)
                continue
            scale = 1.0 / math.sqrt(2 * depth) if name.endswith(("proj.weight", "down.weight")) else 1.0
            nn.init.normal_(p, mean=0.0, std=std * scale)
        if self.position.scales_tokens:
            nn.init.normal_(self.embed.weight, mean=0.0, std=self.cfg.d_model ** -0.5)
        self.depth.init_parameters()

    def forward(self, idx_BL: Tensor, *, cache: Optional[KVCache] = None) -> ModelOutput:
        x_BLM, aux = self.features(idx_BL, cache=cache)
        return ModelOutput(logits_BLV=self.head(x_BLM), aux=aux)

    def features(self, idx_BL: Tensor, *, cache: Optional[KVCache] = None) -> tuple[Tensor, Aux]:
        """The final normalised hidden states, before the LM head. Evaluation applies the head
        to the positions it scores only, in chunks, so no full B x L x V logits exist."""
        B, L = idx_BL.shape
        start = cache.length if cache is not None else 0
        pos_L = torch.arange(start, start + L, device=idx_BL.device)
        ctx = Context(pos_L=pos_L, position=self.position, aux=Aux(), cache=cache)
        tok_BLM = self.embed(idx_BL)
        if self.embed_scale != 1.0:
            tok_BLM = tok_BLM * self.embed_scale
        x_BLM = self.drop(self.position.embed(tok_BLM, pos_L))
        x_BLM = self.norm(self.depth(x_BLM, ctx))
        if cache is not None:
            cache.length += L
        return x_BLM, ctx.aux

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each layer's activations in backward (less memory, about a third more compute)."""
        self.depth.residual.checkpoint_layers = enabled

    def supports_kv_cache(self) -> bool:
        return all(m.supports_kv_cache for m in self.attention_kernels())

    def attention_kernels(self):
        from lmtrain.model.attention import AttentionKernel

        return [m for m in self.modules() if isinstance(m, AttentionKernel)]


def build_model(cfg, device: torch.device | str | None = None) -> Decoder:
    """cfg: the full Config. The vocabulary and length limits come from the data section."""
    max_len = cfg.model.max_position or cfg.data.seq_len
    with torch.device(device or "cpu"):
        return Decoder(cfg.model, vocab_size=cfg.data.vocab_size, max_len=max_len)
