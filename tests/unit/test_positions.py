"""Positional schemes (lmtrain/model/positions.py): ALiBi's slopes and bias, RoPE's relative
scores, the learned table's limit, the sinusoidal embedding recipe, the FlexAttention score_mod."""

from __future__ import annotations

import math

import pytest
import torch

from lmtrain.config import ConfigError
from lmtrain.model.positions import PositionOutOfRange, alibi_slopes, build_position
from tests.helpers import V, make_model, property_config


@pytest.mark.parametrize("n", [8, 12, 16])
def test_alibi_slopes_follow_the_formula(n):
    def pow2(m):  # geometric sequence starting at 2^(-8/m) with that ratio
        return [2 ** (-8 * (i + 1) / m) for i in range(m)]

    c = 2 ** int(math.floor(math.log2(n)))
    expected = pow2(c) + pow2(2 * c)[0::2][: n - c]
    assert alibi_slopes(n) == pytest.approx(expected, rel=1e-12)
    if n == 8:
        assert alibi_slopes(8) == pytest.approx([1 / 2 ** k for k in range(1, 9)])
    if n == 12:  # 8-head slopes, then slopes 0, 2, 4, 6 of the 16-head sequence
        assert alibi_slopes(12)[8:] == pytest.approx([2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5])


def test_alibi_bias_sign_and_shape():
    pos = build_position("alibi", d_model=32, n_heads=4, seq_len=0)
    q, k = torch.arange(5, 8), torch.arange(8)
    bias = pos.score_bias(q, k)
    assert bias.shape == (4, 3, 8)
    slopes = torch.tensor(alibi_slopes(4))
    # slope * (k - q): zero on the diagonal, more negative the farther back the key.
    torch.testing.assert_close(bias[:, 0, 5], torch.zeros(4))
    torch.testing.assert_close(bias[:, 0, 2], -3 * slopes)
    assert (bias[:, :, :5] < 0).all()


def test_rope_scores_depend_only_on_distance():
    pos = build_position("rope", d_model=32, n_heads=2, seq_len=0)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def score(i, j):
        return (pos.rotate(q, torch.tensor([i])) * pos.rotate(k, torch.tensor([j]))).sum()

    torch.testing.assert_close(score(7, 3), score(104, 100))
    assert not torch.allclose(score(7, 3), score(7, 4))


def test_rope_theta_is_its_own_option():
    slow = make_model("model.position=rope", "model.position.theta=500000")
    assert slow.position.theta == 500000.0 and make_model("model.position=rope").position.theta == 10000.0
    with pytest.raises(ConfigError, match=r"model.rope_theta: this key moved; write model.position.theta"):
        property_config("model.position=rope", "model.rope_theta=5")


def test_learned_positions_refuse_beyond_their_table():
    model = make_model("model.position=learned", "model.position.max_position=16", "data.seq_len=16")
    assert model.max_len == 16
    model(torch.randint(0, V, (1, 16)))
    with pytest.raises(PositionOutOfRange):
        model(torch.randint(0, V, (1, 17)))
    assert make_model("model.position=learned").max_len == 48  # 0: data.seq_len
    with pytest.raises(ConfigError, match="model.position.max_position: 16 is shorter than data.seq_len=48"):
        property_config("model.position=learned", "model.position.max_position=16")


def test_sinusoidal_uses_vaswanis_embedding_recipe():
    """Token embeddings N(0, d^-1/2) times sqrt(d) (about 1 per dimension), plus sinusoids of
    amplitude 1; the other schemes keep GPT-2's embeddings."""
    model = make_model("model.position=sinusoidal", dtype=torch.float32)
    d = model.cfg.d_model
    assert model.embed_scale == pytest.approx(math.sqrt(d))
    assert float(model.embed.weight.detach().std()) == pytest.approx(d ** -0.5, rel=0.1)
    pe = model.position.embed(torch.zeros(1, 48, d), torch.arange(48))
    assert float(pe.abs().max()) == pytest.approx(1.0, abs=1e-3)
    other = make_model("model.position=learned", dtype=torch.float32)
    assert other.embed_scale == 1.0 and float(other.embed.weight.detach().std()) == pytest.approx(0.02, rel=0.1)


def test_alibi_score_mod_is_one_function_that_follows_the_module():
    pos = build_position("alibi", d_model=32, n_heads=4, seq_len=0)
    fn = pos.score_mod()
    assert pos.score_mod() is fn  # no new closure per call: no recompiles under torch.compile
    pos.to(torch.float64)
    score = fn(torch.tensor(0.0, dtype=torch.float64), 0, 1, torch.tensor(5), torch.tensor(2))
    assert score.dtype == torch.float64 and float(score) == pytest.approx(-3 * alibi_slopes(4)[1])
