"""LSH attention (lmtrain/model/attention/lsh.py) and the Reformer recipe's chunked feed-forward.

Against references: one bucket with a chunk of at least L is dense shared-QK attention with
the self-mask; the chunk engine equals dense masks built from the same buckets (outputs and
gradients, with padding, documents, several rounds); more rounds approximate full attention
better; the window rule is causal where Reformer's plain chunk rule is not; reversible
layers replay the forward's buckets.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmtrain.model.attention import ATTENTION, AttentionInputs, build_attention, reference_paths
from lmtrain.model.attention.lsh import SELF_SCORE, bucket_count, combine_rounds, ranks_in_bucket
from lmtrain.model.outputs import Aux
from tests.helpers import V, call_kernel, fast_vs_reference, make_model, none_position

H, D = 2, 16


def lsh(**opts):
    torch.manual_seed(0)
    return build_attention(ATTENTION.config("lsh", **opts), d_model=H * D, n_heads=H, dropout=0.0)


def shared_qkv(L, B=2, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g, dtype=dtype)
    v = torch.randn(B, H, L, D, generator=g, dtype=dtype)
    if grad:
        q.requires_grad_(True), v.requires_grad_(True)
    return q, v


def full_shared_qk(q, v):
    """Dense causal shared-QK attention: keys are the unit queries; a query sees itself only
    when it sees nothing else (position 0)."""
    L = q.shape[2]
    k = q / q.norm(dim=-1, keepdim=True)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    i = torch.arange(L)
    visible = (i[None, :] < i[:, None]) | ((i[:, None] == 0) & (i[None, :] == 0))
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("rounds", [1, 3])
def test_one_bucket_and_a_whole_chunk_is_dense_shared_qk_attention(rounds):
    L = 37
    q, v = shared_qkv(L)
    for chunk in (L, 64):
        kernel = lsh(chunk=chunk, rounds=rounds, buckets=1)
        out = call_kernel(kernel, q, q, v)
        torch.testing.assert_close(out, full_shared_qk(q, v), rtol=0, atol=1e-10)
        assert kernel.path_counts["chunks"] == 1


@pytest.mark.parametrize("opts", [dict(chunk=8, rounds=2, buckets=4), dict(chunk=5, rounds=3, buckets=0),
                                  dict(chunk=16, rounds=1, buckets=8), dict(chunk=4, rounds=4, buckets=2)],
                         ids=["padded", "auto-buckets", "one-round", "overflowing-buckets"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_the_chunk_engine_equals_dense_masks_from_the_same_buckets(opts, dtype):
    kernel = lsh(**opts)
    tol = kernel.tolerances[dtype]
    results = []
    for reference in (False, True):
        q, v = shared_qkv(45, dtype=dtype, grad=True)
        out = call_kernel(kernel, q, q, v, reference=reference)
        (out * torch.linspace(-1, 1, D, dtype=dtype)).sum().backward()
        results.append((out.detach(), q.grad, v.grad))
    for fast, ref in zip(*results):
        torch.testing.assert_close(fast, ref, rtol=tol.rtol, atol=tol.atol)
    assert kernel.path_counts["chunks"] == 1 and kernel.path_counts["reference"] == 1


def test_documents_are_honoured_by_both_paths():
    kernel = lsh(chunk=6, rounds=2, buckets=4)
    q, v = shared_qkv(30)
    doc_ids = torch.tensor([[0] * 10 + [1] * 20, [0] * 25 + [1] * 5])
    outs = []
    for reference in (False, True):
        inp = AttentionInputs(position=none_position(H * D, H), q_pos=torch.arange(30), k_pos=torch.arange(30),
                              aux=Aux(), doc_ids=doc_ids)
        with reference_paths(reference):
            outs.append(kernel(q, q, v, inp))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    # The first position of a document sees only itself: its output is its own value.
    torch.testing.assert_close(outs[0][0, :, 10], v[0, :, 10])


def plain_reformer_visible(buckets_BHRL, chunk, L):
    """Reformer's rule without the bucket window: any key of the query's sorted chunk and the
    previous one, j <= i (built here only to show that it is not causal)."""
    rank = torch.sort(buckets_BHRL, dim=-1, stable=True).indices.argsort(-1)  # sorted index of each position
    ch = rank // chunk
    i = torch.arange(L)
    same = (ch[..., None, :] == ch[..., :, None]) | (ch[..., None, :] == ch[..., :, None] - 1)
    return same & (i[None, :] <= i[:, None])


def test_the_window_rule_is_causal_where_reformers_plain_chunks_are_not():
    kernel = lsh(chunk=4, rounds=1, buckets=4)
    L, t = 48, 20
    q, v = shared_qkv(L, B=1)
    q2, v2 = q.clone(), v.clone()
    q2[:, :, t + 1:] = torch.randn_like(q2[:, :, t + 1:])  # later positions change (and rehash)
    v2[:, :, t + 1:] = torch.randn_like(v2[:, :, t + 1:])
    a, b = call_kernel(kernel, q, q, v), call_kernel(kernel, q2, q2, v2)
    torch.testing.assert_close(a[:, :, : t + 1], b[:, :, : t + 1], rtol=0, atol=1e-12)
    n = bucket_count(kernel.cfg, L)
    plain_a = plain_reformer_visible(kernel.buckets(q, n), 4, L)[..., : t + 1, :]
    plain_b = plain_reformer_visible(kernel.buckets(q2, n), 4, L)[..., : t + 1, :]
    assert not torch.equal(plain_a, plain_b)  # early queries' key sets depend on later tokens


def test_ranks_in_bucket():
    b = torch.tensor([[[[2, 0, 2, 2, 1, 0]]]])
    assert ranks_in_bucket(b, 3).tolist() == [[[[0, 0, 1, 2, 0, 1]]]]


def clustered(L, B=1, clusters=8, seed=0):
    """Queries near a few directions (attention that LSH can find), values random."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(H, clusters, D, generator=g, dtype=torch.float64) * 3
    pick = torch.randint(0, clusters, (B, H, L), generator=g)
    q = centres[torch.arange(H)[None, :, None], pick] + torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    return q, torch.randn(B, H, L, D, generator=g, dtype=torch.float64)


