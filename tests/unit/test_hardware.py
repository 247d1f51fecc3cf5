"""MFU's denominator is the matmul peak of the precision in use, and benchmark tables name the
CPU they ran on."""

from __future__ import annotations

import torch

from lmtrain.train import hardware


def test_the_peak_follows_the_precision(monkeypatch):
    asked = []
    monkeypatch.setattr(hardware, "cpu_matmul_peak", lambda dtype=torch.float32: asked.append(dtype) or 1e12)
    cpu = torch.device("cpu")
    assert hardware.peak_flops(None, cpu, "bf16-mixed") == (1e12, f"measured bf16 matmul, "
                                                                  f"{torch.get_num_threads()} threads")
    hardware.peak_flops(None, cpu, "bf16-true")
    hardware.peak_flops(None, cpu, "32-true")
    hardware.peak_flops(None, cpu)
    assert asked == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    assert hardware.peak_flops(2.5, cpu, "bf16-mixed") == (2.5e12, "trainer.peak_tflops")
    assert [hardware.matmul_dtype(p) for p in ("16-mixed", "64-true", "32")] == [torch.float16, torch.float64,
                                                                               torch.float32]


def test_training_mfu_uses_the_configured_precision(monkeypatch):
    from types import SimpleNamespace

    from lmtrain.config import load_config
    from lmtrain.train.callbacks import throughput
    from lmtrain.train.run import build_trainer
    from tests.helpers import DEBUG

    seen = []
    monkeypatch.setattr(throughput, "peak_flops", lambda tflops, device, precision="32-true": seen.append(precision)
                        or (1e12, "test"))
    trainer = build_trainer(load_config(DEBUG, ["trainer.precision=bf16-mixed", "trainer.loggers=[]"]))
    cb = next(c for c in trainer.callbacks if isinstance(c, throughput.Throughput))
    module = SimpleNamespace(device=torch.device("cpu"), log=lambda *a, **k: None)
    cb.on_train_start(SimpleNamespace(is_global_zero=False), module)
    assert seen == ["bf16-mixed"] and cb.peak == 1e12


def test_cpu_description_names_the_model_and_its_flags():
    text = hardware.cpu_description()
    assert "CPUs;" in text and "torch ISA" in text
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        flags = []
    for flag in ("avx512_bf16", "amx_bf16", "avx2"):
        assert (flag in text.split("; ")[1].split()) == (flag in flags), (flag, text)
