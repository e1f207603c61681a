"""Compute threads, as the engine's callers see them (the CLI, the server's engine thread, the bench).

The kernels' threading layer (kernels/threads.py) is chosen once per process; these wrappers turn its
errors into KawaiError so callers above the engine never import kernels directly."""

from __future__ import annotations

from kawai.engine.errors import KawaiError
from kawai.kernels import threads as kernel_threads


def max_threads() -> int:
    """The most threads the kernels may use in this process."""
    return kernel_threads.max_threads()


def default_threads() -> int:
    """KAWAI_THREADS if set, else every core the kernels may use."""
    try:
        return kernel_threads.default_threads()
    except kernel_threads.ThreadingError as e:
        raise KawaiError(str(e)) from None


def configure_threads(n: int | None = None) -> int:
    """Use n kernel threads (default: `default_threads()`) on the calling thread; returns n.
    Numba's thread count is per calling thread: a thread that runs the model calls this first."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise KawaiError(f"threads must be a positive integer, got {n!r}")
    try:
        return kernel_threads.configure_threads(default_threads() if n is None else n)
    except kernel_threads.ThreadingError as e:
        raise KawaiError(str(e)) from None


def release_threads() -> None:
    """The calling thread is done running the model (it loaded or warmed one for another thread): end
    its kernel worker threads, whose idle pool would slow every launch of the thread that runs the model
    (kernels/threads.py)."""
    kernel_threads.release_threads()
