"""Benchmarks run each case in its own process: running the cases round by round
(`alternate`, `medians`), and measuring one process's memory on Linux (resident memory now
and at its peak, the peak reset, and freed heap returned to the OS so that "before" is not
inflated by earlier cases' garbage)."""

from __future__ import annotations


def rss_kb(field_name: str) -> int:
    """A field of /proc/self/status in kB: VmRSS (resident now) or VmHWM (peak resident)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    """Reset VmHWM to the current resident size (Linux clear_refs); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim() -> None:
    """Return freed heap memory to the OS (glibc)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def limit_memory(gb: float) -> None:
    """Cap this process's address space at `gb` GiB (0: no cap), so that a case that does not
    fit fails with an allocation error instead of swapping or waking the OOM killer."""
    if gb > 0:
        import resource

        cap = int(gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or "alloc" in str(e).lower() or "out of memory" in str(e).lower()


def alternate(cases: list[tuple[str, list[str]]], rounds: int, *, env: dict | None = None, log=print,
              show=lambda label, r: "", allow_failure: bool = False) -> dict[str, list[dict]]:
    """Run each case's child process (label, argv) once per round, the cases alternating within
    a round, so that a change in the machine's load hits all of them alike. Each child prints
    its result as one JSON object on its last line of output. Returns label -> one result per
    round; `show(label, result)` is appended to the progress line."""
    import json
    import subprocess

    results: dict[str, list[dict]] = {label: [] for label, _ in cases}
    for r in range(rounds):
        for label, argv in cases:
            proc = subprocess.run(argv, capture_output=True, text=True, env=env)
            if proc.returncode != 0 and not allow_failure:
                raise RuntimeError(f"bench case {label!r} failed:\n{proc.stderr[-4000:]}")
            if proc.returncode != 0:  # killed (the OOM killer: -9) or crashed: reported, not fatal
                lines = proc.stderr.strip().splitlines()
                res = {"failed": f"exit {proc.returncode}" + (f": {lines[-1][-200:]}" if lines else "")}
            else:
                res = json.loads(proc.stdout.strip().splitlines()[-1])
            results[label].append(res)
            line = f"cannot run: {res['failed']}" if "failed" in res else show(label, res)
            log(f"round {r + 1}/{rounds}  {label:<22} {line}".rstrip())
    return results


def medians(results: list[dict], keys: tuple[str, ...]) -> dict:
    """The first result with each of `keys` replaced by its median over all results (None
    values left out; None when there are none), and the number of rounds."""
    import statistics

    out = {**results[0], "rounds": len(results)}
    for key in keys:
        values = [r[key] for r in results if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    return out
