"""Early exit (lmtrain/model/early_exit.py): the per-exit objective, halting units, and
per-token exits with state copying, against plain computations in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmtrain.config import ConfigError, load_config
from lmtrain.generate import generate
from lmtrain.model.early_exit import halting_log_q, token_nll
from tests.helpers import CONFIGS, V, make_model

EE = ["model.depth.kind=early_exit", "model.n_layers=4"]


def _batch(B=2, L=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, L), generator=g), torch.randint(0, V, (B, L), generator=g)


def _objective(model, x, y):
    """The training objective as the trainer forms it: lm_weight x LM loss + target losses."""
    h, aux = model.features(x)
    loss = F.cross_entropy(model.head(h).flatten(0, 1), y.flatten())
    extra = model.target_losses(aux, y, 7)
    return aux.lm_weight * loss + sum(extra.values(), torch.zeros((), dtype=loss.dtype)), aux


def test_all_weight_on_the_last_exit_is_the_fixed_depth_model_exactly():
    fixed = make_model("model.n_layers=4", train=True)
    ee = make_model(*EE, "model.depth.weighting=last", train=True)
    assert fixed.state_dict().keys() == ee.state_dict().keys()
    for a, b in zip(fixed.state_dict().values(), ee.state_dict().values()):
        assert torch.equal(a, b)
    x, y = _batch()
    la, _ = _objective(fixed, x, y)
    lb, aux = _objective(ee, x, y)
    assert torch.equal(la, lb) and aux.lm_weight == 1.0
    la.backward()
    lb.backward()
    for (name, pa), pb in zip(fixed.named_parameters(), ee.parameters()):
        assert torch.equal(pa.grad, pb.grad), name


@pytest.mark.parametrize("opts, weights", [
    ([], [0.25, 0.25, 0.25, 0.25]),  # aligned
    (["model.depth.weighting=increasing"], [0.1, 0.2, 0.3, 0.4]),  # CALM: w_n ~ n
    (["model.depth.exits=[2]", "model.depth.exit_weights=[1,3]"], [0.25, 0.75]),
])
def test_the_objective_is_the_weighted_sum_of_every_exits_loss(opts, weights):
    model = make_model(*EE, *opts, train=True)
    x, y = _batch()
    obj, aux = _objective(model, x, y)
    assert aux.exits.weights == pytest.approx(weights)
    # Reference: each exit's logits in full, through the final norm and the head.
    ref = sum(w * F.cross_entropy(model.head(model.norm(h)).flatten(0, 1), y.flatten())
              for w, h in zip(aux.exits.weights, aux.exits.states))
    torch.testing.assert_close(obj, ref, rtol=1e-12, atol=1e-12)
    g = torch.autograd.grad(obj, list(model.parameters()), allow_unused=True, retain_graph=True)
    g_ref = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    for a, b in zip(g, g_ref):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_chunked_readout_equals_full_logits_and_keeps_no_logits():
    model = make_model(*EE, train=True)
    x, y = _batch(L=30)
    h = model.embed(x).requires_grad_()
    ref = F.cross_entropy(model.head(model.norm(h)).flatten(0, 1), y.flatten(), reduction="none").view_as(y)
    for chunk in (1, 7, 60, 0):
        got = token_nll(model.readout, h, y, chunk)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        ga = torch.autograd.grad(got.sum(), h)[0]
        gb = torch.autograd.grad(ref.sum(), h, retain_graph=True)[0]
        torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)
    # The saved activations of a chunked readout hold no B*L x V logits.
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        token_nll(model.readout, h, y, 8)
    assert max(saved) < x.numel() * V


def test_halting_distribution_sums_to_one_and_follows_the_oracle():
    logits = torch.randn(3, 2, 5, dtype=torch.float64)
    q = halting_log_q(logits).exp()
    torch.testing.assert_close(q.sum(0), torch.ones(2, 5, dtype=torch.float64))
    chi = torch.sigmoid(logits)
    torch.testing.assert_close(q[1], chi[1] * (1 - chi[0]))
    torch.testing.assert_close(q[3], (1 - chi).prod(0))
    # Trained on detached states: the halting loss moves the halting units only.
    model = make_model(*EE, "model.depth.halting=true", "model.depth.weighting=last", train=True)
    x, y = _batch()
    h, aux = model.features(x)
    loss = model.target_losses(aux, y, 0)["halting"]
    loss.backward()
    moved = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved and all(n.startswith("depth.halt.") for n in moved)


def _with_exits(measure: str, threshold: float | None = None):
    """A model whose tokens exit at several layers under `measure`: at `threshold`, or by
    default at the median confidence of the exits after the first."""
    model = make_model(*EE, "model.depth.halting=true")
    with torch.no_grad():  # a sharper head and halting units, so that confidences spread
        model.head.weight.mul_(8)
        for unit in model.depth.halt:
            unit.weight.normal_(0, 1.0)
    x = _batch(B=3, L=20)[0]
    if threshold is None:
        with torch.no_grad():
            _, aux = model.features(x)
            ex, d = aux.exits, model.depth
            chi = list(ex.chi_logits) if ex.chi_logits is not None else []
            conf = [d.confidence(measure, ex.states[k], ex.states[k - 1], k, chi, model.readout)[0]
                    for k in range(1, len(ex.states) - 1)]
        threshold = float(torch.cat([c.flatten() for c in conf]).median())
    model.depth.set_exit_policy(measure, threshold)
    return model, x


@pytest.mark.parametrize("measure", ["softmax", "state", "halting"])
def test_per_token_exits_equal_cached_decoding_with_state_propagation(measure):
    model, x = _with_exits(measure)
    with torch.no_grad():
        full = model(x)
        exits = full.aux.tokens["exit_layer"]
        assert 1 < len(exits.unique()), f"{measure}: every token exited at the same layer; the test needs a mix"
        assert float(full.aux.stats["exit/computed_fraction"]) < 1.0
        # Token by token through the KV cache: skipped layers take keys and values from the copied state.
        from lmtrain.model.layer import KVCache

        cache, steps, layers = KVCache(), [], []
        for t in range(x.shape[1]):
            out = model(x[:, t:t + 1], cache=cache)
            steps.append(out.logits_BLV)
            layers.append(out.aux.tokens["exit_layer"])
        torch.testing.assert_close(torch.cat(steps, 1), full.logits_BLV, rtol=1e-10, atol=1e-10)
        assert torch.equal(torch.cat(layers, 1), exits)
        # Rows decide alone: the batch equals its rows one by one, in a full forward and decoded
        # through the cache (where a row's exited token only fills the later layers' cache).
        for b in range(x.shape[0]):
            one = model(x[b:b + 1])
            torch.testing.assert_close(one.logits_BLV, full.logits_BLV[b:b + 1], rtol=1e-10, atol=1e-10)
            assert torch.equal(one.aux.tokens["exit_layer"], exits[b:b + 1])
            cache = KVCache()
            steps = [model(x[b:b + 1, t:t + 1], cache=cache).logits_BLV for t in range(x.shape[1])]
            torch.testing.assert_close(torch.cat(steps, 1), full.logits_BLV[b:b + 1], rtol=1e-10, atol=1e-10)


def test_a_skipped_layer_owes_its_keys_and_values_until_a_query_runs_it():
    """Decoding with exits: a layer a token skips computes nothing at that step; the keys and
    values it owes (from the copied state) are computed, all at once and in position order,
    when a later token runs it. Every position is either cached or owed at every layer."""
    from lmtrain.model.layer import KVCache

    model, x = _with_exits("state")
    n_layers = model.cfg.n_layers
    owed_at_once = 0
    with torch.no_grad():
        cache = KVCache()
        for t in range(x.shape[1]):
            before = {key: len(v) for key, v in cache.pending.items()}
            out = model(x[:1, t:t + 1], cache=cache)
            exit_layer = int(out.aux.tokens["exit_layer"][0, 0])
            for i in range(n_layers):
                key = (0, i)
                cached = cache.entries[key][2].tolist() if key in cache.entries else []
                owed = [int(p) for _, pos in cache.pending.get(key, []) for p in pos]
                assert sorted(cached + owed) == list(range(t + 1)), (t, i)
                assert cached == sorted(cached)
                if i < exit_layer:  # the token ran layer i + 1: nothing is owed there
                    assert not owed
                    owed_at_once = max(owed_at_once, before.get(key, 0))
                else:  # skipped: this position is owed, not computed
                    assert t in owed and t not in cached
    assert owed_at_once > 1, "the test needs a layer that paid several skipped positions at once"


def test_a_softmax_exit_hands_its_logits_to_the_model_output():
    """When every token of a decoding step leaves at a softmax-measured exit, the head is not
    applied again: the output logits are the exit's, the same as the head on the final state."""
    from lmtrain.model.layer import KVCache

    model, x = _with_exits("softmax")
    reused = 0
    with torch.no_grad():
        cache = KVCache()
        for t in range(x.shape[1]):
            out = model(x[:1, t:t + 1], cache=cache)
            if out.aux.logits is not None:
                reused += 1
                assert out.logits_BLV is out.aux.logits
                assert int(out.aux.tokens["exit_layer"][0, 0]) < model.cfg.n_layers
        full = model(x[:1])
    assert reused, "the test needs a step where the token exited"
    assert full.aux.logits is None  # a forward without a cache applies the head as always


