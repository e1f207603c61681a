"""kernels/ops.py against independent references: torch's functional ops and textbook formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kawai.kernels import ops
from python_runner import run_python


def randn(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def test_rms_norm_matches_formula_and_allows_in_place():
    rng = np.random.default_rng(0)
    x, w = randn(rng, 5, 96, scale=3.0), randn(rng, 96)
    expected = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * w
    out = np.empty_like(x)
    ops.rms_norm(x, w, 1e-6, out)
    np.testing.assert_allclose(out, expected, rtol=0, atol=5e-7)  # measured max |diff| 2.6e-7
    ops.rms_norm(x, w, 1e-6, x)  # the model normalizes q/k heads in place
    np.testing.assert_array_equal(x, out)


def _rope_reference(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray, neox: bool) -> np.ndarray:
    """neox: HF's rotate_half formula; normal: adjacent pairs as complex numbers times e^(i*angle)."""
    angles = positions[:, None].astype(np.float64) * inv_freq[None, :].astype(np.float64)  # (n, hd/2)
    if neox:
        xt = torch.from_numpy(x.astype(np.float64))
        cos = torch.from_numpy(np.cos(np.concatenate([angles, angles], -1)))[:, None, :]
        sin = torch.from_numpy(np.sin(np.concatenate([angles, angles], -1)))[:, None, :]
        half = x.shape[-1] // 2
        rotated = torch.cat([-xt[..., half:], xt[..., :half]], -1)
        return (xt * cos + rotated * sin).numpy()
    pairs = x.astype(np.float64).reshape(*x.shape[:-1], -1, 2)
    z = (pairs[..., 0] + 1j * pairs[..., 1]) * np.exp(1j * angles)[:, None, :]
    return np.stack([z.real, z.imag], -1).reshape(x.shape)


@pytest.mark.parametrize("neox", [True, False])
def test_rope_matches_reference(neox):
    rng = np.random.default_rng(1)
    n, heads, hd = 7, 3, 64
    x = randn(rng, n, heads, hd)
    positions = np.array([0, 1, 2, 5, 100, 1000, 4095], dtype=np.int64)
    inv_freq = (1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd)).astype(np.float32)
    expected = _rope_reference(x, positions, inv_freq, neox)
    out = x.copy()
    ops.rope(out, positions, inv_freq, neox)
    # float32 angles at position 4095 carry ~2e-4 rad of rounding, as in transformers and llama.cpp
    # (measured max |diff| 1.9e-4 neox, 2.1e-4 normal, at position 4095; 2.5e-5 at 1000)
    np.testing.assert_allclose(out, expected, atol=4e-4)
    np.testing.assert_array_equal(out[0], x[0])  # position 0 is the identity


def test_silu_mul_matches_torch():
    rng = np.random.default_rng(2)
    gate, up = randn(rng, 4, 200, scale=4.0), randn(rng, 4, 200)
    out = np.empty_like(gate)
    ops.silu_mul(gate, up, out)
    expected = (F.silu(torch.from_numpy(gate)) * torch.from_numpy(up)).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)  # measured: 5.5e-7 relative


def test_softmax_matches_torch_and_survives_large_logits():
    rng = np.random.default_rng(3)
    x = randn(rng, 3, 50, scale=30.0)
    x[0, 0] = 1e4  # would overflow exp without the max subtraction
    expected = torch.softmax(torch.from_numpy(x), -1).numpy()
    ops.softmax(x)
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-7)


def test_kernels_run_without_jit(tmp_path):
    """Every kernel also runs as plain Python (NUMBA_DISABLE_JIT=1) and agrees with the compiled one."""
    script = """
import numpy as np
from kawai.kernels import ops
rng = np.random.default_rng(0)
q = rng.standard_normal((3, 4, 8)).astype(np.float32)
ops.rope(q, np.arange(3), np.ones(4, np.float32) / 3, True)
ops.rope(q, np.arange(3), np.ones(4, np.float32) / 3, False)
x = q.reshape(3, 32).copy()
ops.rms_norm(x, np.ones(32, np.float32), 1e-6, x)
ops.silu_mul(x, x, x)
ops.softmax(x)
np.save(__import__("sys").argv[1], x)
"""
    results = []
    for disable in ("1", "0"):
        target = tmp_path / f"jit_disabled_{disable}.npy"
        run_python(script, str(target), jit=disable == "0")
        results.append(np.load(target))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5, atol=1e-7)
