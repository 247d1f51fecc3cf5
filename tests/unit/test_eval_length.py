"""Length-extrapolation evaluation: the window plans, and the scores against a direct
computation. The report files, the CLI, the training callback and the memory bound are in
tests/integration/test_eval_length.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmtrain.config import load_config
from lmtrain.evaluate.length import EvalError, Plan, evaluate_length, resolve_stride, scored_range
from lmtrain.model import build_model
from tests.helpers import DEBUG, TINY_MODEL


def targets_of(plan: Plan) -> list[int]:
    """Stream indices of the scored targets, in plan order."""
    out = []
    for w in plan.windows():
        out += [w.start + 1 + p for p in range(w.first_scored, w.length)]
    return out


@pytest.mark.parametrize("mode,length,stride,n", [
    ("nonoverlap", 16, None, 64), ("nonoverlap", 16, None, 70), ("sliding", 16, 4, 64), ("sliding", 16, 5, 70),
    ("sliding", 16, 1, 33), ("sliding", 16, 16, 48), ("nonoverlap", 48, None, 48),
])
def test_every_target_is_scored_once_with_its_context(mode, length, stride, n):
    offset = 48
    plan = Plan(mode, length, resolve_stride(mode, length, stride), offset, n)
    assert targets_of(plan) == list(range(offset, offset + n))
    s = plan.stride if mode == "sliding" else length
    for w in plan.windows():
        assert w.start >= 0 and w.length == length
        # a scored target at position p has p tokens of context: at least L - S
        assert w.first_scored >= length - s
    assert plan.n_windows() == len(list(plan.windows()))


def test_sliding_with_stride_length_is_nonoverlap():
    for n in (64, 70):
        a = list(Plan("nonoverlap", 16, 16, 32, n).windows())
        b = list(Plan("sliding", 16, 16, 32, n).windows())
        assert a == b


def test_scored_range_is_shared_by_all_lengths():
    offset, n = scored_range(10_000, [128, 256, 512], max_tokens=3000)
    assert offset == 512 and n == 2560  # rounded down to a multiple of the longest length
    assert scored_range(10_000, [128], None) == (128, 9856)  # targets 128..9983 < 10,000
    with pytest.raises(EvalError, match="--lengths"):
        scored_range(400, [512], None)
    with pytest.raises(EvalError, match="--stride"):
        resolve_stride("sliding", 64, 65)


@pytest.fixture(scope="module")
def tiny_model(tiny_data):
    torch.manual_seed(0)
    cfg = load_config(DEBUG, [*tiny_data, *TINY_MODEL, "model.position=alibi"])
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def stream():
    return np.random.default_rng(0).integers(0, 512, size=3000).astype(np.uint16)


def direct_loss(model, tokens, plan: Plan) -> tuple[float, int]:
    """The plain computation: full logits of each window, cross-entropy of the scored part."""
    losses = []
    with torch.no_grad():
        for w in plan.windows():
            seq = torch.from_numpy(np.asarray(tokens[w.start : w.start + w.length + 1], dtype=np.int64))[None]
            logits = model(seq[:, :-1]).logits_BLV[0, w.first_scored :]
            losses.append(F.cross_entropy(logits.double(), seq[0, 1 + w.first_scored :], reduction="none"))
    allv = torch.cat(losses)
    return float(allv.mean()), allv.numel()


@pytest.mark.parametrize("mode,stride", [("nonoverlap", None), ("sliding", 16), ("sliding", 7)])
def test_reported_loss_equals_a_direct_computation(tiny_model, stream, mode, stride):
    offset, n = scored_range(len(stream), [32, 64], max_tokens=700)
    plan = Plan(mode, 64, resolve_stride(mode, 64, stride), offset, n)
    r = evaluate_length(tiny_model, stream, plan, batch_tokens=200, buckets_per_octave=2)
    want, count = direct_loss(tiny_model, stream, plan)
    assert r.status == "ok" and r.tokens_scored == count == n
    assert r.loss == pytest.approx(want, rel=1e-6)
    assert r.ppl == pytest.approx(math.exp(want), rel=1e-6)
    # the per-position buckets partition the scored tokens
    assert sum(r.bucket_tokens) == n
    weighted = sum(loss * t for loss, t in zip(r.bucket_loss, r.bucket_tokens) if t) / n
    assert weighted == pytest.approx(r.loss, rel=1e-9)
    edges = r.bucket_edges
    assert edges[0] == 0 and edges[-1] == 64 and edges == sorted(set(edges))
    for lo, hi, t in zip(edges, edges[1:], r.bucket_tokens):
        # each position of the bucket is scored once per window that scores it
        scored = [p for w in plan.windows() for p in range(w.first_scored, w.length) if lo <= p < hi]
        assert t == len(scored)


def test_nonoverlap_and_sliding_agree_when_stride_is_length(tiny_model, stream):
    offset, n = scored_range(len(stream), [64], max_tokens=640)
    a = evaluate_length(tiny_model, stream, Plan("nonoverlap", 64, 64, offset, n), batch_tokens=256)
    b = evaluate_length(tiny_model, stream, Plan("sliding", 64, 64, offset, n), batch_tokens=256)
    assert a.loss == b.loss and a.bucket_loss == b.bucket_loss and a.tokens_scored == b.tokens_scored == n


def test_batching_does_not_change_the_numbers(tiny_model, stream):
    offset, n = scored_range(len(stream), [64], max_tokens=640)
    plan = Plan("sliding", 64, 24, offset, n)
    a = evaluate_length(tiny_model, stream, plan, batch_tokens=64)
    b = evaluate_length(tiny_model, stream, plan, batch_tokens=4096)
    assert a.loss == pytest.approx(b.loss, rel=1e-6)


def test_learned_positions_beyond_their_table_are_reported_not_a_crash(tiny_data, stream):
    cfg = load_config(DEBUG, [*tiny_data, *TINY_MODEL, "model.position=learned"])
    model = build_model(cfg).eval()
    offset, n = scored_range(len(stream), [64, 128], max_tokens=256)
    ok = evaluate_length(model, stream, Plan("nonoverlap", 64, 64, offset, n))
    na = evaluate_length(model, stream, Plan("nonoverlap", 128, 128, offset, n))
    assert ok.status == "ok"
    assert na.status == "unsupported" and "learned positions end at 64" in na.reason
    assert na.to_dict()["ppl"] is None