def test_train_exits_copies_exited_states_in_training_too():
    """With `train_exits`, a training forward applies the exit policy (the Depth-Adaptive
    paper's training with state copying): an exited token's later exits read its copied state
    and its later layers get no gradient from it; without it, training runs every layer."""
    model, x = _with_exits("softmax")
    model.train()
    with torch.no_grad():
        _, aux = model.features(x)
    assert "exit_layer" not in aux.tokens  # train_exits off: every token runs every layer
    model.depth.cfg.train_exits = True
    _, aux = model.features(x)
    exits = aux.tokens["exit_layer"]
    assert 1 < len(exits.unique())
    states = dict(zip(aux.exits.layers, aux.exits.states))
    for n in aux.exits.layers[:-1]:
        stopped = exits <= n
        torch.testing.assert_close(states[n][stopped], states[aux.exits.layers[-1]][stopped], rtol=0, atol=0)
    # the loss of a token that left at the first exit reaches no layer after it
    first = (exits == aux.exits.layers[0]).nonzero()[0]
    states[aux.exits.layers[-1]][first[0], first[1]].sum().backward()
    later = [p for layer in model.depth.layers[aux.exits.layers[0]:] for p in layer.parameters()]
    assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in later)
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in model.depth.layers[0].parameters())


def test_a_threshold_never_reached_is_plain_generation():
    model, x = _with_exits("softmax", 2.0)  # top-1 minus top-2 never exceeds 1
    plain = make_model(*EE, "model.depth.halting=true")
    plain.load_state_dict(model.state_dict())
    a = generate(model, x[:, :5], 12, temperature=0)
    b = generate(plain, x[:, :5], 12, temperature=0)
    assert torch.equal(a, b)
    # and cached generation with exits equals recomputing the whole sequence each step
    model, x = _with_exits("softmax")
    assert torch.equal(generate(model, x[:, :5], 12, temperature=0),
                       generate(model, x[:, :5], 12, temperature=0, use_cache=False))


