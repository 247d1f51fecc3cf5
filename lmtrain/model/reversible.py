"""Two-stream reversible residual wiring (RevNet, Gomez et al. 2017; Reformer, Kitaev et al. 2020).

The stream is duplicated into x1 = x2 = x (as Reformer does, so every layer keeps the full
width), each layer couples the two with its attention sublayer F and feed-forward sublayer G,

    y1 = x1 + F(x2)          inverse:  x2 = y2 - G(y1)
    y2 = x2 + G(y1)                    x1 = y1 - F(x2)

and the stack's output is the mean (y1 + y2) / 2, which goes to the final norm.

  * two_stream - the coupling under plain autograd: every layer's activations are kept.
                 The reference the reversible wiring is tested and benchmarked against.
  * reversible - the same function through `ReversibleLayer` autograd functions, which
                 keep only the last layer's outputs. Backward walks the layers in reverse:
                 it rebuilds each layer's inputs from its outputs, recomputes F and G with a
                 graph for that one layer, and takes the gradients of the inputs and of the
                 layer's parameters. Activation memory is one layer's, whatever the depth,
                 for one extra forward of F and G per layer.

Randomness replays exactly: the RNG state before each F and each G is saved in the
forward and restored for its recomputation (dropout masks are the same). Discrete
decisions of the attention kernel (LSH's buckets) are kept in the forward and replayed:
a rebuilt input that differs in the last bit could otherwise flip one. Attention kinds
must declare `caps.deterministic_recompute`. The stack's forward runs without a graph, so
losses must not come from it: parameter losses (the span loss) are added by the decoder,
outside the stack (lmtrain/model/hooks.py).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from lmtrain.model.attention import kept_decisions
from lmtrain.model.outputs import Aux
from lmtrain.model.residual import RESIDUAL, Residual


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class _replay:
    """Run a block with the RNG as it was (CPU and, for CUDA tensors, the device's), leaving
    the caller's RNG stream untouched."""

    def __init__(self, state, device: torch.device):
        self.state, self.device = state, device

    def __enter__(self):
        devices = [self.device] if self.device.type == "cuda" else []
        self.fork = torch.random.fork_rng(devices=devices)
        self.fork.__enter__()
        cpu, cuda = self.state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)

    def __exit__(self, *exc):
        return self.fork.__exit__(*exc)


class _Stash:
    """The one pair of activations a reversible stack keeps: the last layer's outputs after
    the forward pass, then, in backward, the inputs each layer rebuilds for the one below."""

    outputs: tuple[Tensor, Tensor] | None = None


class ReversibleLayer(torch.autograd.Function):
    """(x1, x2) -> (y1, y2) through one layer, keeping no activations (see the module doc).
    One function per layer, so each layer's parameter gradients reach autograd (and any
    gradient hooks, such as DeepSpeed's) as soon as that layer's backward is done. `params`
    are the layer's parameters, passed so that autograd returns their gradients."""

    @staticmethod
    def forward(fctx, x1, x2, layer, ctx, stash, last, *params):
        decisions: dict = {}  # discrete choices of F's kernel (LSH buckets), replayed in backward
        with torch.no_grad():
            s_f = _rng_state(x1.device)
            with kept_decisions(decisions, replay=False):
                y1 = x1 + layer.f(x2, ctx)
            s_g = _rng_state(x1.device)
            y2 = x2 + layer.g(y1, ctx)
        if last:
            stash.outputs = (y1.detach(), y2.detach())
        fctx.layer, fctx.ctx, fctx.stash, fctx.states, fctx.params_order = layer, ctx, stash, (s_f, s_g), params
        fctx.decisions = decisions
        return y1, y2

    @staticmethod
    def backward(fctx, g1, g2):
        layer, ctx, (s_f, s_g) = fctx.layer, fctx.ctx, fctx.states
        y1, y2 = fctx.stash.outputs
        f_params, g_params = layer.f_parameters(), layer.g_parameters()
        with torch.enable_grad():
            y1_req = y1.detach().requires_grad_(True)
            with _replay(s_g, y1.device):
                gy = layer.g(y1_req, ctx)
            d_y1, *d_g = torch.autograd.grad(gy, (y1_req, *g_params), g2, allow_unused=True)
        g_y1 = g1 + d_y1  # y1 reaches the loss directly and through y2 = x2 + G(y1)
        x2 = (y2 - gy).detach()
        with torch.enable_grad():
            x2_req = x2.requires_grad_(True)
            with _replay(s_f, x2.device), kept_decisions(fctx.decisions, replay=True):
                fx = layer.f(x2_req, ctx)
            d_x2, *d_f = torch.autograd.grad(fx, (x2_req, *f_params), g_y1, allow_unused=True)
        fctx.stash.outputs = ((y1 - fx).detach(), x2)  # this layer's inputs: the outputs of the one below
        grads = dict(zip(map(id, (*g_params, *f_params)), (*d_g, *d_f)))
        return (g_y1, g2 + d_x2, None, None, None, None, *(grads.get(id(p)) for p in fctx.params_order))


