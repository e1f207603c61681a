"""One place that chooses Numba's threading layer and thread count, before any parallel kernel runs.

Numba picks its threading layer the first time a `parallel=True` kernel launches and cannot change it
afterwards. OpenMP launches cost a few microseconds; the `workqueue` fallback costs ~100 us per launch,
which is unusable at hundreds of matmuls per token, so the layer is requested explicitly and a missing
OpenMP is an error, not a silent slowdown. Call `configure_threads` once at start-up (engine load, CLI).

OpenMP's idle threads spin briefly, then sleep (GOMP_SPINCOUNT=30000 unless the environment already sets
it or OMP_WAIT_POLICY). Both extremes lose: with GOMP's default spin (300000) decode on 2 threads ran
4-7x slower whenever the machine had other work (a spinning thread holds the core its partner needs),
and with no spin at all (OMP_WAIT_POLICY=passive) every one of a decode step's ~170 kernel launches
waits for a sleeping thread to wake: 48 vs 34 us for a small matmul, decode 19.5 vs 22-27 tok/s on an
idle machine. A short spin covers the gap between back-to-back launches and yields the core soon after.

GNU OpenMP keeps a pool of worker threads per *launching* thread, and while its pools hold more workers
than the machine has CPUs it cuts every spin to 100 iterations: workers sleep between launches and each
launch waits ~40 us for them to wake. A server loads and warms its model on one thread and runs it on
another (the engine thread), so the loader's idle pool made every launch of the engine thread pay that:
single-stream decode on 2 threads ran 37 ms a token instead of 29. `release_threads` ends the calling
thread's pool (libgomp's `omp_pause_resource_all`); engine.load calls it after its warm-up, and the
server's engine thread whenever it goes idle (another model's engine thread may be busy).
"""

from __future__ import annotations

import ctypes
import functools
import os

import numba
import numpy as np
from numba import njit, prange

from kawai.kernels import isa  # noqa: F401  (before any @njit: it fixes Numba's target, kernels/isa.py)

THREADING_LAYER = "omp"
SPIN_COUNT = "30000"  # libgomp busy-wait iterations before an idle thread sleeps
OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the calling thread's pool, keep the runtime


class ThreadingError(RuntimeError):
    """The requested threading layer is unavailable, or another layer is already running."""


@njit(parallel=True, cache=True)
def _touch(out):
    """A tiny parallel loop: launching it initializes the threading layer."""
    for i in prange(out.shape[0]):
        out[i] = i


def _layer_in_use() -> str | None:
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return None


@functools.cache  # asked once the omp layer runs (release_threads): libgomp is loaded then, and stays
def _libgomp() -> ctypes.CDLL | None:
    """The GNU OpenMP runtime this process has loaded (Numba's omp layer links it), or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line}
    except OSError:  # not Linux
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)  # already loaded: the same handle
        except OSError:
            continue
        if hasattr(lib, "omp_pause_resource_all"):
            return lib
    return None


def release_threads() -> bool:
    """End the OpenMP worker threads this thread started (a later launch here starts them again).
    Call it on a thread that is done running kernels while another thread goes on; True if freed."""
    lib = _libgomp() if _layer_in_use() == "omp" else None
    return lib is not None and lib.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0


def max_threads() -> int:
    """Threads Numba can use in this process (NUMBA_NUM_THREADS, by default the CPU count)."""
    return int(numba.config.NUMBA_NUM_THREADS)


def configure_threads(n: int | None = None, layer: str = THREADING_LAYER) -> int:
    """Select `layer` (default OpenMP) and use `n` threads (default: all of them); returns n.

    Raises ThreadingError when the layer cannot be loaded or a different one already runs."""
    in_use = _layer_in_use()
    if in_use is None:
        if "OMP_WAIT_POLICY" not in os.environ:  # read by libgomp once, when Numba first loads it
            os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
        numba.config.THREADING_LAYER = layer
        try:
            _touch(np.empty(max(2, max_threads()), np.int64))
        except ValueError as e:  # Numba's message names the missing library
            raise ThreadingError(f"Numba threading layer {layer!r} is unavailable: {e}") from None
        in_use = _layer_in_use()
    if in_use != layer:
        raise ThreadingError(
            f"Numba already runs the {in_use!r} threading layer; configure_threads({layer!r}) must run "
            "before the first parallel kernel"
        )
    limit = max_threads()
    n = limit if n is None else int(n)
    if not 1 <= n <= limit:
        raise ThreadingError(f"thread count {n} must be within 1..{limit} (NUMBA_NUM_THREADS)")
    numba.set_num_threads(n)
    return n


def default_threads() -> int:
    """KAWAI_THREADS if set, else every CPU Numba may use."""
    value = os.environ.get("KAWAI_THREADS", "").strip()
    if not value:
        return max_threads()
    if not value.isdigit() or not 1 <= int(value) <= max_threads():
        raise ThreadingError(f"KAWAI_THREADS={value!r} must be a whole number within 1..{max_threads()}")
    return int(value)
