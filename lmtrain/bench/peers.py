"""Peer implementations of lmtrain's decoder for `lmtrain bench train --vs`: the same
architecture built in code users would pick instead, from the bench extra
(`pip install -e .[bench]`).

  * mpt           - Hugging Face transformers' MPT (`MptForCausalLM`): pre-norm LayerNorm,
                    GELU MLP, ALiBi, tied embeddings, no biases (`no_bias=True`).
  * xtransformers - lucidrains' x-transformers `TransformerWrapper(Decoder(...))` with
                    `alibi_pos_bias`.

Each builder checks that the configuration maps onto the peer and returns
(model, forward(idx) -> logits, version). The bench then checks that the parameter count
equals lmtrain's, so that the same work is timed.
"""

from __future__ import annotations

from typing import Callable


class PeerMismatch(ValueError):
    """The configuration has no exact counterpart in the peer."""


def _common_checks(cfg, peer: str, *, needs_no_bias: bool) -> None:
    m = cfg.model
    problems = []
    if m.attention.kind != "softmax":
        problems.append(f"model.attention.kind={m.attention.kind} (softmax only)")
    if m.position.kind != "alibi":
        problems.append(f"model.position.kind={m.position.kind} (the peers are compared as ALiBi decoders)")
    if m.residual.kind != "prenorm" or m.depth.kind != "fixed":
        problems.append("model.residual.kind=prenorm and model.depth.kind=fixed only")
    if m.ffn.kind != "mlp" or m.ffn.activation != "gelu":
        problems.append("model.ffn.kind=mlp with activation gelu only")
    if m.norm != "layernorm":
        problems.append(f"model.norm={m.norm} (layernorm only)")
    if not m.tie_embeddings:
        problems.append("model.tie_embeddings=false (both peers tie them)")
    if needs_no_bias and m.bias:
        problems.append("model.bias=true (set model.bias=false: the peer's linear layers have no biases)")
    if m.d_ff % m.d_model:
        problems.append(f"model.d_ff={m.d_ff} must be a multiple of d_model")
    if problems:
        raise PeerMismatch(f"--vs {peer}: " + "; ".join(problems))


def build_mpt(cfg) -> tuple[object, Callable, str]:
    import transformers
    from transformers import MptConfig, MptForCausalLM

    _common_checks(cfg, "mpt", needs_no_bias=True)
    m = cfg.model
    attn = {"alibi": True, **({"attn_pdrop": m.dropout} if m.dropout else {})}
    config = MptConfig(d_model=m.d_model, n_heads=m.n_heads, n_layers=m.n_layers, expansion_ratio=m.d_ff // m.d_model,
                       max_seq_len=cfg.data.seq_len, vocab_size=cfg.data.vocab_size, no_bias=True,
                       resid_pdrop=m.dropout, emb_pdrop=m.dropout, attn_config=attn, tie_word_embeddings=True,
                       use_cache=False)
    model = MptForCausalLM(config)
    return model, lambda idx: model(idx, use_cache=False).logits, f"transformers {transformers.__version__}"


def build_xtransformers(cfg) -> tuple[object, Callable, str]:
    from importlib.metadata import version

    from x_transformers import Decoder, TransformerWrapper

    _common_checks(cfg, "xtransformers", needs_no_bias=False)
    m = cfg.model
    model = TransformerWrapper(
        num_tokens=cfg.data.vocab_size, max_seq_len=cfg.data.seq_len, use_abs_pos_emb=False, tie_embedding=True,
        emb_dropout=m.dropout,
        attn_layers=Decoder(dim=m.d_model, depth=m.n_layers, heads=m.n_heads, attn_dim_head=m.d_model // m.n_heads,
                            ff_mult=m.d_ff // m.d_model, ff_no_bias=not m.bias, alibi_pos_bias=True,
                            attn_dropout=m.dropout, ff_dropout=m.dropout))
    return model, model, f"x-transformers {version('x-transformers')}"


PEERS = {"mpt": build_mpt, "xtransformers": build_xtransformers}