def test_more_rounds_approximate_full_attention_better():
    """Relative error against full shared-QK attention, averaged over hash seeds: 8 rounds
    below 2 below 1."""
    L = 256
    q, v = clustered(L, B=2)
    full = full_shared_qk(q, v)
    errors = {}
    for rounds in (1, 2, 8):
        errs = []
        for seed in range(4):
            kernel = lsh(chunk=16, rounds=rounds, buckets=16)
            kernel.hash_seed.fill_(seed)
            out = call_kernel(kernel, q, q, v)
            errs.append(float((out - full).norm() / full.norm()))
        errors[rounds] = sum(errs) / len(errs)
    assert errors[8] < errors[2] < errors[1], errors


def test_statistics_report_occupancy_and_recovered_mass_in_evaluation():
    kernel = lsh(chunk=8, rounds=3, buckets=4, mass_sample=32).eval()
    q, v = clustered(64)
    inp = AttentionInputs(position=none_position(H * D, H), q_pos=torch.arange(64), k_pos=torch.arange(64), aux=Aux())
    with torch.no_grad():
        kernel(q, q, v, inp)
    s = {k.split("/", 2)[-1]: float(v) for k, v in inp.aux.stats.items()}
    assert s["largest_bucket_over_chunk"] >= 64 / 4 / 8  # at least the mean bucket
    assert 0 <= s["queries_beyond_window"] <= 1
    rounds = [s[f"mass_round{r}"] for r in (1, 2, 3)]
    assert all(0 < m <= 1 for m in rounds)
    assert max(rounds) <= s["mass_all_rounds"] <= 1 + 1e-12
    kernel.train()
    inp.aux.stats.clear()
    kernel(q, q, v, inp)
    assert not any("mass" in k for k in inp.aux.stats)  # training: occupancy only


def test_rotations_come_from_the_seed_in_the_state_dict():
    a, b = lsh(chunk=8, buckets=8), lsh(chunk=8, buckets=8)
    b.hash_seed.fill_(int(a.hash_seed) + 1)
    q, _ = shared_qkv(40)
    assert not torch.equal(a.buckets(q, 8), b.buckets(q, 8))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.buckets(q, 8), b.buckets(q, 8))
    assert "hash_seed" in a.state_dict()


