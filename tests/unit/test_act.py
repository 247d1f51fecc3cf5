"""Universal Transformer depth and ACT halting (lmtrain/model/universal.py). Training through
the CLI, exact resume, the logged statistics, `inspect` and `generate --show-token-stats` are
in tests/integration/test_act.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmtrain.config import ConfigError, load_config
from lmtrain.generate import generate
from lmtrain.model import build_model
from lmtrain.model.layer import Context, KVCache
from lmtrain.model.outputs import Aux
from lmtrain.model.positions import POSITIONS
from lmtrain.model.universal import Halting
from tests.helpers import CONFIGS, assert_batch_equals_one_by_one, assert_causal

V = 97
POSITION_KINDS = sorted(POSITIONS)


def make(depth: str = "act", *extra: str, position: str = "alibi", dtype=torch.float64, seed: int = 0):
    cfg = load_config(CONFIGS / "debug.yaml", [
        f"model.depth.kind={depth}", f"model.position={position}", "model.n_layers=2", "model.d_model=32",
        "model.n_heads=4", "model.d_ff=64", "data.vocab_size=257", "data.seq_len=48", *extra])
    torch.manual_seed(seed)
    return build_model(cfg).to(dtype).eval()


def spread_halting(model, seed: int = 1):
    """Halting probabilities that differ a lot between positions (at initialisation they are all
    about sigmoid(1)), so that positions halt at different steps."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = model.depth.halt.weight
        w.copy_(torch.randn(w.shape, generator=g, dtype=w.dtype) * 1.5)
        model.depth.halt.bias.fill_(-0.5)
    return model


def constant_halting(model, p: float):
    with torch.no_grad():
        model.depth.halt.weight.zero_()
        model.depth.halt.bias.fill_(math.log(p / (1 - p)))
    return model


def count_block_applications(model) -> list[int]:
    calls = []
    model.depth.layers[0].attn.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


# ---- the halting rule ------------------------------------------------------------------------


def test_halting_weights_sum_to_exactly_one_in_float64():
    g = torch.Generator().manual_seed(0)
    B, L, T = 16, 64, 12
    # p from near 0 to near 1, plus values on the threshold's edge
    ps = torch.rand(T, B, L, generator=g, dtype=torch.float64) ** torch.linspace(0.2, 6, L, dtype=torch.float64)
    ps[0, 0, :4] = torch.tensor([0.99, 0.99 - 1e-17, 0.5, 0.495], dtype=torch.float64)
    ps[1, 0, 2:4] = torch.tensor([0.49, 0.495], dtype=torch.float64)
    h = Halting(B, L, threshold=0.99, max_steps=T, dtype=torch.float64, device="cpu")
    total = torch.zeros(B, L, dtype=torch.float64)
    for t in range(T):
        total = total + h.step(ps[t])
    assert not h.running_BL.any()
    assert torch.equal(total, torch.ones_like(total))  # exactly, not approximately
    assert int(h.steps_BL.max()) <= T and int(h.steps_BL.min()) >= 1
    assert h.steps_BL.unique().numel() > 3  # the test covers many halting steps