@RESIDUAL.register("two_stream")
class TwoStream(Residual):
    """The RevNet coupling under plain autograd (activations kept)."""

    def run(self, layers, x_BLM, ctx):
        x1, x2 = self.couple(layers, x_BLM, x_BLM, ctx)
        return (x1 + x2) / 2

    @staticmethod
    def couple(layers, x1, x2, ctx):
        for layer in layers:
            x1 = x1 + layer.f(x2, ctx)
            x2 = x2 + layer.g(x1, ctx)
        return x1, x2

    @classmethod
    def check(cls, a) -> list[str]:
        m, reasons = a.model, []
        name = m.residual.kind
        if not a.depth.runs_layers_once:
            reasons.append(f"model.residual.kind={name} runs each layer once, in order, for every position; "
                           f"model.depth.kind={m.depth.kind} repeats layers or lets positions skip them, and needs "
                           "a wiring such as prenorm")
        if not a.attention.caps.deterministic_recompute:
            reasons.append(f"model.residual.kind={name}: model.attention.kind={m.attention.kind} does not recompute "
                           "deterministically, so the layer inputs cannot be rebuilt exactly; use "
                           "model.residual.kind=prenorm")
        return reasons


@RESIDUAL.register("reversible")
class Reversible(TwoStream):
    """The RevNet coupling with activations rebuilt in backward (`ReversibleLayer`)."""

    needs_whole_parameters = True
    splits_sequence = False

    def run(self, layers, x_BLM, ctx):
        trainable = any(p.requires_grad for layer in layers for p in layer.parameters())
        if not (torch.is_grad_enabled() and (x_BLM.requires_grad or trainable)):
            return super().run(layers, x_BLM, ctx)  # no backward to save memory for (eval, generation)
        inner = replace(ctx, aux=Aux())  # the layers' forward has no graph: only statistics leave it
        stash = _Stash()
        x1 = x2 = x_BLM
        for i, layer in enumerate(layers):
            params = [p for p in layer.parameters() if p.requires_grad]
            x1, x2 = ReversibleLayer.apply(x1, x2, layer, inner, stash, i == len(layers) - 1, *params)
        ctx.aux.stats.update(inner.aux.stats)
        ctx.aux.tokens.update(inner.aux.tokens)
        return (x1 + x2) / 2


@torch.no_grad()
def reconstruction_error(layers, x_BLM: Tensor, ctx) -> float:
    """The largest error of the layer inputs that the backward pass rebuilds from the outputs,
    relative to the inputs' largest magnitude, over all layers (eval mode: no dropout)."""
    x1, x2, inputs = x_BLM, x_BLM, []
    for layer in layers:
        inputs.append((x1, x2))
        x1 = x1 + layer.f(x2, ctx)
        x2 = x2 + layer.g(x1, ctx)
    worst = 0.0
    for layer, (a1, a2) in zip(reversed(layers), reversed(inputs)):
        x2 = x2 - layer.g(x1, ctx)
        x1 = x1 - layer.f(x2, ctx)
        scale = max(float(a1.abs().max()), float(a2.abs().max()), 1e-30)
        worst = max(worst, float((x1 - a1).abs().max()) / scale, float((x2 - a2).abs().max()) / scale)
    return worst
