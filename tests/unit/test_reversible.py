"""Two-stream reversible residual wiring (lmtrain/model/reversible.py): exact gradients,
replayed randomness, no activations kept, training equal to plain autograd."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lmtrain.config import ConfigError, load_config
from lmtrain.generate import generate
from lmtrain.model import build_model
from lmtrain.model.layer import Context
from lmtrain.model.outputs import Aux
from lmtrain.model.reversible import reconstruction_error
from tests.conftest import CONFIGS, run_cli, saved_bytes, train_and_signal
from tests.test_model import assert_causal

V = 97


def make(residual: str, *extra: str, dtype=torch.float64, layers: int = 3, seed: int = 0):
    cfg = load_config(CONFIGS / "debug.yaml", [
        f"model.residual={residual}", f"model.n_layers={layers}", "model.d_model=32", "model.n_heads=4",
        "model.d_ff=64", "data.vocab_size=257", "data.seq_len=48", "model.dropout=0.1", *extra])
    torch.manual_seed(seed)
    return build_model(cfg).to(dtype).train()


def loss_and_grads(model, x, seed: int = 7):
    torch.manual_seed(seed)  # the same dropout masks for both wirings
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss = F.cross_entropy(out.logits_BLV.flatten(0, 1), x.roll(-1, 1).flatten())
    aux = out.aux.total_loss()
    (loss if aux is None else loss + aux).backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, torch.rand(1)


TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("attention, position", [("softmax", "alibi"), ("softmax", "rope"), ("softmax", "learned"),
                                                 ("adaptive_span", "alibi")])
def test_gradients_equal_plain_autograd(attention, position, dtype):
    """Reversible (inputs rebuilt in backward) against the same two-stream function under plain
    autograd, with dropout on: the same loss, parameter gradients, and RNG stream afterwards."""
    extra = [f"model.attention.kind={attention}", f"model.position={position}"]
    if attention == "adaptive_span":
        extra.append("model.attention.init_span=8")
    x = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(1))
    plain_loss, plain, plain_rng = loss_and_grads(make("two_stream", *extra, dtype=dtype), x)
    rev_loss, rev, rev_rng = loss_and_grads(make("reversible", *extra, dtype=dtype), x)
    assert torch.equal(plain_loss, rev_loss)  # the forward is the same computation
    assert plain.keys() == rev.keys()
    for name in plain:
        assert rev[name] is not None, name
        torch.testing.assert_close(rev[name], plain[name], **TOL[dtype], msg=name)
    assert torch.equal(plain_rng, rev_rng)  # the recomputation did not consume the RNG stream
    if attention == "adaptive_span":  # the span loss reaches z through the re-added loss
        assert rev["depth.layers.0.attn.kernel.span_frac"].abs().sum() > 0


def test_dropout_really_replays(monkeypatch):
    """Without replaying the RNG state the rebuilt inputs would be wrong: the gradients differ
    from the two-stream ones if the replay is disabled."""
    import contextlib

    import lmtrain.model.reversible as rev_mod

    x = torch.randint(0, V, (2, 40))
    _, plain, _ = loss_and_grads(make("two_stream"), x)
    monkeypatch.setattr(rev_mod, "_replay", lambda state, device: contextlib.nullcontext())
    _, broken, _ = loss_and_grads(make("reversible"), x)
    assert not all(torch.allclose(broken[n], plain[n], rtol=1e-6, atol=1e-8) for n in plain)


@pytest.mark.parametrize("dtype, bound", [(torch.float64, 1e-13), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_reconstruction_error_is_bounded(dtype, bound):
    model = make("reversible", dtype=dtype, layers=8).eval()
    x = model.embed(torch.randint(0, V, (2, 40)))
    ctx = Context(pos_L=torch.arange(40), position=model.position, aux=Aux())
    err = reconstruction_error(list(model.depth.layers), x, ctx)
    print(f"reconstruction error ({dtype}, 8 layers): {err:.2e}")
    assert 0 <= err < bound


def _saved_bytes(model, x) -> int:
    return saved_bytes(lambda: model(x).logits_BLV)


def test_activations_kept_do_not_grow_with_depth():
    x = torch.randint(0, V, (2, 40))
    saved = {(r, n): _saved_bytes(make(r, layers=n, dtype=torch.float32), x)
             for r in ("two_stream", "reversible") for n in (2, 8)}
    assert saved["reversible", 8] == saved["reversible", 2]
    assert saved["two_stream", 8] > 3 * saved["two_stream", 2] - 2 * saved["reversible", 2]


def test_inference_causality_and_cached_generation():
    model = make("reversible", "model.dropout=0.0").eval()
    assert_causal(model)
    prompt = torch.randint(0, V, (2, 5))
    assert torch.equal(generate(model, prompt, 8, temperature=0.0, use_cache=True),
                       generate(model, prompt, 8, temperature=0.0, use_cache=False))


def test_unsupported_combinations_are_refused():
    with pytest.raises(ConfigError, match=r"model.residual=reversible runs a fixed stack"):
        load_config(CONFIGS / "debug.yaml", ["model.residual=reversible", "model.depth.kind=act"])
    with pytest.raises(ConfigError, match=r"model.residual=reversible: .*ZeRO-3.*zero_stage 1 or 2"):
        load_config(CONFIGS / "debug.yaml", ["model.residual=reversible", "trainer.strategy=deepspeed",
                                             "deepspeed.zero_stage=3"])


def test_refuses_kinds_without_deterministic_recompute(monkeypatch):
    from lmtrain.model.attention import ATTENTION

    monkeypatch.setattr(ATTENTION.get("softmax"), "deterministic_recompute", False)
    with pytest.raises(ConfigError, match="does not recompute deterministically"):
        load_config(CONFIGS / "debug.yaml", ["model.residual=reversible"])


def test_100_steps_equal_plain_autograd_with_a_resume(tiny_data, tmp_path):
    """Per-step training losses of the reversible model equal those of the two-stream model
    under plain autograd (relative 1e-5); a reversible run stopped mid-way and resumed gives
    the uninterrupted run's losses exactly.

    In float64. In float32 the rebuilt inputs differ from the kept ones in the last bits
    (about 2e-7 relative), and Adam turns last-bit differences of near-zero gradients into
    full-size updates, so two float32 runs that differ in summation order part after a few
    steps whatever the wiring (here after 7 steps at 1e-5)."""
    from lmtrain.train.callbacks.metrics_file import read_metrics

    args = [str(CONFIGS / "debug.yaml"), *tiny_data, "model.n_layers=4", "model.d_model=64", "model.n_heads=4",
            "model.d_ff=128", "model.dropout=0.1", "trainer.precision=64-true", "data.seq_len=64", "data.batch_size=4", "trainer.max_steps=100",
            "trainer.val_every_n_steps=50", "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=10",
            f"run.root={tmp_path}"]
    run_cli("train", *args, "model.residual=two_stream", "run.name=plain", check=True)
    run_cli("train", *args, "model.residual=reversible", "run.name=rev", check=True)
    plain, rev = read_metrics(tmp_path / "plain" / "metrics.jsonl"), read_metrics(tmp_path / "rev" / "metrics.jsonl")
    assert sorted(plain) == sorted(rev) == list(range(1, 101))
    worst = max(abs(rev[s] - plain[s]) / abs(plain[s]) for s in plain)
    print(f"largest relative difference of the per-step losses over 100 steps: {worst:.2e}")
    assert worst <= 1e-5
    # Stopped by SIGUSR1 mid-run and resumed: the same losses as the uninterrupted run, bit for
    # bit (in float32, the training default).
    f32 = [*args, "model.residual=reversible", "trainer.precision=32-true"]
    run_cli("train", *f32, "run.name=rev32", check=True)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    code, out = train_and_signal([*f32, "run.name=cut"], metrics, after_step=20)
    assert code == 0, out[-2000:]
    assert max(read_metrics(metrics)) < 100, "the signal came too late to test a resume"
    run_cli("train", *f32, "run.name=cut", check=True)
    cut, whole = read_metrics(metrics), read_metrics(tmp_path / "rev32" / "metrics.jsonl")
    assert [cut[s] for s in range(1, 101)] == [whole[s] for s in range(1, 101)]
    assert plain[100] < plain[1] - 0.5  # it trains


def test_bench_memory_runs_each_case_in_its_own_process(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("bench", "memory", "--layers", "1,3", "--length", "64", "--d-model", "32", "--repeats", "1",
                   "--residual", "two_stream,reversible", "--threads", "1", "--rounds", "1", "--out", str(out), check=True)
    assert "| reversible |" in proc.stdout and "reversible step time vs two_stream" in proc.stdout
    results = json.loads(out.read_text())["results"]
    assert {(r["residual"], r["layers"]) for r in results} == {(w, n) for w in ("two_stream", "reversible")
                                                               for n in (1, 3)}
    assert all(r["activation_mb"] is not None and r["time_s"] > 0 for r in results)
    assert run_cli("bench", "memory", "--residual", "fancy").returncode == 2
