"""`lmtrain plan`: the ZeRO memory formulas, the activation estimate, the parameter count
(the CLI is tested in tests/integration/test_cli.py)."""

from __future__ import annotations

import pytest

from lmtrain.config import load_config
from lmtrain.model import build_model
from lmtrain.plan import STAGES, Bytes, activation_bytes, count_params, format_plan, model_state_bytes, plan
from tests.helpers import CONFIGS


def test_zero_memory_matches_the_papers_example():
    # Rajbhandari et al. 2020, Fig. 1: Psi = 7.5 B, N_d = 64, mixed-precision Adam.
    got = [round(model_state_bytes(int(7.5e9), 64, s, Bytes(2, 2, 12)) / 1e9, 1) for s in STAGES]
    assert got == [120.0, 31.4, 16.6, 1.9]


def test_offload_moves_optimizer_state_and_zero3_params_off_the_gpu():
    b = Bytes(2, 2, 12)
    assert model_state_bytes(1000, 8, "ZeRO-2", b, offload_optimizer=True) == 2 * 1000 + 2 * 1000 / 8
    assert model_state_bytes(1000, 8, "ZeRO-3", b, offload_optimizer=True, offload_params=True) == 2 * 1000 / 8


def test_activations_follow_korthikanti_for_a_4x_feed_forward():
    s, b, h, a, n = 2048, 4, 1024, 16, 10
    full = activation_bytes(seq_len=s, micro_batch=b, d_model=h, n_heads=a, d_ff=4 * h, n_layers=n, vocab=0,
                            checkpointing=False, flash=False)
    assert full == pytest.approx(n * s * b * h * (34 + 5 * a * s / h))
    ckpt = activation_bytes(seq_len=s, micro_batch=b, d_model=h, n_heads=a, d_ff=4 * h, n_layers=n, vocab=0,
                            checkpointing=True)
    assert ckpt == pytest.approx(2 * s * b * h * n + 34 * s * b * h)


def test_parameter_count_by_hand():
    """The default model, counted by hand: tied embeddings V d; per layer two LayerNorms
    without biases (d each), q/k/v and output projections (4 d^2), the GELU MLP (2 d d_ff);
    the final LayerNorm. No model is built to count. With model.bias=true: + 4 d + d_ff + d
    + 2 d per layer and d for the final norm."""
    cfg = load_config(CONFIGS / "default.yaml")
    V, d, f, n = 4096, 192, 768, 4
    per_layer = 2 * d + 4 * d * d + 2 * d * f
    assert count_params(cfg) == V * d + n * per_layer + d == 2_557_632
    assert count_params(cfg) == sum(p.numel() for p in build_model(cfg).parameters())
    biased = load_config(CONFIGS / "default.yaml", ["model.bias=true"])
    assert count_params(biased) == V * d + n * (per_layer + 4 * d + f + d + 2 * d) + 2 * d == 2_566_272
    assert count_params(biased) == sum(p.numel() for p in build_model(biased).parameters())
    # A 6.7B preset: counted in a moment, from its config alone.
    big = load_config(CONFIGS / "experiments" / "multinode" / "gpt_6b7_zero3.yaml")
    d, f, n, V = 4096, 16384, 32, 50304
    assert count_params(big) == V * d + n * (2 * d + 4 * d * d + 2 * d * f) + d


def test_more_sharding_never_fits_fewer_samples():
    cfg = load_config(CONFIGS / "default.yaml", ["model.n_layers=24", "model.d_model=2048", "model.n_heads=16",
                                                  "model.d_ff=8192", "data.seq_len=4096",
                                                  "trainer.precision=bf16-mixed"])
    p = plan(cfg, gpu_mem_gb=80, n_gpus=8)
    mbs = [r["max_micro_batch"] for r in p["stages"]]
    states = [r["model_states_gb"] for r in p["stages"]]
    assert mbs == sorted(mbs) and states == sorted(states, reverse=True)
    assert all(r["max_micro_batch_ckpt"] >= r["max_micro_batch"] for r in p["stages"])


def test_the_configured_strategy_is_costed():
    big = ["model.n_layers=32", "model.d_model=4096", "model.n_heads=32", "model.d_ff=16384", "data.seq_len=8192",
           "data.batch_size=1", "trainer.precision=bf16-mixed"]
    cfg = load_config(CONFIGS / "default.yaml", big)
    ddp = plan(cfg, gpu_mem_gb=80, n_gpus=32)["configured"]
    assert ddp["stage"] == "DP" and not ddp["fits"]
    assert ddp["model_states_gb"] == pytest.approx(16 * count_params(cfg) / 1e9)
    z3 = plan(load_config(CONFIGS / "default.yaml", [*big, "trainer.strategy=deepspeed", "deepspeed.zero_stage=3",
                                                      "trainer.activation_checkpointing=true"]),
              gpu_mem_gb=80, n_gpus=32)["configured"]
    assert z3["stage"] == "ZeRO-3" and z3["checkpointing"] and z3["fits"]
    assert z3["model_states_gb"] == pytest.approx(ddp["model_states_gb"] / 32)
    assert z3["activations_gb"] < ddp["activations_gb"] / 4
    off = plan(load_config(CONFIGS / "default.yaml", [*big, "trainer.strategy=deepspeed", "deepspeed.zero_stage=3",
                                                       "deepspeed.offload_optimizer=true",
                                                       "deepspeed.offload_params=true"]),
               gpu_mem_gb=80, n_gpus=32)["configured"]
    assert off["model_states_gb"] == pytest.approx(z3["model_states_gb"] * 2 / 16)  # gradients only




def test_sequence_parallelism_divides_activations_per_rank():
    """trainer.sequence_parallel=N: each rank holds L/N positions of every activation (the
    materialised attention matrix too), model states stay sharded over all ranks, and the
    all-to-all traffic is 8 layers x (N-1)/N x L/N x b x d per rank."""
    from lmtrain.plan import activation_bytes, all_to_all_bytes

    shape = dict(seq_len=65536, micro_batch=1, d_model=4096, n_heads=32, d_ff=16384, n_layers=32, vocab=50304,
                 checkpointing=False)
    for flash in (True, False):
        whole = activation_bytes(**shape, flash=flash)
        assert activation_bytes(**shape, flash=flash, sequence_parallel=8) == pytest.approx(whole / 8)
    assert all_to_all_bytes(seq_len=65536, micro_batch=1, d_model=4096, n_layers=32, act_bytes=2,
                            sequence_parallel=8) == pytest.approx(8 * 32 * 7 / 8 * 8192 * 4096 * 2)
    big = ["model.n_layers=32", "model.d_model=4096", "model.n_heads=32", "model.d_ff=16384", "data.seq_len=65536",
           "data.batch_size=1", "trainer.precision=bf16-mixed", "trainer.strategy=deepspeed", "deepspeed.zero_stage=3",
           "trainer.devices=8"]
    one = plan(load_config(CONFIGS / "default.yaml", big), gpu_mem_gb=80, n_gpus=8)
    split = plan(load_config(CONFIGS / "default.yaml", [*big, "trainer.sequence_parallel=8"]), gpu_mem_gb=80, n_gpus=8)
    assert split["configured"]["activations_gb"] == pytest.approx(one["configured"]["activations_gb"] / 8)
    assert split["configured"]["model_states_gb"] == one["configured"]["model_states_gb"]
    assert not one["configured"]["fits"] and split["configured"]["fits"]
    text = format_plan(split)
    assert "sequence parallel    8 GPUs per sequence (8192 positions each; 1 data-parallel groups)" in text
