"""`lmtrain plan CONFIG`: parameters, ZeRO memory per GPU, activations, and a micro-batch.

Model states per data-parallel rank (Rajbhandari et al. 2020, "ZeRO", Sec. 3 and 5), for
Psi parameters and N_d ranks, with p, g, k bytes per parameter of weights, gradients and
optimizer state (mixed-precision Adam: p = g = 2, k = 12: fp32 master weights, m, v):

    DP       (p + g + k) Psi                  = 16 Psi
    ZeRO-1   (p + g) Psi + k Psi / N_d        =  4 Psi + 12 Psi / N_d
    ZeRO-2   p Psi + (g + k) Psi / N_d        =  2 Psi + 14 Psi / N_d
    ZeRO-3   (p + g + k) Psi / N_d            = 16 Psi / N_d

Full fp32 training has p = g = 4, k = 8. Optimizer offload moves the k term to host
memory; parameter offload (ZeRO-3) moves the p term as well.

Activations per layer (Korthikanti et al. 2022, "Reducing Activation Recomputation", Sec.
4.1, with a d_ff = f * d_model feed-forward and bytes in 16-bit): s b h (18 + 4 f), plus
5 a s^2 b when the attention matrix is materialised (not with flash/SDPA/FlexAttention
kernels, which lmtrain uses). With activation checkpointing a layer keeps only its input,
2 s b h, and one layer's full activations exist during its recomputation. The LM head
adds s b V logits (16-bit) and their fp32 copy for the loss.

Sequence parallelism (trainer.sequence_parallel = N, DeepSpeed Ulysses): each rank of a group
holds s/N positions of every tensor outside attention, and inside attention all s positions
of a/N heads, which is again s b h / N per tensor; so every per-layer term above is divided
by N, the materialised s^2 term included (a/N heads each). Model states are sharded over all
ranks (ZeRO's data-parallel group is the whole world). The all-to-alls move, per layer and
micro-batch, 4 tensors forward and 4 backward, each (N-1)/N of a rank's s b h / N elements.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9  # decimal, as in the ZeRO paper
STAGES = ("DP", "ZeRO-1", "ZeRO-2", "ZeRO-3")


@dataclass(frozen=True)
class Bytes:
    """Bytes per parameter of weights, gradients and optimizer state."""

    p: int
    g: int
    k: int


def bytes_per_param(precision: str) -> Bytes:
    if precision in ("32-true", "32", "64-true"):
        return Bytes(4, 4, 8) if precision != "64-true" else Bytes(8, 8, 16)
    return Bytes(2, 2, 12)  # bf16/16 mixed: 16-bit weights and grads, fp32 master + Adam m, v


def model_state_bytes(psi: int, n_d: int, stage: str, b: Bytes, *, offload_optimizer: bool = False,
                      offload_params: bool = False) -> float:
    """Bytes of weights, gradients and optimizer state on one GPU."""
    k = 0 if offload_optimizer else b.k
    p = 0 if (offload_params and stage == "ZeRO-3") else b.p
    if stage == "DP":
        return (p + b.g + k) * psi
    if stage == "ZeRO-1":
        return (p + b.g) * psi + k * psi / n_d
    if stage == "ZeRO-2":
        return p * psi + (b.g + k) * psi / n_d
    if stage == "ZeRO-3":
        return (p + b.g + k) * psi / n_d
    raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")


def activation_bytes(*, seq_len: int, micro_batch: int, d_model: int, n_heads: int, d_ff: int, n_layers: int,
                     vocab: int, checkpointing: bool, flash: bool = True, act_bytes: int = 2,
                     sequence_parallel: int = 1) -> float:
    """Activation memory of one micro-batch's forward pass (the peak at the start of backward)
    on one rank; with sequence parallelism the rank holds 1/N of the sequence."""
    s, b, h, a, n = seq_len, micro_batch, d_model, n_heads, sequence_parallel
    f = d_ff / d_model
    per_layer = s * b * h * (18 + 4 * f) * act_bytes / 2 / n
    if not flash:
        per_layer += 5 * a * s * s * b * act_bytes / 2 / n
    layers = (2 * s * b * h * act_bytes / 2 / n) * n_layers + per_layer if checkpointing else per_layer * n_layers
    logits = s * b * vocab * (act_bytes + 4) / n
    return layers + logits


def all_to_all_bytes(*, seq_len: int, micro_batch: int, d_model: int, n_layers: int, act_bytes: int,
                     sequence_parallel: int) -> float:
    """Bytes one rank sends per micro-batch in Ulysses' all-to-alls (forward and backward)."""
    n = sequence_parallel
    if n == 1:
        return 0.0
    return 8 * n_layers * (n - 1) / n * seq_len * micro_batch * d_model / n * act_bytes


def count_params(cfg) -> int:
    """Parameters of the model the config describes (from the config alone; tied weights once)."""
    from lmtrain.model.count import parameter_count

    return parameter_count(cfg.model, vocab_size=cfg.data.vocab_size, seq_len=cfg.data.seq_len)


