"""The language-model loss, optionally without full B x L x V float32 logits.

`lm_loss` is cross-entropy over logits the model returned, in float32 at least.

`chunked_lm_loss` fuses the LM head with the loss: for chunks of `chunk` tokens it computes
the logits (float32 at least), their log-sum-exp and the loss, and at once the gradient of the
mean loss with respect to the logits, `(softmax - onehot) / N`. That chunk's gradients for the
hidden states and the head weight follow, and the logits are dropped. Backward then only
scales the stored gradients by the incoming one. Peak memory for the logits is one chunk,
`chunk x V` floats, instead of `N x V` (plus as much again for their gradient): 16 x 4096 x
50k tokens of logits are 13 GB in float32. Compute is the three matmuls of the plain path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# exp(50) = 5e21: a perplexity beyond any meaning, but finite (valid JSON, plottable), which a
# diverged run's loss would not give.
MAX_LOG_PERPLEXITY = 50.0


def perplexity(loss):
    """exp(loss) of a mean cross-entropy in nats, a float or a tensor, capped at exp(50)."""
    if isinstance(loss, Tensor):
        return torch.exp(loss.clamp(max=MAX_LOG_PERPLEXITY))
    return math.exp(min(loss, MAX_LOG_PERPLEXITY))


def lm_loss(logits_BLV: Tensor, targets_BL: Tensor) -> Tensor:
    """Cross-entropy in float32 at least (bf16 logits are upcast; float64 stays float64)."""
    logits_BLV = logits_BLV.to(torch.promote_types(logits_BLV.dtype, torch.float32))
    return F.cross_entropy(logits_BLV.flatten(0, 1), targets_BL.flatten())


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_NM: Tensor, w_VM: Tensor, y_N: Tensor, chunk: int) -> Tensor:
        acc = torch.promote_types(h_NM.dtype, torch.float32)
        N = h_NM.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h_NM) if need_h else None
        grad_w = torch.zeros(w_VM.shape, dtype=acc, device=w_VM.device) if need_w else None
        total = torch.zeros((), dtype=acc, device=h_NM.device)
        w = w_VM.to(acc)
        for start in range(0, N, chunk):
            h = h_NM[start : start + chunk].to(acc)
            y = y_N[start : start + chunk]
            logits = h @ w.T  # n V
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                # d(mean loss) / d logits = (softmax - onehot) / N, in place of the logits
                g = logits.sub_(lse[:, None]).exp_()
                g.scatter_add_(1, y[:, None], torch.full_like(lse[:, None], -1.0))
                g.div_(N)
                if need_h:
                    grad_h[start : start + chunk] = (g @ w).to(h_NM.dtype)
                if need_w:
                    grad_w.addmm_(g.T, h)
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.has = (need_h, need_w)
        ctx.h_dtype, ctx.w_dtype = h_NM.dtype, w_VM.dtype
        return total / N

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.has
        grad_h = (saved.pop(0) * grad_out).to(ctx.h_dtype) if need_h else None
        grad_w = (saved.pop(0) * grad_out).to(ctx.w_dtype) if need_w else None
        return grad_h, grad_w, None, None


def chunked_lm_loss(h_BLM: Tensor, w_VM: Tensor, targets_BL: Tensor, chunk: int) -> Tensor:
    """Mean cross-entropy of `h @ w.T` against the targets, `chunk` tokens at a time."""
    return _ChunkedLinearCrossEntropy.apply(h_BLM.flatten(0, 1), w_VM, targets_BL.flatten(), chunk)


def loss_chunk(chunk_tokens: int, tokens: int, vocab: int, budget_mb: int = 64) -> int:
    """Tokens per loss chunk: `chunk_tokens` if positive; 0 never chunks; -1 (auto) chunks only
    when the full float32 logits would exceed `budget_mb`, so that a chunk fits it."""
    if chunk_tokens >= 0:
        return chunk_tokens
    full = tokens * vocab * 4
    if full <= budget_mb << 20:
        return 0
    return max(1, (budget_mb << 20) // (vocab * 4))
