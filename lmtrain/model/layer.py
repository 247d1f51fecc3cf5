"""One decoder layer as two sublayers, F (attention) and G (feed-forward).

The residual wiring (lmtrain/model/residual.py) decides how F and G combine with the
stream (pre-norm, two-stream reversible), and the depth module how often layers run; the
layer offers `f`, `g` and the parameters of each. Shapes: B batch, L length, M model dim,
H heads, D head dim, Q positions asked for per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Hashable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lmtrain.model.attention import AttentionInputs, build_attention
from lmtrain.model.ffn import FFN
from lmtrain.model.init import ResidualOut
from lmtrain.model.outputs import Aux
from lmtrain.model.positions import HeadSubset, Position

if TYPE_CHECKING:
    from lmtrain.model.sequence import SequenceShard


@dataclass
class KVCache:
    """Keys and values of past positions, one entry per attention call site."""

    entries: dict = field(default_factory=dict)
    length: int = 0  # positions already cached
    states: dict = field(default_factory=dict)  # per slot: what a kernel keeps across steps
    # per slot: layer inputs whose keys and values are owed but not computed yet (early exit:
    # an exited token's copied state at a skipped layer), computed together when a query next
    # runs that layer, so a skipped layer costs nothing at the step that skips it
    pending: dict = field(default_factory=dict)

    def state(self, key: Hashable) -> dict:
        """Slot `key`'s kernel state (lowrank_causal's segment summaries), created empty."""
        return self.states.setdefault(key, {})

    def extend(self, key: Hashable, k_BHLD: Tensor, v_BHLD: Tensor, pos_L: Tensor):
        if key in self.entries:
            k0, v0, p0 = self.entries[key]
            k_BHLD, v_BHLD, pos_L = torch.cat((k0, k_BHLD), 2), torch.cat((v0, v_BHLD), 2), torch.cat((p0, pos_L))
        self.entries[key] = (k_BHLD, v_BHLD, pos_L)
        return k_BHLD, v_BHLD, pos_L

    def defer(self, key: Hashable, x_BLM: Tensor, pos_L: Tensor) -> None:
        """Owe slot `key` the keys and values of the layer inputs `x_BLM` at `pos_L`."""
        self.pending.setdefault(key, []).append((x_BLM, pos_L))

    def take_pending(self, key: Hashable) -> Optional[tuple[Tensor, Tensor]]:
        """The inputs owed to slot `key` (B x P x M, and their P positions), cleared; None if none."""
        parts = self.pending.pop(key, None)
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        return torch.cat([x for x, _ in parts], 1), torch.cat([p for _, p in parts])

    def keep(self, key: Hashable, keep_S: Tensor) -> None:
        """Drop the keys and values of slot `key` where keep_S is False (no later query sees them)."""
        k, v, pos = self.entries[key]
        self.entries[key] = (k[:, :, keep_S], v[:, :, keep_S], pos[keep_S])

    def repeat_last(self, src: Hashable, dst: Hashable, n: int) -> None:
        """Append to slot `dst` the last `n` positions of slot `src` (ACT: a position that has
        halted offers the same keys and values at every later step)."""
        k, v, pos = self.entries[src]
        self.extend(dst, k[:, :, -n:], v[:, :, -n:], pos[-n:])


@dataclass
class Readout:
    """The decoder's final norm and LM head, for depth modules that read predictions before
    the last layer (exit confidences, per-exit losses). Not a module: it holds references."""

    norm: nn.Module
    head: nn.Linear

    def hidden(self, x_BLM: Tensor) -> Tensor:
        return self.norm(x_BLM)

    def logits(self, x_BLM: Tensor) -> Tensor:
        return self.head(self.norm(x_BLM))


@dataclass
class Context:
    """Per-forward state shared by all layers (no module state is mutated)."""

    pos_L: Tensor
    position: Position
    aux: Aux
    cache: Optional[KVCache] = None
    step: int = 0  # which application of shared layers this is (Universal Transformer); names cache slots
    readout: Optional[Readout] = None
    # Per-forward inputs of kernels: document ids (B x L, document masking), global-token flags.
    doc_ids: Optional[Tensor] = None
    global_mask: Optional[Tensor] = None
    embed_pos: Optional[Tensor] = None  # B x L positions within documents (document masking)
    # Sequence parallelism (lmtrain/model/sequence.py): this process's share of the sequence.
    # pos_L and embed_pos are then its own positions; seq_pos, doc_ids and global_mask the whole
    # sequence's, which the kernels see after the exchange.
    shard: Optional["SequenceShard"] = None
    seq_pos: Optional[Tensor] = None

    @property
    def embed_positions(self) -> Tensor:
        """The positions absolute schemes embed: within the document when documents are masked."""
        return self.pos_L if self.embed_pos is None else self.embed_pos


def gather_rows(x_BLM: Tensor, rows_BQ: Tensor) -> Tensor:
    """x at the positions `rows_BQ` of each row: B x Q x M."""
    return x_BLM.gather(1, rows_BQ[..., None].expand(-1, -1, x_BLM.shape[-1]))


NORMS: dict[str, Callable[[int, bool], nn.Module]] = {
    "layernorm": lambda d, bias: nn.LayerNorm(d, bias=bias),
    "rmsnorm": lambda d, bias: nn.RMSNorm(d),
}


def make_norm(kind: str, d_model: int, bias: bool) -> nn.Module:
    return NORMS[kind](d_model, bias)


class SelfAttention(nn.Module):
    def __init__(self, cfg, index: int):
        super().__init__()
        self.n_heads, self.index = cfg.n_heads, index
        self.kernel = build_attention(cfg.attention, d_model=cfg.d_model, n_heads=cfg.n_heads, dropout=cfg.dropout,
                                      layer=index)
        # q, k, v; or q, v where the keys are the queries (shared query-key attention)
        self.shared_qk = self.kernel.shared_qk
        self.qkv = nn.Linear(cfg.d_model, (2 if self.shared_qk else 3) * cfg.d_model, bias=cfg.bias)
        self.proj = ResidualOut(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x_BLM: Tensor, ctx: Context, key: Hashable, rows_BQ: Optional[Tensor] = None,
                owed: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        """B x L x M, or B x Q x M for the query positions `rows_BQ` (keys and values always
        come from all L positions). `owed` (B x P x M inputs and their P positions, earlier than
        these; separate keys, all queries): positions whose keys and values the cache is owed
        (early exit), projected in the same matmul and cached before these."""
        B, L, M = x_BLM.shape
        H, D = self.n_heads, M // self.n_heads
        q_pos = k_pos = ctx.pos_L
        rows_supported = self.kernel.caps.query_rows
        if rows_BQ is not None and rows_supported:
            # Only the asked-for queries are projected and attended; keys and values of all.
            w_q, w_kv = self.qkv.weight.split((M, 2 * M))
            b_q, b_kv = self.qkv.bias.split((M, 2 * M)) if self.qkv.bias is not None else (None, None)
            q = F.linear(gather_rows(x_BLM, rows_BQ), w_q, b_q).view(B, rows_BQ.shape[1], H, D).transpose(1, 2)
            k, v = F.linear(x_BLM, w_kv, b_kv).view(B, L, 2, H, D).permute(2, 0, 3, 1, 4)  # 2 B H L D
            q_pos = ctx.pos_L[rows_BQ]  # B Q
        elif self.shared_qk:
            q, v = self.qkv(x_BLM).view(B, L, 2, H, D).permute(2, 0, 3, 1, 4)  # 2 B H L D
            k = q
        elif owed is not None:
            x_PM, pos_P = owed
            q, k, v = self.qkv(torch.cat((x_PM, x_BLM), 1)).view(B, -1, 3, H, D).permute(2, 0, 3, 1, 4)
            q, k_pos = q[:, :, pos_P.numel():], torch.cat((pos_P, ctx.pos_L))
        else:
            q, k, v = self.qkv(x_BLM).view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)  # 3 B H L D
        q, k = ctx.position.rotate(q, q_pos), ctx.position.rotate(k, k_pos)
        if ctx.shard is not None:
            return self.proj(self._exchanged(q, k, v, ctx))
        if ctx.cache is not None:
            k, v, k_pos = ctx.cache.extend(key, k, v, k_pos)
        inp = AttentionInputs(position=ctx.position, q_pos=q_pos, k_pos=k_pos, aux=ctx.aux, doc_ids=ctx.doc_ids,
                              global_mask=ctx.global_mask,
                              cache_state=ctx.cache.state(key) if ctx.cache is not None else None)
        if q.shape[2]:
            o_BLM = self.kernel(q, k, v, inp).transpose(1, 2).reshape(B, -1, M)
        else:  # no query (every token of the step has exited): only the keys and values, for the cache
            o_BLM = x_BLM.new_zeros(B, 0, M)
        if ctx.cache is not None:
            self._trim_cache(ctx, key, k_pos)
        if rows_BQ is not None and not rows_supported:
            o_BLM = gather_rows(o_BLM, rows_BQ)  # every query was attended; project the asked-for ones
        return self.proj(o_BLM)

    def _exchanged(self, q_BHPD: Tensor, k_BHPD: Tensor, v_BHPD: Tensor, ctx: Context) -> Tensor:
        """Attention over the whole sequence from this process's P = L/N positions (sequence
        parallelism): the exchange hands the kernel all L positions of this process's heads."""
        B, H, P, D = q_BHPD.shape
        heads = ctx.shard.heads(H)
        position = HeadSubset(ctx.position, heads)

        def local(q_BLhD: Tensor, k_BLhD: Tensor, v_BLhD: Tensor) -> Tensor:
            inp = AttentionInputs(position=position, q_pos=ctx.seq_pos, k_pos=ctx.seq_pos, aux=ctx.aux,
                                  doc_ids=ctx.doc_ids, global_mask=ctx.global_mask, heads=heads)
            o_BhLD = self.kernel(q_BLhD.transpose(1, 2), k_BLhD.transpose(1, 2), v_BLhD.transpose(1, 2), inp)
            return o_BhLD.transpose(1, 2).contiguous()

        o_BPHD = ctx.shard.exchange(local, *(t.transpose(1, 2) for t in (q_BHPD, k_BHPD, v_BHPD)))
        return o_BPHD.reshape(B, P, H * D)

    def _trim_cache(self, ctx: Context, key: Hashable, k_pos: Tensor) -> None:
        """Keys no later query can see leave the cache (a window keeps its last W and the global
        ones); this call's own keys stay (ACT repeats them into later steps' slots)."""
        keep = self.kernel.cache_keep(k_pos, int(ctx.pos_L[-1]) + 1)
        if keep is not None:
            keep = keep | (k_pos >= ctx.pos_L[0])
            if not bool(keep.all()):
                ctx.cache.keep(key, keep)

    @property
    def fills_cache_alone(self) -> bool:
        """`fill_cache` applies: separate keys, and a kernel that keeps no state across steps
        and takes any subset of queries (so it needs nothing but the keys and values)."""
        return not self.shared_qk and self.kernel.caps.query_rows

    def fill_cache(self, x_BLM: Tensor, ctx: Context, key: Hashable, pos_L: Tensor) -> None:
        """Only the keys and values of `x_BLM` (at positions `pos_L`) into the cache, with no
        query (positions that have left the stack: early exit). Equals what `forward` caches."""
        B, L, M = x_BLM.shape
        H, D = self.n_heads, M // self.n_heads
        w_kv = self.qkv.weight[M:]
        b_kv = self.qkv.bias[M:] if self.qkv.bias is not None else None
        k, v = F.linear(x_BLM, w_kv, b_kv).view(B, L, 2, H, D).permute(2, 0, 3, 1, 4)
        k = ctx.position.rotate(k, pos_L)
        _, _, k_pos = ctx.cache.extend(key, k, v, pos_L)
        self._trim_cache(ctx, key, k_pos)