def test_ponder_cost_by_hand():
    # Three positions, threshold 0.99, at most 3 steps:
    #  p = .3 .5 .4   -> halts at step 3 (0.8 + 0.4 >= 0.99), R = 1 - 0.8 = 0.2, rho = 3.2
    #  p = .995       -> halts at step 1, R = 1, rho = 2
    #  p = .1 .1 .1   -> forced halt at step 3, R = 1 - 0.2 = 0.8, rho = 3.8
    ps = torch.tensor([[[0.3, 0.995, 0.1]], [[0.5, 0.7, 0.1]], [[0.4, 0.7, 0.1]]], dtype=torch.float64)
    h = Halting(1, 3, threshold=0.99, max_steps=3, dtype=torch.float64, device="cpu")
    weights = [h.step(ps[t]) for t in range(3)]
    torch.testing.assert_close(h.ponder_BL, torch.tensor([[3.2, 2.0, 3.8]], dtype=torch.float64), rtol=0, atol=1e-12)
    assert h.steps_BL.tolist() == [[3, 1, 3]]
    torch.testing.assert_close(torch.stack(weights)[:, 0], torch.tensor(
        [[0.3, 1.0, 0.1], [0.5, 0.0, 0.1], [0.2, 0.0, 0.8]], dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("p, steps, ponder", [(0.3, 4, 4.1), (0.6, 2, 2.4), (0.05, 8, 8.65)])
def test_ponder_loss_of_the_model_by_hand(p, steps, ponder):
    """A halting unit with constant p: 0.3 halts at step 4 (0.9 + 0.3 >= 0.99) with R = 0.1;
    0.6 at step 2 with R = 0.4; 0.05 runs out of steps at 8 with R = 1 - 7 * 0.05."""
    model = constant_halting(make("act", "model.depth.max_steps=8", "model.depth.ponder_cost=0.01"), p)
    out = model(torch.randint(0, V, (2, 20)))
    assert (out.aux.tokens["act_steps"] == steps).all()
    torch.testing.assert_close(out.aux.tokens["ponder"], torch.full((2, 20), ponder, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    assert float(out.aux.losses["ponder"].detach()) == pytest.approx(0.01 * ponder, abs=1e-13)
    assert float(out.aux.stats["ponder/mean"]) == pytest.approx(ponder) == float(out.aux.stats["ponder/max"])


def test_weights_sum_to_one_through_the_model():
    """With an identity block (zero residual branches) and no signals every state equals the
    input, so the output is (sum of weights) x input."""
    model = spread_halting(make("act", "model.depth.timestep_signal=false", "model.depth.position_signal=false",
                                "model.depth.max_steps=6", position="rope"))
    with torch.no_grad():
        for layer in model.depth.layers:
            for lin in (layer.attn.proj, layer.ffn.down):
                lin.weight.zero_()
                lin.bias.zero_()
    x = torch.randn(3, 30, 32, dtype=torch.float64)
    ctx = Context(pos_L=torch.arange(30), position=model.position, aux=Aux())
    y = model.depth(x, ctx)
    assert ctx.aux.tokens["act_steps"].unique().numel() > 1
    torch.testing.assert_close(y, x, rtol=1e-14, atol=0)


def test_max_steps_one_is_one_application_of_the_block():
    act = make("act", "model.depth.max_steps=1")
    x = torch.randint(0, V, (2, 24))
    got = act(x).logits_BLV
    # By hand: embeddings, the step-1 signals, the block once, the final norm and head.
    d = act.depth
    ctx = Context(pos_L=torch.arange(24), position=act.position, aux=Aux(), step=1)
    h = d.residual.run(d.layers, d.step_input(act.position.embed(act.embed(x), ctx.pos_L), 1, ctx), ctx)
    assert torch.equal(got, act.head(act.norm(h)))
    # ... which is a one-step Universal Transformer with the same block.
    ut = make("universal", "model.depth.steps=1")
    ut.load_state_dict({k: v for k, v in act.state_dict().items() if ".halt" not in k})
    assert torch.equal(got, ut(x).logits_BLV)


def test_a_halting_bias_that_forces_a_halt_gives_one_step():
    model = make("act", "model.depth.max_steps=8")
    with torch.no_grad():
        model.depth.halt.bias.fill_(20.0)  # p ~ 1 >= 1 - eps at once
    calls = count_block_applications(model)
    out = model(torch.randint(0, V, (2, 30)))
    assert (out.aux.tokens["act_steps"] == 1).all()
    assert len(calls) == 1  # the block ran once
    torch.testing.assert_close(out.aux.tokens["ponder"], torch.full((2, 30), 2.0, dtype=torch.float64))


@pytest.mark.parametrize("bias", [-20.0, 0.0, 1.0])
def test_no_position_exceeds_max_steps(bias):
    model = make("act", "model.depth.max_steps=5")
    with torch.no_grad():
        model.depth.halt.bias.fill_(bias)
    out = model(torch.randint(0, V, (3, 40)))
    steps = out.aux.tokens["act_steps"]
    assert int(steps.max()) <= 5 and int(steps.min()) >= 1
    assert float(out.aux.tokens["ponder"].max()) <= 6.0
    if bias == -20.0:
        assert (steps == 5).all()


def test_gradients_reach_the_halting_unit():
    model = spread_halting(make("act", "model.depth.max_steps=6")).train()
    x = torch.randint(0, V, (2, 30))
    out = model(x)
    lm = F.cross_entropy(out.logits_BLV.flatten(0, 1), x.roll(-1, 1).flatten())
    # through the output weights (LM loss alone) ...
    lm.backward(retain_graph=True)
    g_lm = model.depth.halt.weight.grad.clone()
    assert g_lm.abs().sum() > 0 and model.depth.halt.bias.grad.abs() > 0
    # ... and through the remainder of the ponder cost alone
    model.zero_grad()
    out.aux.losses["ponder"].backward()
    assert model.depth.halt.weight.grad.abs().sum() > 0 and model.depth.halt.bias.grad.abs() > 0
    assert torch.isfinite(g_lm).all()


# ---- compute only what runs ------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["softmax", "adaptive_span"])
@pytest.mark.parametrize("position", ["alibi", "rope"])
def test_skipping_halted_positions_changes_nothing(attention, position):
    """skip_halted computes the running positions only; outputs and gradients equal computing
    every position and keeping the running ones (f64)."""
    results = []
    for skip in (True, False):
        model = spread_halting(make("act", f"model.depth.skip_halted={skip}", "model.depth.max_steps=6",
                                    f"model.attention.kind={attention}", position=position)).train()
        x = torch.randint(0, V, (3, 40), generator=torch.Generator().manual_seed(3))
        out = model(x)
        loss = F.cross_entropy(out.logits_BLV.flatten(0, 1), x.roll(-1, 1).flatten()) + out.aux.total_loss()
        loss.backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a.logits_BLV, b.logits_BLV, rtol=1e-10, atol=1e-10)
    assert torch.equal(a.aux.tokens["act_steps"], b.aux.tokens["act_steps"])
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-9, atol=1e-10, msg=name)
    assert float(a.aux.stats["act/computed_fraction"]) < float(b.aux.stats["act/computed_fraction"])
    # the loop stopped when the last position halted
    assert float(b.aux.stats["act/computed_fraction"]) == pytest.approx(
        int(a.aux.tokens["act_steps"].max()) / 6)


def test_query_subset_uses_the_softmax_rows_path():
    model = spread_halting(make("act", "model.depth.max_steps=6"))
    model(torch.randint(0, V, (2, 40)))
    counts = model.depth.layers[0].attn.kernel.path_counts
    assert counts["sdpa"] >= 2  # steps after the first ran with a subset of queries


# ---- decoder properties with every position scheme -------------------------------------------


def shared_block_model(depth: str, position: str):
    """3 steps of a universal block, or ACT up to 5 steps with positions halting at different steps."""
    model = make(depth, "model.depth.steps=3" if depth == "universal" else "model.depth.max_steps=5",
                 position=position)
    return spread_halting(model) if depth == "act" else model


@pytest.mark.parametrize("depth", ["universal", "act"])
@pytest.mark.parametrize("position", POSITION_KINDS)
def test_causality(depth, position):
    a, b = assert_causal(shared_block_model(depth, position), t=23)
    if depth == "act":  # the halting of positions up to t does not depend on later tokens either
        assert torch.equal(a.aux.tokens["act_steps"][:, :24], b.aux.tokens["act_steps"][:, :24])


@pytest.mark.parametrize("depth", ["universal", "act"])
@pytest.mark.parametrize("position", POSITION_KINDS)
def test_kv_cache_and_batching(depth, position):
    model = shared_block_model(depth, position)
    x = torch.randint(0, V, (3, 33))
    batched = assert_batch_equals_one_by_one(model, x)
    # Incremental decoding: halted positions' keys and values are reused at later steps.
    cache = KVCache()
    parts = [model(x[:1, :6], cache=cache).logits_BLV]
    parts += [model(x[:1, i: i + 1], cache=cache).logits_BLV for i in range(6, 33)]
    torch.testing.assert_close(torch.cat(parts, 1), batched[:1], rtol=1e-10, atol=1e-10)
    prompt = x[:2, :5]
    assert torch.equal(generate(model, prompt, 10, temperature=0.0, use_cache=True),
                       generate(model, prompt, 10, temperature=0.0, use_cache=False))


def test_generate_reports_steps_of_each_new_token():
    model = spread_halting(make("act", "model.depth.max_steps=5"))
    stats: list = []
    seq = generate(model, torch.randint(0, V, (2, 4)), 6, temperature=0.0, token_stats=stats)
    assert len(stats) == 6 and all(s["act_steps"].shape == (2,) for s in stats)
    # the steps of the position that predicted each new token
    full = model(seq[:, :-1]).aux.tokens["act_steps"][:, 3:]
    assert torch.equal(torch.stack([s["act_steps"] for s in stats], 1), full)


# ---- config, init, FLOPs ---------------------------------------------------------------------


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"model.depth.steps: unknown key"):
        load_config(CONFIGS / "debug.yaml", ["model.depth.kind=act", "model.depth.steps=3"])
    with pytest.raises(ConfigError, match=r"model.depth.max_steps: must be at least 1"):
        load_config(CONFIGS / "debug.yaml", ["model.depth.kind=act", "model.depth.max_steps=0"])
    with pytest.raises(ConfigError, match=r"model.depth.eps: must be in \(0, 1\)"):
        load_config(CONFIGS / "debug.yaml", ["model.depth.kind=act", "model.depth.eps=1.5"])
    with pytest.raises(ConfigError, match=r"model.depth.ponder_cost"):
        load_config(CONFIGS / "debug.yaml", ["model.depth.kind=act", "model.depth.ponder_cost=-1"])
    with pytest.raises(ConfigError, match=r"model.depth.steps: must be at least 1"):
        load_config(CONFIGS / "debug.yaml", ["model.depth.kind=universal", "model.depth.steps=0"])


def test_shared_block_parameters_init_and_flops():
    from lmtrain.model.flops import training_flops_per_token

    fixed = make("fixed", "model.n_layers=2")
    ut = make("universal", "model.depth.steps=3")
    act = make("act", "model.depth.max_steps=3")
    n_fixed = sum(p.numel() for p in fixed.parameters())
    assert sum(p.numel() for p in ut.parameters()) == n_fixed  # the same two layers, shared
    assert sum(p.numel() for p in act.parameters()) == n_fixed + 2 * 32 + 32 + 1  # halting norm + unit
    assert float(act.depth.halt.bias.detach()) == 1.0
    # residual projections are scaled for 2 layers x 3 steps
    std = float(ut.depth.layers[0].ffn.down.weight.detach().std())
    assert std == pytest.approx(0.02 / math.sqrt(2 * 6), rel=0.15)
    block = sum(p.numel() for p in ut.depth.layers.parameters())
    assert training_flops_per_token(ut, 48) == pytest.approx(
        training_flops_per_token(fixed, 48) + 6 * 2 * block + 12 * 4 * 32 * 48)



def test_the_preset_and_its_control_differ_only_in_depth():
    from lmtrain.config import to_dict

    act = to_dict(load_config(CONFIGS / "experiments" / "act.yaml"))
    ctl = to_dict(load_config(CONFIGS / "experiments" / "act_all_steps.yaml"))
    assert act["model"]["depth"]["kind"] == "act" and ctl["model"]["depth"]["kind"] == "universal"
    assert ctl["model"]["depth"]["steps"] == act["model"]["depth"]["max_steps"]
    for cfg in (act, ctl):
        cfg["model"].pop("depth")
        cfg["run"].pop("name")
    assert act == ctl


def test_a_shared_adaptive_span_layer_counts_its_span_loss_once():
    fixed = make("fixed", "model.attention.kind=adaptive_span", "model.attention.init_span=16").train()
    act = make("act", "model.attention.kind=adaptive_span", "model.attention.init_span=16",
               "model.depth.halting_bias_init=-20").train()  # every position runs all 8 steps
    x = torch.randint(0, V, (1, 20))
    assert float(act(x).aux.losses["span"].detach()) == pytest.approx(float(fixed(x).aux.losses["span"].detach()))


def test_show_ponder_is_kept_as_an_alias():
    from lmtrain.cli import build_parser

    for flag in ("--show-token-stats", "--show-ponder"):
        assert build_parser().parse_args(["generate", "RUN", flag]).show_token_stats is True