def test_combine_rounds_is_attention_over_the_union():
    """Two rounds over disjoint key sets combine into one softmax over both."""
    s = torch.randn(1, 1, 1, 6, dtype=torch.float64)
    v = torch.randn(6, 3, dtype=torch.float64)
    masks = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    scores = s.expand(1, 1, 2, 6).masked_fill(~masks[None, None], float("-inf"))  # B H R S: one query
    lse = scores.logsumexp(-1)
    o_r = (scores - lse[..., None]).exp() @ v  # B H R D
    torch.testing.assert_close(combine_rounds(o_r[..., None, :], lse[..., None])[..., 0, :],
                               (s.softmax(-1) @ v)[:, :, 0])
    assert SELF_SCORE < -1e4


# ---- in the decoder ---------------------------------------------------------------------------

LSH_MODEL = ["model.attention.kind=lsh", "model.attention.chunk=8", "model.attention.buckets=4",
             "model.position.kind=none"]


def test_shared_qk_projects_queries_and_values_only():
    model = make_model(*LSH_MODEL)
    layer = model.layers[0].attn if hasattr(model, "layers") else None
    attn = layer or next(m for m in model.modules() if type(m).__name__ == "SelfAttention")
    assert attn.qkv.weight.shape[0] == 2 * attn.qkv.weight.shape[1]


def test_reversible_lsh_gives_the_gradients_of_plain_autograd_and_replays_buckets(monkeypatch):
    x = torch.randint(0, V, (2, 48))
    grads = {}
    calls = {}
    for residual in ("two_stream", "reversible"):
        model = make_model(*LSH_MODEL, f"model.residual.kind={residual}", "model.n_layers=3", train=True)
        kernels = model.attention_kernels()
        for k in kernels:
            original = k.buckets

            def counted(*a, _orig=original, _name=residual, **kw):
                calls[_name] = calls.get(_name, 0) + 1
                return _orig(*a, **kw)

            monkeypatch.setattr(k, "buckets", counted)
        (_, fast_grads), _ = fast_vs_reference(model, x)
        grads[residual] = fast_grads
    # reference pass of fast_vs_reference hashes once more per layer; the fast pass hashes once
    # per layer, and the reversible backward reuses those buckets instead of hashing again.
    assert calls["reversible"] == calls["two_stream"] == 2 * 3
    assert grads["reversible"].keys() == grads["two_stream"].keys()
    for name, g in grads["two_stream"].items():
        torch.testing.assert_close(grads["reversible"][name], g, rtol=1e-9, atol=1e-11, msg=name)


def test_a_rebuilt_input_that_flips_a_bucket_still_gets_the_forwards_buckets():
    """The replay itself: buckets decided under kept_decisions come back on the recompute
    even when the recomputed input would hash differently."""
    from lmtrain.model.attention import kept_decisions

    kernel = lsh(chunk=8, buckets=8)
    q, v = shared_qkv(40)
    store = {}
    with kept_decisions(store, replay=False):
        first = call_kernel(kernel, q, q, v)
    moved = torch.randn_like(q)  # hashes elsewhere
    with kept_decisions(store, replay=True):
        replayed = kernel.buckets(moved, 8)
        assert not torch.equal(replayed, store[kernel])
        again = call_kernel(kernel, q, q, v)
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_chunked_feed_forward_equals_the_unchunked_one():
    x = torch.randint(0, V, (2, 40))
    results = []
    for chunk in (0, 7, 16, 64):
        model = make_model(f"model.ffn_chunk={chunk}", train=True)
        out = model(x).logits_BLV
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    base_out, base_grads = results[0]
    for out, grads in results[1:]:
        # The same values up to the matrix library's summation order for fewer rows.
        torch.testing.assert_close(out, base_out, rtol=1e-13, atol=1e-13)
        for n, g in grads.items():
            torch.testing.assert_close(g, base_grads[n], rtol=1e-11, atol=1e-12, msg=n)


def test_heads_in_groups_and_tiles_of_chunks_give_the_same_result(monkeypatch):
    """One head at a time and one chunk per tile (as at long L) equal the reference."""
    from lmtrain.model.attention import lsh as lsh_module

    monkeypatch.setattr(lsh_module, "GROUP_BYTES", 1)
    monkeypatch.setattr(lsh_module, "TILE_SCORES", 1)
    kernel = lsh(chunk=4, rounds=3, buckets=4)
    results = []
    for reference in (False, True):
        q, v = shared_qkv(27, grad=True)
        out = call_kernel(kernel, q, q, v, reference=reference)
        (out * torch.linspace(-1, 1, D, dtype=out.dtype)).sum().backward()
        results.append((out.detach(), q.grad, v.grad))
    for fast, ref in zip(*results):
        torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
