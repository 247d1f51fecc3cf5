"""Two-stream reversible residual wiring (lmtrain/model/reversible.py): exact gradients,
replayed randomness, no activations kept, refusals. Training equal to plain autograd and the
memory benchmark are in tests/integration/test_reversible.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmtrain.config import ConfigError, load_config
from lmtrain.generate import generate
from lmtrain.model import build_model
from lmtrain.model.layer import Context
from lmtrain.model.outputs import Aux
from lmtrain.model.reversible import reconstruction_error
from tests.helpers import CONFIGS, assert_causal, saved_bytes

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
    if attention == "adaptive_span":  # the span loss reaches z (the decoder adds it outside the stack)
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
    with pytest.raises(ConfigError, match=r"model.residual.kind=reversible runs each layer once.*depth.kind=act"):
        load_config(CONFIGS / "debug.yaml", ["model.residual=reversible", "model.depth.kind=act"])
    with pytest.raises(ConfigError, match=r"model.residual.kind=reversible: .*ZeRO-3.*zero_stage 1 or 2"):
        load_config(CONFIGS / "debug.yaml", ["model.residual=reversible", "trainer.strategy=deepspeed",
                                             "deepspeed.zero_stage=3"])


def test_refuses_kinds_without_deterministic_recompute(monkeypatch):
    import dataclasses

    from lmtrain.model.attention import ATTENTION

    softmax = ATTENTION.get("softmax")
    monkeypatch.setattr(softmax, "caps", dataclasses.replace(softmax.caps, deterministic_recompute=False))
    with pytest.raises(ConfigError, match="does not recompute deterministically"):
        load_config(CONFIGS / "debug.yaml", ["model.residual=reversible"])