def test_exits_state_copying_keeps_an_exited_tokens_state():
    model, x = _with_exits("softmax")
    with torch.no_grad():
        h, aux = model.features(x)
        exits = aux.tokens["exit_layer"]
        states = dict(zip(aux.exits.layers, aux.exits.states))
        for n in aux.exits.layers[:-1]:
            stopped = exits <= n
            # from its exit on, a token's state does not change
            torch.testing.assert_close(states[n][stopped], states[aux.exits.layers[-1]][stopped], rtol=0, atol=0)


@pytest.mark.parametrize("override, words", [
    ("model.residual.kind=reversible", "lets positions skip them, and needs a wiring such as prenorm"),
    ("model.depth.exits=[0]", "layers are numbered 1 to model.n_layers=2"),
    ("model.depth.exits=[1,1]", "names a layer twice"),
    ("model.depth.exit_weights=[1]", "one weight per exit (2"),
    ("model.depth.exit_weights=[1,-1]", "must be 0 or more"),
    ("model.depth.weighting=uniform", "is not one of aligned, increasing, last"),
    ("model.depth.measure=classifier", "calibrate-exit RUN --measure classifier"),
    ("model.depth.measure=halting", "set model.depth.halting=true"),
    ("model.depth.threshold=1.5", "outside [-1, 1]"),
    ("model.depth.halting_oracle=best", "is not one of likelihood, correct"),
])
def test_combinations_that_cannot_work_are_refused_with_the_reason(override, words):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(CONFIGS / "debug.yaml", ["model.depth.kind=early_exit", "model.n_layers=2", override])
    assert words in str(e.value)


