"""Run a Python snippet in a fresh interpreter at the repository root, for checks that need their own
process (NUMBA_DISABLE_JIT, environment read once at start-up)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(script: str, *args: str, jit: bool = True, env: dict[str, str] | None = None,
               timeout: float = 300) -> str:
    """stdout of `python -c script args...` (stripped); the run must succeed. jit=False sets
    NUMBA_DISABLE_JIT=1, so the kernels run as plain Python; `env` adds environment variables."""
    done = _run(script, args, jit, env, timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def run_python_failing(script: str, *args: str, jit: bool = True, env: dict[str, str] | None = None,
                       timeout: float = 300) -> str:
    """The last line of stderr of a run of `script` that must fail (as `run_python` otherwise)."""
    done = _run(script, args, jit, env, timeout)
    assert done.returncode != 0, done.stdout[-2000:]
    return done.stderr.strip().splitlines()[-1]


def _run(script: str, args, jit: bool, env: dict[str, str] | None, timeout: float) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, NUMBA_DISABLE_JIT="0" if jit else "1", **(env or {}))
    if not jit and "KAWAI_ISA" not in (env or {}):
        full_env.pop("KAWAI_ISA", None)  # an ISA path is a compile target: forcing one without the JIT is an error
    # -P: the repo root (the cwd) is never on sys.path, so nothing imports as a top-level "kernels"/"engine"
    return subprocess.run([sys.executable, "-P", "-c", script, *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
