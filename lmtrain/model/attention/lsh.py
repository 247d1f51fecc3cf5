"""LSH attention (Kitaev, Kaiser and Levskaya 2020, "Reformer: The Efficient Transformer").

Shared query-key attention: the block projects queries and values only (`shared_qk`), and
the key of position j is its query, normalised, k_j = q_j / |q_j|. Similar vectors hash to
the same bucket with high probability, so attending within buckets approximates full
attention at O(rounds x L x chunk) cost:

  * hashing: per round r and head h, a random rotation R_rh (D x n/2) gives the bucket
    argmax([k R ; -k R]) of n `buckets` (0: the power of two at or above 2 L / chunk). From
    64 buckets (a power of two) two independent levels n1 x n2 hash instead, so that hashing
    stays O(L sqrt(L)) when n grows with L. The rotations come from the seed buffer
    `hash_seed` (in the state dict: a checkpoint brings its hash functions).
  * sorting: per round, positions sorted by (bucket, position), then cut into chunks of
    `chunk`; each chunk attends to itself and the previous one.
  * visibility: key j is visible to query i in round r iff both have the same bucket, j <= i,
    and fewer than `chunk` positions of that bucket lie in (j, i]: a sliding window of
    `chunk` over the bucket's positions, which always lies in the chunk and the previous
    one. Reformer's plain rule (any key of the two chunks, j <= i) is not causal: which
    earlier keys share a chunk with query i depends on how many *later* positions hash to
    lower buckets. The window rule reads earlier positions only (a test checks it), and
    makes incremental decoding exact (`caps.kv_cache`: a step hashes the cached keys).
  * self: a query sees its own key only when no other key is visible (its score is replaced
    by -1e5, which vanishes next to any other key: q . q/|q| would dominate otherwise).
  * rounds: each round's output o_r and log-sum-exp lse_r combine as
    o = sum_r o_r softmax_r(lse_r), attention over the union of the rounds' keys (a pair
    two rounds share counts twice, as in Reformer without its duplicate correction).

Reversible layers rebuild their inputs in the backward pass with rounding errors that can
flip an argmax: the buckets of the forward pass are kept and replayed (`decide` in
base.py), so the recompute attends exactly as the forward did.

Paths:
  * chunks    - the sort-and-chunk engine above (training and full-sequence evaluation).
  * dense     - the visibility rule over all cached keys, for decoding steps with a KV cache
                (a few new queries over S keys: O(S) per query).
  * reference - the same rule as dense L x S masks built from the buckets, per round.

Statistics (aux.stats, logged to TensorBoard as stats/... and shown by `lmtrain inspect`):
bucket occupancy (the largest bucket's size over `chunk`, and the share of queries whose
bucket holds more earlier keys than the window reaches), and in evaluation the share of
full shared-QK attention mass each round recovers, and all rounds together, on a sample
of `mass_sample` queries of the first sequence.

Shapes: B batch, H heads, R rounds, L queries, S keys, D head dim, N chunks, C chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lmtrain.model.attention.base import ATTENTION, AttentionConfig, AttentionKernel, Capabilities, decide
from lmtrain.model.attention.paths import document_mask

SELF_SCORE = -1e5  # a query's score for its own key: zero weight beside any other key


@dataclass
class LSHConfig(AttentionConfig):
    kind: str = "lsh"
    chunk: int = 64  # positions per sorted chunk; each query sees up to `chunk` keys of its bucket
    rounds: int = 2  # hash rounds (more: closer to full attention, proportionally slower)
    buckets: int = 0  # buckets per round: 1 or even; 0 = the power of two at or above 2 L / chunk, per length
    mass_sample: int = 256  # queries of the first sequence whose recovered attention mass evaluation reports; 0: off
    backend: str = "auto"  # auto: chunks for full sequences, dense for decoding steps


def bucket_count(cfg: LSHConfig, L: int) -> int:
    """The buckets per round at length L: the configured count, or the power of two at or above
    2 L / chunk (at least 2)."""
    if cfg.buckets:
        return cfg.buckets
    return max(2, 1 << (-(-2 * L // cfg.chunk) - 1).bit_length())


def bucket_factors(n: int) -> tuple[int, ...]:
    """Hash levels for n buckets: a power of two from 64 up hashes as two independent levels
    n1 x n2 (HF Reformer's factorised buckets), so hashing costs (n1 + n2) / 2 projections per
    key instead of n / 2: with n proportional to L, one level would make hashing O(L^2)."""
    if n < 64 or n & (n - 1):
        return (n,)
    n1 = 1 << ((n.bit_length() - 1 + 1) // 2)
    return (n1, n // n1)


def hash_buckets(k_BHSD: Tensor, rotations_HRDN: Optional[Tensor], factors: tuple[int, ...] = ()) -> Tensor:
    """B x H x R x S buckets: per level of `factors` (one level: all n/2 columns of the rotations),
    argmax([k R ; -k R]), combined in mixed radix. None rotations: one bucket."""
    if rotations_HRDN is None:
        B, H, S, _ = k_BHSD.shape
        return torch.zeros(B, H, 1, S, dtype=torch.long, device=k_BHSD.device)
    proj = torch.einsum("bhsd,hrdn->bhrsn", k_BHSD.to(rotations_HRDN.dtype), rotations_HRDN)
    factors = factors or (2 * proj.shape[-1],)
    bucket = None
    for n, p in zip(factors, proj.split([f // 2 for f in factors], dim=-1)):
        # argmax over [p ; -p] without building it: the larger of max(p) and -min(p) (ties: p).
        top, i_top = p.max(dim=-1)
        low, i_low = p.min(dim=-1)
        b = torch.where(top >= -low, i_top, i_low + n // 2)
        bucket = b if bucket is None else bucket * n + b
    return bucket


def bucket_sizes(buckets_BHRS: Tensor, n_buckets: int) -> Tensor:
    """B x H x R x n: how many keys each bucket holds."""
    sizes = buckets_BHRS.new_zeros(*buckets_BHRS.shape[:-1], n_buckets)
    return sizes.scatter_add_(-1, buckets_BHRS, torch.ones_like(buckets_BHRS))


def sorted_ranks(sorted_BHRS: Tensor, n_buckets: int) -> Tensor:
    """For keys sorted by (bucket, position): each one's rank within its bucket."""
    sizes = bucket_sizes(sorted_BHRS, n_buckets)
    starts = sizes.cumsum(dim=-1) - sizes
    return torch.arange(sorted_BHRS.shape[-1], device=sorted_BHRS.device) - starts.gather(-1, sorted_BHRS)


def ranks_in_bucket(buckets_BHRS: Tensor, n_buckets: int) -> Tensor:
    """For each key (keys in position order), how many keys of its bucket come before it."""
    sorted_BHRS, perm = torch.sort(buckets_BHRS, dim=-1, stable=True)
    return torch.empty_like(perm).scatter_(-1, perm, sorted_ranks(sorted_BHRS, n_buckets))


def unit_keys(q_BHLD: Tensor) -> Tensor:
    return q_BHLD / q_BHLD.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def combine_rounds(o_BHRLD: Tensor, lse_BHRL: Tensor) -> Tensor:
    """o = sum_r o_r softmax_r(lse_r): attention over the union of the rounds' keys."""
    return (o_BHRLD * lse_BHRL.softmax(dim=2)[..., None]).sum(dim=2)


TILE_SCORES = 1 << 19  # scores per tile of chunks (2 MB in float32): a tile's buffers stay in cache
GROUP_BYTES = 4 << 20  # bytes of one head group's L x D tensor in the chunk engine


def chunk_bias(qkey_TC: Tensor, kkey_TK: Tensor, base_CK: Tensor) -> Tensor:
    """T x C x 2C additive mask of a tile of chunks: `base` (0, or SELF_SCORE at lag 0; -inf where
    the sorted lag is outside [0, C)) where the keys match the query's, -inf elsewhere."""
    return torch.where(kkey_TK[:, None, :] == qkey_TC[:, :, None], base_CK, float("-inf"))


class ChunkAttention(torch.autograd.Function):
    """For M chunks of C sorted queries (already scaled by 1/sqrt(D)) and their keys and values
    (M x C x D), each chunk over 2C keys (the previous chunk's, then its own):
    o = softmax(q k^T + mask) v and lse = logsumexp(q k^T + mask).
    Key j is visible to query i iff their match keys (bucket, and document) are equal and
    `base` is finite there. Tiles of chunks go one at a time, and the backward recomputes
    each tile's probabilities from q, k and lse (as flash attention does), with
    dS = P (dO v^T - rowsum(dO o) + dlse): nothing chunk-sized is kept between the passes,
    and each tile's buffers stay in cache."""

    @staticmethod
    def forward(fctx, q, k, v, qkey, kkey, base):
        M, C, _ = q.shape
        tile = max(1, TILE_SCORES // base.numel())
        k2, v2 = with_previous_view(k), with_previous_view(v)
        o, lse = torch.empty_like(q), q.new_empty(M, C)
        for t0 in range(0, M, tile):
            t = slice(t0, t0 + tile)
            probs = torch.baddbmm(chunk_bias(qkey[t], kkey[t], base), q[t], k2[t].transpose(1, 2))
            lse_t = probs.logsumexp(dim=-1, keepdim=True)
            torch.bmm(probs.sub_(lse_t).exp_(), v2[t], out=o[t])
            lse[t] = lse_t.squeeze(-1)
        fctx.save_for_backward(q, k, v, qkey, kkey, base, o, lse)
        return o, lse

    @staticmethod
    def backward(fctx, d_o, d_lse):
        q, k, v, qkey, kkey, base, o, lse = fctx.saved_tensors
        M, C, D = q.shape
        tile = max(1, TILE_SCORES // base.numel())
        k2, v2 = with_previous_view(k), with_previous_view(v)
        shift = (d_o * o).sum(dim=-1, keepdim=True)
        if d_lse is not None:
            shift = shift - d_lse[..., None]
        d_q = torch.empty_like(q)
        # Gradients of the padded key and value rows: chunk m's 2C keys are rows m C .. m C + 2C.
        d_kp, d_vp = q.new_zeros(M * C + C, D), q.new_zeros(M * C + C, D)
        for t0 in range(0, M, tile):
            t = slice(t0, t0 + tile)
            n = min(M, t0 + tile) - t0
            probs = torch.baddbmm(chunk_bias(qkey[t], kkey[t], base), q[t], k2[t].transpose(1, 2))
            probs.sub_(lse[t, :, None]).exp_()
            d_s = torch.bmm(d_o[t], v2[t].transpose(1, 2)).sub_(shift[t]).mul_(probs)
            torch.bmm(d_s, k2[t], out=d_q[t])
            d_k, d_v = torch.bmm(d_s.transpose(1, 2), q[t]), torch.bmm(probs.transpose(1, 2), d_o[t])
            for d_p, grad in ((d_kp, d_k), (d_vp, d_v)):
                d_p[t0 * C:(t0 + n) * C] += grad[:, :C].reshape(-1, D)  # as the previous chunk's keys
                d_p[(t0 + 1) * C:(t0 + n + 1) * C] += grad[:, C:].reshape(-1, D)  # as their own chunk's
        return d_q, d_kp[C:].view_as(k), d_vp[C:].view_as(v), None, None, None


def with_previous_view(x_MCD: Tensor) -> Tensor:
    """M x 2C x D: each chunk's previous chunk, then itself, as a strided view of x padded by one
    chunk in front (no copy of the keys; chunk 0's previous rows are the zero padding, and the
    previous chunk of a round's first chunk is masked by its match keys)."""
    M, C, D = x_MCD.shape
    padded = F.pad(x_MCD.reshape(M * C, D), (0, 0, C, 0))
    return padded.as_strided((M, 2 * C, D), (C * D, D, 1))


def chunk_attention_with_dropout(q, k, v, qkey, kkey, base, p: float):
    """ChunkAttention's formula through autograd, with dropout on the probabilities (all tiles
    at once: dropout needs its mask in the backward)."""
    scores = torch.baddbmm(chunk_bias(qkey, kkey, base), q, with_previous_view(k).transpose(1, 2))
    lse = scores.logsumexp(dim=-1)
    probs = F.dropout(torch.exp(scores - lse[..., None]), p=p, training=True)
    return torch.bmm(probs, with_previous_view(v)), lse


@ATTENTION.register("lsh")
class LSHAttention(AttentionKernel):
    Config = LSHConfig
    caps = Capabilities(score_bias=False, kv_cache=True, query_rows=False, document_mask=True)
    refusals = {"score_bias": "a score bias of the distance would not follow the buckets: LSH picks keys by "
                              "content, so a bias on the distance cannot reach the far keys it leaves out",
                "query_rows": "every position's normalised query is also its key, so all queries are computed"}
    backends = ("chunks", "dense")
    shared_qk = True
    test_options = {"chunk": 8, "rounds": 2, "buckets": 4, "mass_sample": 16}

    cfg: LSHConfig

    def __init__(self, cfg: LSHConfig, *, d_model: int, n_heads: int, dropout: float, layer: int = 0):
        super().__init__(cfg, d_model=d_model, n_heads=n_heads, dropout=dropout, layer=layer)
        # The hash functions' seed: drawn from torch's generator (run.seed), kept in the state dict.
        seed = int(torch.randint(0, 2**31 - 1, (1,), device="cpu"))
        self.register_buffer("hash_seed", torch.tensor(seed, dtype=torch.int64))
        self._rotations: dict = {}

    @classmethod
    def check(cls, a) -> list[str]:
        reasons = super().check(a)
        cfg, m = a.model.attention, a.model
        if cfg.chunk < 1:
            reasons.append("model.attention.chunk must be at least 1")
        if cfg.rounds < 1:
            reasons.append("model.attention.rounds must be at least 1")
        if cfg.buckets < 0 or (cfg.buckets > 1 and cfg.buckets % 2):
            reasons.append(f"model.attention.buckets={cfg.buckets}: use 1, an even count (rotations give n/2 "
                           "directions and their opposites), or 0 for the power of two at or above 2 L / chunk")
        if cfg.mass_sample < 0:
            reasons.append("model.attention.mass_sample must be 0 (off) or positive")
        if a.position.rotates_qk:
            from lmtrain.model.positions import POSITIONS

            plain = ", ".join(k for k, p in POSITIONS.items() if not (p.rotates_qk or p.has_score_bias))
            reasons.append(f"model.attention.kind=lsh with model.position.kind={m.position.kind}: it rotates queries "
                           "and keys by their positions, so the buckets of a shared query-key would depend on "
                           f"position, not content; use one of {plain}")
        return reasons

    @classmethod
    def attention_flops(cls, model, seq_len: int) -> float:
        """Per round, each query scores 2 chunks of keys: 12 x 2 C x d x rounds, whatever L."""
        cfg = model.attention
        return 12.0 * model.d_model * min(seq_len, 2 * cfg.chunk) * cfg.rounds

    # -- hashing ------------------------------------------------------------------------------
    def rotations(self, n_buckets: int, head_dim: int, device, dtype) -> Optional[Tensor]:
        """H x R x D x sum(n_i / 2) random rotations for n buckets (n_i: its `bucket_factors`),
        drawn from the seed buffer (None: one bucket)."""
        if n_buckets == 1:
            return None
        # Keyed by the seed buffer's storage and version (a load_state_dict changes it), so no call
        # reads the buffer's value (a host sync on GPU) unless the rotations are drawn again.
        key = (self.hash_seed.data_ptr(), self.hash_seed._version, n_buckets, head_dim, str(device), dtype)
        if key not in self._rotations:
            g = torch.Generator().manual_seed(int(self.hash_seed) * 1_000_003 + n_buckets)
            shape = (self.n_heads, self.cfg.rounds, head_dim, sum(f // 2 for f in bucket_factors(n_buckets)))
            self._rotations = {key: torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)}
        return self._rotations[key]

    def buckets(self, k_BHSD: Tensor, n_buckets: int) -> Tensor:
        """B x H x R x S buckets of the keys (R = 1 with one bucket: every round is the same)."""
        dt = torch.promote_types(k_BHSD.dtype, torch.float32)
        with torch.no_grad():
            rotations = self.rotations(n_buckets, k_BHSD.shape[-1], k_BHSD.device, dt)
            return hash_buckets(k_BHSD.detach(), rotations, bucket_factors(n_buckets))

    # -- paths ----------------------------------------------------------------------------
    def auto_backend(self, q_BHLD, k_BHSD, inp) -> str:
        return "chunks" if inp.aligned else "dense"

    def route(self, q_BHLD, k_BHSD, inp) -> str:
        path = super().route(q_BHLD, k_BHSD, inp)
        return path if inp.aligned else "dense"  # decoding steps: new queries over cached keys

    def fast(self, path, q_BHLD, k_BHSD, v_BHSD, inp):
        if path == "dense":
            return self.reference(q_BHLD, k_BHSD, v_BHSD, inp)
        return self._chunks(q_BHLD, k_BHSD, v_BHSD, inp)

    def _chunks(self, q_BHLD, k_BHSD, v_BHSD, inp):
        """Heads in groups whose L x D tensors take about GROUP_BYTES each: at long L one head at a
        time, so that a group's gathered rows and buffers stay in the last-level cache."""
        B, H, L, D = q_BHLD.shape
        n = bucket_count(self.cfg, L)
        buckets_BHRL = decide(self, lambda: self.buckets(k_BHSD, n))
        g = max(1, GROUP_BYTES // (B * L * D * q_BHLD.element_size()))
        outs, sorted_buckets = [], []
        for h in range(0, H, g):
            hs = slice(h, h + g)
            o, sb = self._engine(q_BHLD[:, hs], k_BHSD[:, hs], v_BHSD[:, hs], buckets_BHRL[:, hs], inp.doc_ids, n)
            outs.append(o)
            sorted_buckets.append(sb)
        self._statistics(torch.cat(sorted_buckets, dim=1), buckets_BHRL, n, q_BHLD, k_BHSD, inp)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _engine(self, q_BHLD, k_BHSD, v_BHSD, buckets_BHRL, doc, n):
        """Sort, chunk, attend, unsort and combine rounds, for some heads: (output, sorted buckets)."""
        B, H, L, D = q_BHLD.shape
        C, R = self.cfg.chunk, buckets_BHRL.shape[2]
        N = -(-L // C)
        Lp = N * C
        dt = torch.promote_types(q_BHLD.dtype, torch.float32)
        q, kn, v = q_BHLD.to(dt) / math.sqrt(D), unit_keys(k_BHSD.to(dt)), v_BHSD.to(dt)
        if Lp > L:  # padding: a bucket of its own, after every real position
            pad = Lp - L
            q, kn, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, kn, v))
            buckets_BHRL = F.pad(buckets_BHRL, (0, pad), value=n)
            doc = F.pad(doc, (0, pad), value=-1) if doc is not None else None
        # Sort each round by (bucket, position): a stable sort of the buckets keeps position order.
        sb_BHRL, perm_BHRL = torch.sort(buckets_BHRL, dim=-1, stable=True)
        # Rows of the flattened (B H Lp) x D tensors, in each round's sorted order.
        base = (torch.arange(B * H, device=q.device) * Lp).view(B, H, 1, 1)
        rows = (perm_BHRL + base).reshape(-1)

        def with_previous(x):  # each chunk's keys: the previous chunk's, then its own
            return torch.cat((x.roll(1, dims=3), x), dim=4)

        sq, sk, sv = (x.reshape(-1, D).index_select(0, rows).view(-1, C, D) for x in (q, kn, v))  # (B H R N) C D
        with torch.no_grad():
            # Within a bucket, sorted order is position order: a key of the query's bucket at sorted
            # lag 0 <= lag < C before it is an earlier position (lag 0: the query itself). Match
            # keys: the bucket (and document); the previous chunk of chunk 0 matches nothing.
            key = sb_BHRL if doc is None else sb_BHRL * (int(doc.max()) + 2) + 1 + doc[:, None, None].expand(
                -1, H, R, -1).gather(3, perm_BHRL)
            qkey = key.view(B, H, R, N, C)
            kkey = with_previous(qkey).clone()
            kkey[:, :, :, 0, :C] = -1
            i, j = torch.arange(C, device=q.device)[:, None], torch.arange(2 * C, device=q.device)[None, :]
            lag = i + C - j  # C x 2C
            base = torch.zeros(C, 2 * C, dtype=dt, device=q.device).masked_fill_((lag < 0) | (lag >= C),
                                                                                 float("-inf"))
            base.masked_fill_(lag == 0, SELF_SCORE)
        args = (sq, sk, sv, qkey.reshape(-1, C), kkey.reshape(-1, 2 * C), base)
        if self.attn_dropout > 0:
            o_sorted, lse = chunk_attention_with_dropout(*args, self.attn_dropout)
        else:
            o_sorted, lse = ChunkAttention.apply(*args)
        # Back to position order: each position's row in each round's sorted order.
        arange = torch.arange(Lp, device=q.device).expand_as(perm_BHRL)
        inv = torch.empty_like(perm_BHRL).scatter_(-1, perm_BHRL, arange)
        back = (inv[..., :L] + torch.arange(B * H * R, device=q.device).view(B, H, R, 1) * Lp).reshape(-1)
        o_BHRLD = o_sorted.reshape(-1, D).index_select(0, back).view(B, H, R, L, D)
        if R == 1:
            return o_BHRLD[:, :, 0].to(q_BHLD.dtype), sb_BHRL
        lse_BHRL = lse.reshape(-1).index_select(0, back).view(B, H, R, L)
        return combine_rounds(o_BHRLD, lse_BHRL).to(q_BHLD.dtype), sb_BHRL

    # -- the rule as dense masks ----------------------------------------------------------------
    def visible(self, buckets_BHRS: Tensor, n_buckets: int, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """B x H x R x L x S: key j visible to query i in round r (queries are among the keys)."""
        rank = ranks_in_bucket(buckets_BHRS, n_buckets)  # B H R S
        q_idx = q_pos - k_pos[0]  # the queries' own keys
        qb, qr = buckets_BHRS[..., q_idx], rank[..., q_idx]  # B H R L
        same = qb[..., :, None] == buckets_BHRS[..., None, :]
        causal = (k_pos[None, :] <= q_pos[:, None])
        window = (qr[..., :, None] - rank[..., None, :]) < self.cfg.chunk
        return same & causal & window

    def reference(self, q_BHLD, k_BHSD, v_BHSD, inp):
        """Per round: softmax over the keys the rule makes visible (self only if alone), by dense
        L x S masks from the same buckets; rounds combined by their log-sum-exp."""
        dtype = q_BHLD.dtype
        dt = torch.promote_types(dtype, torch.float32)
        q, k, v = q_BHLD.to(dt), unit_keys(k_BHSD.to(dt)), v_BHSD.to(dt)
        S = k.shape[2]
        n = bucket_count(self.cfg, S)
        buckets_BHRS = decide(self, lambda: self.buckets(k_BHSD, n))
        visible = self.visible(buckets_BHRS, n, inp.q_pos, inp.k_pos)
        allowed = document_mask(inp, inp.q_pos, inp.k_pos)  # B 1 L S
        if allowed is not None:
            visible = visible & allowed[:, :, None]
        scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]))[:, :, None]  # B H 1 L S
        scores = scores.masked_fill(~visible, float("-inf"))
        scores = scores.masked_fill((inp.q_pos[:, None] == inp.k_pos[None, :]), SELF_SCORE)
        lse = scores.logsumexp(dim=-1)
        probs = F.dropout(torch.exp(scores - lse[..., None]), p=self.attn_dropout, training=self.attn_dropout > 0)
        return combine_rounds(probs @ v[:, :, None], lse).to(dtype)

    # -- statistics ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _statistics(self, sorted_BHRL, buckets_BHRL, n, q_BHLD, k_BHSD, inp) -> None:
        """Bucket occupancy per forward; in evaluation, the attention mass each round recovers."""
        L, C, stats = buckets_BHRL.shape[-1], self.cfg.chunk, inp.aux.stats
        name = f"lsh/layer{self.layer}"
        stats[f"{name}/largest_bucket_over_chunk"] = bucket_sizes(buckets_BHRL, n).max().float() / C
        # A query whose bucket holds more than `chunk` keys up to it misses its bucket's oldest.
        rank = sorted_ranks(sorted_BHRL[..., :L], n)
        stats[f"{name}/queries_beyond_window"] = (rank >= C).float().mean()
        if self.training or torch.is_grad_enabled() or not self.cfg.mass_sample:
            return
        # Full shared-QK attention of sampled queries of the first sequence, and the share of
        # its mass on the keys each round (and all rounds) make visible.
        g = torch.Generator().manual_seed(int(self.hash_seed))
        rows = torch.randperm(L, generator=g)[: self.cfg.mass_sample].sort().values.to(q_BHLD.device)
        dt = torch.promote_types(q_BHLD.dtype, torch.float32)
        q, k = q_BHLD[:1, :, rows].to(dt), unit_keys(k_BHSD[:1].to(dt))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # 1 H l L
        q_pos, k_pos = inp.k_pos[rows], inp.k_pos
        scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
        scores = scores.masked_fill(k_pos[None, :] == q_pos[:, None], SELF_SCORE)
        full = scores.softmax(dim=-1)[:, :, None]  # 1 H 1 l L
        visible = self.visible(buckets_BHRL[:1], n, q_pos, k_pos)  # 1 H R l L
        for r in range(visible.shape[2]):
            stats[f"{name}/mass_round{r + 1}"] = (full[:, :, 0] * visible[:, :, r]).sum(-1).mean()
        stats[f"{name}/mass_all_rounds"] = (full[:, :, 0] * visible.any(dim=2)).sum(-1).mean()
