"""The decoder: embeddings -> depth module (layers + residual wiring) -> norm -> LM head.

Every choice is made once, here, from the config's registries (one per axis,
lmtrain/model/axes.py); `forward` never branches on a kind. Shapes: B batch, L length,
M model dim, V vocabulary.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import Tensor, nn

from lmtrain.model.depth import DEPTH
from lmtrain.model.hooks import Hooks
from lmtrain.model.init import init_by_type, init_variants
from lmtrain.model.layer import Context, KVCache, Readout, make_norm
from lmtrain.model.outputs import Aux, ModelOutput
from lmtrain.model.positions import build_position
from lmtrain.model.residual import RESIDUAL
from lmtrain.model.sequence import SequenceShard


class Decoder(nn.Module):
    def __init__(self, cfg, *, vocab_size: int, seq_len: int, document_mask: bool = False):
        """cfg: ModelConfig. seq_len: the training length (tables of schemes that have one are
        sized by it unless their config says otherwise). document_mask: attention stops at the
        end-of-document token, whose id the buffer `document_eot` holds (set from the data's
        tokenizer; saved in the state dict, so every copy of the model masks alike)."""
        super().__init__()
        self.cfg = cfg
        self.document_mask = document_mask
        if document_mask:
            self.register_buffer("document_eot", torch.tensor(-1, dtype=torch.int64))
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.position = build_position(cfg.position, d_model=cfg.d_model, n_heads=cfg.n_heads, seq_len=seq_len)
        self.embed_scale = math.sqrt(cfg.d_model) if self.position.scales_tokens else 1.0
        self.drop = nn.Dropout(cfg.dropout)
        depth_cls = DEPTH.get(cfg.depth.kind)
        self.depth = depth_cls(cfg, RESIDUAL.get(cfg.residual.kind)(cfg.residual))
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.bias)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.readout = Readout(self.norm, self.head)  # references, not submodules
        # Token ids that kernels treat as global tokens (sparse `globals`): flagged per forward.
        self.register_buffer("global_token_ids", self._global_token_ids(), persistent=False)
        self.hooks = Hooks.collect(self)  # modules with lifecycle hooks, found once
        # Sequence parallelism (lmtrain/model/sequence.py): set by training, None otherwise.
        self.sequence_shard: Optional[SequenceShard] = None

    def _global_token_ids(self) -> Optional[Tensor]:
        ids = sorted({int(t) for k in self.attention_kernels() for t in getattr(k.cfg, "global_token_ids", ())})
        return torch.tensor(ids, dtype=torch.int64) if ids else None

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the non-persistent buffers (see ALiBi.reset_buffers)."""
        if self.global_token_ids is not None:
            self.global_token_ids.copy_(self._global_token_ids())

    @property
    def max_len(self) -> Optional[int]:
        return self.position.max_len

    def reset_parameters(self) -> None:
        """GPT-2 initialisation by module type (lmtrain/model/init.py), residual output
        projections scaled by 1/sqrt(2 depth), where depth counts layer applications (a
        shared block applied T times counts T times); the scheme's token-embedding recipe;
        then every variant's own initialisation."""
        init_by_type(self, self.cfg.init_std, DEPTH.get(self.cfg.depth.kind).layer_applications(self.cfg))
        if self.position.scales_tokens:
            nn.init.normal_(self.embed.weight, mean=0.0, std=self.cfg.d_model ** -0.5)
        init_variants(self)

    def forward(self, idx_BL: Tensor, *, cache: Optional[KVCache] = None) -> ModelOutput:
        x_BLM, aux = self.features(idx_BL, cache=cache)
        return ModelOutput(logits_BLV=self.head(x_BLM) if aux.logits is None else aux.logits, aux=aux)

    def features(self, idx_BL: Tensor, *, cache: Optional[KVCache] = None) -> tuple[Tensor, Aux]:
        """The final normalised hidden states, before the LM head. Evaluation applies the head
        to the positions it scores only, in chunks, so no full B x L x V logits exist."""
        B, L = idx_BL.shape
        start = cache.length if cache is not None else 0
        pos_L = torch.arange(start, start + L, device=idx_BL.device)
        ctx = Context(pos_L=pos_L, position=self.position, aux=Aux(), cache=cache, readout=self.readout)
        shard, own = self.sequence_shard, None
        if shard is not None:
            # idx_BL is the whole sequence; this process computes its own positions only.
            if cache is not None:
                raise ValueError("a KV cache and sequence parallelism do not mix: decode without a sequence shard")
            own = shard.positions(L)
            ctx.shard, ctx.seq_pos, ctx.pos_L = shard, pos_L, pos_L[own]
        if self.document_mask:
            if cache is not None:
                raise ValueError("a document-masked model decodes without a KV cache (supports_kv_cache is False)")
            doc_BL, pos_BL = documents(idx_BL, self.document_eot)
            # A window inside one document in every row (long documents, short windows) needs no
            # mask at all: the kernels keep their unmasked fast paths (one host sync per forward).
            if bool(doc_BL[:, -1].any()):
                ctx.doc_ids, ctx.embed_pos = doc_BL, pos_BL
        if self.global_token_ids is not None:
            ctx.global_mask = torch.isin(idx_BL, self.global_token_ids)
        if own is not None:
            idx_BL = idx_BL[:, own]
            ctx.embed_pos = ctx.embed_pos[:, own] if ctx.embed_pos is not None else None
        tok_BLM = self.embed(idx_BL)
        if self.embed_scale != 1.0:
            tok_BLM = tok_BLM * self.embed_scale
        x_BLM = self.drop(self.position.embed(tok_BLM, ctx.embed_positions))
        x_BLM = self.norm(self.depth(x_BLM, ctx))
        if cache is not None:
            cache.length += L
        for module in self.hooks.losses:  # once per forward, whatever the wiring and depth
            for name, value in module.parameter_losses().items():
                ctx.aux.add_loss(name, value)
        return x_BLM, ctx.aux

    def target_losses(self, aux: Aux, targets_BL: Tensor, chunk: int = 0) -> dict[str, Tensor]:
        """Loss terms that need the targets (the TargetLosses hook: early exit's intermediate
        exits), from what the forward left in `aux`; readouts in chunks of `chunk` positions
        (0: one chunk)."""
        out: dict[str, Tensor] = {}
        for module in self.hooks.target_losses:
            out.update(module.target_losses(aux, targets_BL, self.readout, chunk))
        return out

    # -- lifecycle (lmtrain/model/hooks.py) ---------------------------------------------------
    def after_optimizer_step(self) -> None:
        for module in self.hooks.after_step:
            module.after_optimizer_step()

    def head_stats(self) -> tuple[dict[str, list[Tensor]], dict[str, float]]:
        """name -> one H-vector per module that reports it (in layer order), and name -> the
        stat's upper limit."""
        stats: dict[str, list[Tensor]] = {}
        limits: dict[str, float] = {}
        for module in self.hooks.head_stats:
            for name, values in module.head_stats().items():
                stats.setdefault(name, []).append(values.float().cpu())
            limits.update(module.head_stat_limits())
        return stats, limits

    def distance_profiles(self, d: Tensor) -> dict[str, list[Tensor]]:
        """name -> one H x n profile (values at the distances d) per module that reports it, in
        layer order (the DistanceProfile hook)."""
        out: dict[str, list[Tensor]] = {}
        for module in self.hooks.profiles:
            for name, values in module.distance_profile(d).items():
                out.setdefault(name, []).append(values.float().cpu())
        return out

    def pattern_masks(self, L: int) -> list[Tensor]:
        """One H' x L x L visibility mask (key j to query i) per module with an attention
        pattern (the PatternPicture hook), in layer order; empty when no module has one."""
        return [m.pattern_mask(L) for m in self.hooks.patterns]

    def shard_sequence(self, shard: Optional[SequenceShard]) -> None:
        """From now on compute only `shard`'s positions of each sequence (None: all of them).
        `forward` still takes the whole sequence's token ids, and returns the shard's outputs."""
        self.sequence_shard = shard

    @contextlib.contextmanager
    def whole_sequences(self):
        """Within: every position computed here (evaluation on one process during training)."""
        shard, self.sequence_shard = self.sequence_shard, None
        try:
            yield
        finally:
            self.sequence_shard = shard

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each layer's activations in backward (less memory, about a third more compute)."""
        self.depth.residual.checkpoint_layers = enabled

    def attention_kernels(self):
        from lmtrain.model.attention import AttentionKernel

        return [m for m in self.modules() if isinstance(m, AttentionKernel)]

    def supports_kv_cache(self) -> bool:
        # Document masks need the document of every cached key: decoding recomputes instead.
        return not self.document_mask and all(k.caps.kv_cache for k in self.attention_kernels())


def documents(idx_BL: Tensor, eot: Tensor) -> tuple[Tensor, Tensor]:
    """Per token: its document (the end-of-document tokens before it, counted) and its position
    within that document (B x L each). A document's end token belongs to it."""
    is_end = idx_BL == eot
    doc_BL = is_end.cumsum(1) - is_end.long()
    t = torch.arange(idx_BL.shape[1], device=idx_BL.device)
    # The first position of each token's document: one past the last end token before it.
    after_end = torch.where(is_end, t + 1, 0)
    start_BL = torch.cat((after_end.new_zeros(idx_BL.shape[0], 1), after_end[:, :-1]), 1).cummax(1).values
    return doc_BL, t - start_BL


def build_model(cfg, device: torch.device | str | None = None) -> Decoder:
    """cfg: the full Config. The vocabulary and the training length come from the data section."""
    with torch.device(device or "cpu"):
        return Decoder(cfg.model, vocab_size=cfg.data.vocab_size, seq_len=cfg.data.seq_len,
                       document_mask=cfg.data.document_mask)