def test_flops_count_one_head_per_trained_intermediate_exit():
    from lmtrain.model.flops import training_flops_per_token

    fixed = make_model("model.n_layers=4")
    aligned = make_model(*EE)
    last = make_model(*EE, "model.depth.weighting=last")
    head = fixed.head.weight.numel()
    assert training_flops_per_token(last, 48) == training_flops_per_token(fixed, 48)
    assert training_flops_per_token(aligned, 48) == pytest.approx(training_flops_per_token(fixed, 48) + 6 * 3 * head)


def test_calibration_and_the_bench_draw_prompts_from_disjoint_halves_of_validation():
    from lmtrain.exits import ExitError, exit_prompts

    val = torch.arange(1000)
    cal, test = exit_prompts(val, 7, 10, "calibration"), exit_prompts(val, 5, 10, "test")
    assert cal.shape == (7, 10) and test.shape == (5, 10)
    assert int(cal.max()) < 500 <= int(test.min())  # held out: no calibration token is a test token
    assert len(set(cal.flatten().tolist())) == 70  # the prompts themselves are disjoint
    with pytest.raises(ExitError, match="the test half of the validation split has 500"):
        exit_prompts(val, 51, 10, "test")


def test_only_the_checked_exits_decide_and_cached_decoding_still_equals_a_full_forward():
    from lmtrain.model.layer import KVCache

    model, x = _with_exits("state")
    thr = model.depth.policy.threshold
    with torch.no_grad():
        every = model(x).aux.tokens["exit_layer"]
        assert {1, 2} <= set(every.unique().tolist()), "the test needs tokens leaving at layers 1 and 2"
        model.depth.set_exit_policy("state", thr, checked=[2])
        full = model(x)
        exits = full.aux.tokens["exit_layer"]
        assert set(exits.unique().tolist()) <= {2, 3, 4} and 1 not in exits  # layer 1's check is not made
        assert bool((exits[every == 2] == 2).all())  # a token the check at 2 stops is stopped there still
        cache = KVCache()
        steps = [model(x[:, t:t + 1], cache=cache) for t in range(x.shape[1])]
        torch.testing.assert_close(torch.cat([s.logits_BLV for s in steps], 1), full.logits_BLV, rtol=1e-10,
                                   atol=1e-10)
        assert torch.equal(torch.cat([s.aux.tokens["exit_layer"] for s in steps], 1), exits)
        model.depth.set_exit_policy("state", thr, checked=[])
        assert bool((model(x).aux.tokens["exit_layer"] == 4).all())  # no check: full depth
    with pytest.raises(ValueError, match="exits before the last are at layers"):
        model.depth.set_exit_policy("state", thr, checked=[4])


def test_an_exit_is_checked_only_where_its_check_pays_for_itself(monkeypatch):
    import lmtrain.exits as exits

    model, x = _with_exits("state")
    thr = model.depth.policy.threshold
    with torch.no_grad():
        counts = torch.bincount(model(x).aux.tokens["exit_layer"].flatten(), minlength=5).double()
    n = model.cfg.n_layers
    fired = [k for k in (1, 2, 3) if counts[k] > 0]
    assert len(fired) >= 2, "the test needs tokens leaving at two exits"
    # The rule: exit k stays when exiting(k) x (n - k) >= reaching(k) x cost (in layers).
    for cost in (0.0, 0.3, 1.0, 2.0, float(n)):
        monkeypatch.setattr(exits, "check_cost", lambda model, measure, c=cost: c)
        want = [k for k in fired if counts[k] * (n - k) >= counts[k:].sum() * cost]
        assert exits.select_checked_exits(model, x, "state", thr, batch_size=2) == want, cost
        if cost == 0.0:
            assert want == fired  # a free check keeps every exit where a token leaves
        if cost == float(n):
            assert want == []  # a check dearer than the whole stack is never made
    monkeypatch.undo()
    # What a check costs, in layers: the softmax check reads the LM head, the state check a vector.
    layer = sum(p.numel() for p in model.depth.layers[0].parameters())
    assert exits.check_cost(model, "softmax") == model.head.weight.numel() / layer
    assert exits.check_cost(model, "state") < 0.05
