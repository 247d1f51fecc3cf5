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


def peak_flops(configured_tflops: float | None, device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained)."""
    if configured_tflops:
        return configured_tflops * 1e12, "trainer.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = datasheet_peak(name)
        if peak:
            return peak, f"{name} datasheet bf16"
        return measured_matmul_peak(torch.bfloat16, 4096, device=device), f"{name} measured bf16 matmul"
    return measured_matmul_peak(), f"measured fp32 matmul, {torch.get_num_threads()} threads"
