"""What an action costs, for the tests that bound it: CPU time of this thread (other processes on a loaded
machine do not count) and the growth of this process's peak RSS (Linux: clear_refs resets the peak)."""

from __future__ import annotations

import time


def cpu_seconds(action, repeat: int = 3) -> float:
    """The least CPU time of this thread over `repeat` runs of `action()`."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.thread_time()
        action()
        best = min(best, time.thread_time() - t0)
    return best


def peak_rss_growth(action) -> int:
    """Bytes the process's peak RSS grew by while `action()` ran."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    action()
    return _status("VmHWM") - before


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key + ":")).split()[1]) * 1024
