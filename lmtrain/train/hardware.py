"""The peak FLOP/s that MFU is measured against."""

from __future__ import annotations

import time

import torch

# Dense (no sparsity) tensor-core peaks from the vendors' datasheets, FLOP/s.
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


def datasheet_peak(device_name: str) -> float | None:
    for key, peak in DATASHEET_BF16.items():
        if key in device_name:
            return peak
    return None


def measured_matmul_peak(dtype=torch.float32, n: int = 1024, trials: int = 7, seconds: float = 0.15,
                         device="cpu") -> float:
    """FLOP/s of square matmuls on this machine at the current thread count: the best of
    several short trials, so that a moment of load from other processes does not lower it."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(trials):
        if device != "cpu":
            torch.cuda.synchronize()
        iters, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            iters += 1
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 2.0 * n**3 * iters / (time.perf_counter() - t0))
    return best


def matmul_dtype(precision: str) -> torch.dtype:
    """The dtype a Lightning precision runs its matmuls in: bf16 for bf16-mixed and bf16-true
    (autocast), fp16 for 16-mixed, fp64 for 64-true, else fp32."""
    p = str(precision)
    if p.startswith("bf16"):
        return torch.bfloat16
    if p.startswith("16"):
        return torch.float16
    return torch.float64 if p.startswith("64") else torch.float32


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def peak_flops(configured_tflops: float | None, device: torch.device,
               precision: str = "32-true") -> tuple[float, str]:
    """(peak FLOP/s of the precision in use, how it was obtained). On the CPU it is measured:
    matmuls in the precision's dtype at the current thread count (bf16 runs on AMX or AVX-512
    BF16 units where the CPU has them, several times the fp32 rate)."""
    if configured_tflops:
        return configured_tflops * 1e12, "trainer.peak_tflops"
    dtype = matmul_dtype(precision)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = datasheet_peak(name)
        if peak:
            return peak, f"{name} datasheet bf16"
        return measured_matmul_peak(torch.bfloat16, 4096, device=device), f"{name} measured bf16 matmul"
    return cpu_matmul_peak(dtype), f"measured {DTYPE_NAMES[dtype]} matmul, {torch.get_num_threads()} threads"


def cpu_matmul_peak(dtype=torch.float32) -> float:
    """The CPU's matmul peak in `dtype`, at the size where it is highest: 1024^3 products for
    fp32 (2048^3 falls out of cache and measures lower, which would let MFU pass 100%), 2048^3
    for 16-bit dtypes, whose kernels (AMX, AVX-512 BF16) reach their rate only there."""
    if dtype in (torch.bfloat16, torch.float16):
        return measured_matmul_peak(dtype, 2048, trials=4)
    return measured_matmul_peak(dtype)


# CPU features that decide the speed of training: vector width, fused multiply-add, and bf16/fp16
# matrix or dot-product units.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")


def cpu_description() -> str:
    """'MODEL (N CPUs; flags ...; torch's ISA level)': printed beside every benchmark table, so
    that results from two machines are never mixed up."""
    import os
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine()):
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    have = [f for f in CPU_FLAGS if f in flags]
    isa = torch.backends.cpu.get_cpu_capability()
    return f"{model} ({os.cpu_count()} CPUs; {' '.join(have) or 'no AVX2/AVX-512/AMX'}; torch ISA {isa})"