def plan(cfg, *, gpu_mem_gb: float, n_gpus: int, headroom_gb: float = 2.0) -> dict:
    """The numbers `lmtrain plan` prints: model states per stage, activations, and the largest
    micro-batch that fits `gpu_mem_gb` (minus `headroom_gb` for the CUDA context and
    fragmentation), with and without activation checkpointing."""
    m, d = cfg.model, cfg.data
    psi = count_params(cfg)
    b = bytes_per_param(cfg.trainer.precision)
    act_bytes = 4 if b.p >= 4 else 2
    from lmtrain.model.depth import DEPTH

    applications = DEPTH.get(m.depth.kind).layer_applications(m)  # a shared block keeps activations per step

    sp = cfg.trainer.sequence_parallel

    def act(mb: int, ckpt: bool) -> float:
        return activation_bytes(seq_len=d.seq_len, micro_batch=mb, d_model=m.d_model, n_heads=m.n_heads, d_ff=m.d_ff,
                                n_layers=applications, vocab=d.vocab_size, checkpointing=ckpt, act_bytes=act_bytes,
                                sequence_parallel=sp)

    budget = (gpu_mem_gb - headroom_gb) * GB
    rows = []
    for stage in STAGES:
        states = model_state_bytes(psi, n_gpus, stage, b)
        row = {"stage": stage, "model_states_gb": states / GB}
        for ckpt in (False, True):
            per_sample = act(1, ckpt) - (act(0, ckpt) if ckpt else 0.0)
            fixed = act(0, ckpt)
            free = budget - states - fixed
            fit = max(0, int(free // per_sample)) if per_sample > 0 else 0
            row["max_micro_batch" + ("_ckpt" if ckpt else "")] = fit
        rows.append(row)
    t, ds = cfg.trainer, cfg.deepspeed
    zero = t.strategy == "deepspeed"
    stage = f"ZeRO-{ds.zero_stage}" if zero else "DP"
    states = model_state_bytes(psi, n_gpus, stage, b, offload_optimizer=zero and ds.offload_optimizer,
                               offload_params=zero and ds.offload_params)
    acts = act(d.batch_size, t.activation_checkpointing)
    configured = {"stage": stage, "offload_optimizer": zero and ds.offload_optimizer,
                  "offload_params": zero and ds.offload_params, "checkpointing": t.activation_checkpointing,
                  "model_states_gb": states / GB, "activations_gb": acts / GB, "total_gb": (states + acts) / GB,
                  "fits": states + acts <= budget}
    return {
        "params": psi,
        "precision": cfg.trainer.precision,
        "bytes_per_param": b.__dict__,
        "n_gpus": n_gpus,
        "gpu_mem_gb": gpu_mem_gb,
        "headroom_gb": headroom_gb,
        "seq_len": d.seq_len,
        "micro_batch": d.batch_size,
        "sequence_parallel": sp,
        "all_to_all_gb": all_to_all_bytes(seq_len=d.seq_len, micro_batch=d.batch_size, d_model=m.d_model,
                                          n_layers=applications, act_bytes=act_bytes, sequence_parallel=sp) / GB,
        "activations_gb": act(d.batch_size, False) / GB,
        "activations_ckpt_gb": act(d.batch_size, True) / GB,
        "stages": rows,
        "configured": configured,
    }


def format_plan(p: dict) -> str:
    lines = [
        f"parameters           {p['params']:,} ({p['params'] / 1e9:.3f} B)",
        f"precision            {p['precision']}: {p['bytes_per_param']['p']} + {p['bytes_per_param']['g']} + "
        f"{p['bytes_per_param']['k']} bytes per parameter (weights + gradients + optimizer state)",
        f"data-parallel GPUs   {p['n_gpus']} x {p['gpu_mem_gb']:g} GB ({p['headroom_gb']:g} GB kept for the CUDA "
        "context and fragmentation)",
        f"activations          {p['activations_gb']:.2f} GB per GPU at micro-batch {p['micro_batch']} x "
        f"{p['seq_len']} tokens ({p['activations_ckpt_gb']:.2f} GB with activation checkpointing)",
        *([f"sequence parallel    {p['sequence_parallel']} GPUs per sequence ({p['seq_len'] // p['sequence_parallel']} "
           f"positions each; {p['n_gpus'] // p['sequence_parallel']} data-parallel groups); all-to-all "
           f"{p['all_to_all_gb']:.2f} GB sent per GPU per micro-batch"] if p["sequence_parallel"] > 1 else []),
        "",
        "| stage | model states per GPU (GB) | largest micro-batch | with activation checkpointing |",
        "|---|---:|---:|---:|",
    ]
    for r in p["stages"]:
        lines.append(f"| {r['stage']} | {r['model_states_gb']:.2f} | {r['max_micro_batch']} | "
                     f"{r['max_micro_batch_ckpt']} |")
    c = p["configured"]
    how = ", ".join([c["stage"]] + [w for w, on in (("optimizer offloaded", c["offload_optimizer"]),
                                                     ("parameters offloaded", c["offload_params"]),
                                                     ("activation checkpointing", c["checkpointing"])) if on])
    lines += ["", f"this config          {how}: {c['model_states_gb']:.2f} GB model states + "
              f"{c['activations_gb']:.2f} GB activations = {c['total_gb']:.2f} GB of "
              f"{p['gpu_mem_gb'] - p['headroom_gb']:g} GB per GPU: "
              + ("fits" if c["fits"] else "DOES NOT FIT")]
    fits = [r for r in p["stages"] if r["max_micro_batch"] >= p["micro_batch"]]
    lines.append("")
    if fits:
        lines.append(f"suggestion: {fits[0]['stage']} fits micro-batch {p['micro_batch']} "
                     f"(data.batch_size); the least sharding that fits is the fastest.")
    else:
        ck = [r for r in p["stages"] if r["max_micro_batch_ckpt"] >= 1]
        lines.append("suggestion: no stage fits data.batch_size without checkpointing; "
                     + (f"use {ck[-1]['stage']} with activation checkpointing and micro-batch "
                        f"{ck[-1]['max_micro_batch_ckpt']}" if ck else "more GPUs, offload, or a smaller model"))
    return "\n".join(lines)
