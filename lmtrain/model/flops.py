"""Model FLOPs per token, for throughput and MFU.

Training FLOPs per token = 6 * N_matmul + 12 * n_layers * d_model * L   (Kaplan et al. 2020;
PaLM appendix B). N_matmul counts the parameters that take part in matrix multiplies:
all parameters except embedding lookups, plus the LM head even when it is tied to the
input embedding. The attention term is the kernel's own (`AttentionKernel.attention_flops`):
for softmax it counts the full L x L score and value products, as PaLM does, although a
causal kernel may skip half of them; kernelized kinds count their feature maps, chunks and
carried state instead, which do not grow with L. Early exit's trained intermediate exits
each add one LM head (`Depth.extra_readouts`).
"""

from __future__ import annotations

from torch import nn


def matmul_params(model: nn.Module) -> int:
    seen, n = set(), 0
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for p in model.parameters():
        if id(p) not in seen and id(p) not in lookups:
            n += p.numel()
        seen.add(id(p))
    head = getattr(model, "head", None)
    if head is not None and id(head.weight) in lookups:  # tied head: still a matmul
        n += head.weight.numel()
    return n


def training_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """A shared block applied T times (Universal Transformer) counts T times. For ACT that is
    the all-steps model's count, so its MFU reads as speed relative to running every step."""
    from lmtrain.model.depth import DEPTH

    cfg = model.cfg
    applications = DEPTH.get(cfg.depth.kind).layer_applications(cfg)
    layers = getattr(model, "depth", None)
    block = sum(p.numel() for p in layers.layers.parameters()) if layers is not None else 0
    repeats = applications // cfg.n_layers - 1  # further applications of the same layer weights
    from lmtrain.model.attention import ATTENTION

    attention = ATTENTION.get(cfg.attention.kind).attention_flops(cfg, seq_len)
    head = getattr(model, "head", None)
    readouts = DEPTH.get(cfg.depth.kind).extra_readouts(cfg) * (head.weight.numel() if head is not None else 0)
    return 6.0 * (matmul_params(model) + repeats * block + readouts) + applications * attention
