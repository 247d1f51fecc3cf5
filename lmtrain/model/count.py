"""Parameter counts from a config alone (no model is built): what `lmtrain plan` reports for
a 70B model in a millisecond. Each variant declares its own parameters (`own_parameters`);
a test checks the count against the built model on every pairwise combination of kinds."""

from __future__ import annotations

from lmtrain.model.axes import Assembly


def norm_parameters(model_cfg) -> int:
    """One norm of the model's kind: LayerNorm has a weight (and a bias), RMSNorm a weight."""
    d = model_cfg.d_model
    return d * (2 if model_cfg.norm == "layernorm" and model_cfg.bias else 1)


def layer_parameters(a: Assembly) -> int:
    """One decoder layer: two norms, the q/k/v (q/v for shared query-key kernels) and output
    projections, the kernel's own, the feed-forward."""
    m = a.model
    d = m.d_model
    projections = 3 if a.attention.shared_qk else 4  # q, (k,) v and the output
    attention = projections * d * (d + (1 if m.bias else 0)) + a.attention.own_parameters(a)
    return 2 * norm_parameters(m) + attention + a.ffn.own_parameters(a)


def parameter_count(model_cfg, *, vocab_size: int, seq_len: int) -> int:
    """Parameters of the decoder a config describes (tied weights counted once)."""
    a = Assembly.of(model_cfg, seq_len)
    m = model_cfg
    embeddings = vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
    return (embeddings + a.position.own_parameters(a) + m.n_layers * layer_parameters(a)
            + a.depth.own_parameters(a) + a.residual.own_parameters(a) + norm_parameters(m))