class Layer(nn.Module):
    def __init__(self, cfg, index: int):
        super().__init__()
        self.index = index
        self.attn_norm = make_norm(cfg.norm, cfg.d_model, cfg.bias)
        self.attn = SelfAttention(cfg, index)
        self.ffn_norm = make_norm(cfg.norm, cfg.d_model, cfg.bias)
        self.ffn = FFN.get(cfg.ffn.kind)(cfg.ffn, d_model=cfg.d_model, d_ff=cfg.d_ff, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.ffn_chunk = cfg.ffn_chunk

    def f_parameters(self) -> list[nn.Parameter]:
        """The parameters of sublayer F (its norm and the attention block)."""
        return [*self.attn_norm.parameters(), *self.attn.parameters()]

    def g_parameters(self) -> list[nn.Parameter]:
        """The parameters of sublayer G (its norm and the feed-forward)."""
        return [*self.ffn_norm.parameters(), *self.ffn.parameters()]

    def f(self, x_BLM: Tensor, ctx: Context, key: Hashable = None, rows_BQ: Optional[Tensor] = None) -> Tensor:
        """Attention sublayer (its own norm and dropout); key names its KV-cache slot. With
        `rows_BQ`, the output at those positions only (B x Q x M), attending over all."""
        key = (ctx.step, self.index) if key is None else key
        owed = None
        if ctx.cache is not None and key in ctx.cache.pending:
            x_PM, pos_P = ctx.cache.take_pending(key)  # owed keys and values first: they come earlier
            if rows_BQ is None and not self.attn.shared_qk:
                owed = (self.attn_norm(x_PM), pos_P)  # one projection with this step's
            else:
                self.attn.fill_cache(self.attn_norm(x_PM), ctx, key, pos_P)
        return self.drop(self.attn(self.attn_norm(x_BLM), ctx, key, rows_BQ, owed))

    def fill_cache(self, x_BLM: Tensor, ctx: Context) -> None:
        """The keys and values this layer would cache for `x_BLM`, without computing the layer:
        owed to the cache, and computed (for every position owed so far, at once) when a query
        next runs this layer. A layer no later query reaches never computes them."""
        ctx.cache.defer((ctx.step, self.index), x_BLM, ctx.pos_L)

    def g(self, x_BLM: Tensor, ctx: Context) -> Tensor:
        """Feed-forward sublayer (its own norm and dropout). With `model.ffn_chunk`, in chunks of
        positions: the same values (every position is computed alone), one chunk's d_ff
        activations at a time; under autograd each chunk keeps only its input and is recomputed
        in the backward (its RNG state replayed, so dropout masks match)."""
        c, L = self.ffn_chunk, x_BLM.shape[1]
        if not c or L <= c:
            return self._g(x_BLM)
        grad = torch.is_grad_enabled()
        parts = [checkpoint(self._g, x_BLM[:, s:s + c], use_reentrant=False) if grad else self._g(x_BLM[:, s:s + c])
                 for s in range(0, L, c)]
        return torch.cat(parts, dim=1)

    def _g(self, x_BLM: Tensor) -> Tensor:
        return self.drop(self.ffn(self.ffn_norm(x_BLM)))
