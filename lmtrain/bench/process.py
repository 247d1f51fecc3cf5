"""Measuring one process's memory on Linux, for benchmarks that run each case in its own
process: resident memory now and at its peak, the peak reset, and freed heap returned to
the OS so that "before" is not inflated by earlier cases' garbage."""

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
