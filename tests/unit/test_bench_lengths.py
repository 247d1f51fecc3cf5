"""`lmtrain bench train --lengths`: the cases at each length, a peer that runs out of memory
reported and retried with its own activation checkpointing, and the scaling table."""

from __future__ import annotations

from types import SimpleNamespace

from lmtrain.bench import train as bench


def _fake_alternate(memory_per_token: dict[str, float], limit: float, calls: list):
    """Each case's step time and memory grow with L; past `limit` MB it runs out of memory."""

    def alternate(argv, rounds, **kw):
        import json

        out = {}
        for label, cmd in argv:
            spec = json.loads(cmd[-1])
            L = int(next(o for o in spec["overrides"] if o.startswith("data.seq_len=")).split("=")[1])
            calls.append((label, L, spec["checkpointing"]))
            mb = memory_per_token[spec["impl"]] * L * (0.25 if spec["checkpointing"] else 1)
            out[label] = [{"failed": f"out of memory at L={L}"} if mb > limit else
                          {"impl": spec["impl"], "tokens_per_s": 1e6 / L, "step_s": L / 1e3, "mfu": 0.5,
                           "data_wait": 0.0, "peak_flops": 1e11, "matmul_flops": 1e11, "peak_mb": mb, "params": 7,
                           "params_lmtrain": 7, "version": "v", "flops_per_token": 1e6, "peak_source": "test",
                           "matmul_bf16_flops": 2e11, "precision": "32-true", "machine": "test CPU"}
                          for _ in range(rounds)]
        return out

    return alternate


def test_out_of_memory_is_reported_and_mpt_retried_with_checkpointing(monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "alternate", _fake_alternate({"lmtrain": 0.1, "mpt": 1.0, "xtransformers": 1.2},
                                                            limit=5000, calls=calls))
    args = SimpleNamespace(config="c.yaml", overrides=[], variant=[], peers=["mpt", "xtransformers"], warmup=1, steps=1,
                           threads=1, rounds=1, memory_limit_gb=1.0, lengths=[2048, 4096, 8192])
    by_length = bench.run_lengths(args, log=lambda s: None)
    impls = {L: [r["impl"] for r in rs] for L, rs in by_length.items()}
    assert impls[2048] == ["lmtrain", "mpt", "xtransformers"]  # every case fits at 2048
    assert impls[8192] == ["lmtrain", "mpt", "xtransformers", "mpt, checkpointing"]
    assert ("mpt, checkpointing", 8192, True) in calls and ("xtransformers, checkpointing", 8192, True) not in calls
    at_8k = {r["impl"]: r for r in by_length[8192]}
    assert "failed" in at_8k["mpt"] and at_8k["mpt, checkpointing"]["peak_mb"] == 2048
    text = bench.format_results(by_length[8192])
    assert "| xtransformers | | | cannot run: out of memory at L=8192 |" in text
    table = bench.format_scaling(by_length)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    assert rows["lmtrain"].split(" | ")[4:6] == ["2.00x", "2.00x"]  # step time doubles with L
    assert rows["xtransformers"].split(" | ")[1:4] == ["2.05", "4.10", "cannot run"]
    assert rows["mpt, checkpointing"].split(" | ")[1:4] == ["-", "-", "8.19"]  # only run where needed
