"""kernels/matmul.py against float64 x @ dequant(W).T, with `gguf.quants` as the independent oracle.

Quantized weights: the activations are quantized to int8 per 32 inside the matmul, so the result
differs from the float64 product by about 5e-3 of the output norm; the bound is 1e-2. Dense weights
are multiplied in float32 (bound 1e-5). Repacking itself is exact: unpack(pack(raw)) equals
gguf.quants.dequantize bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from kawai.engine.gguf import open_gguf
from kawai.kernels import matmul_simd as simd
from kawai.kernels.formats import DENSE_TYPES as DENSE, FORMATS
from kawai.kernels.matmul import (
    MATMUL_TYPES,
    PARALLEL_QUANTIZE_TOKENS,
    MatmulError,
    PackedMatrix,
    matmul,
    matmul_fused,
    matmul_stacked,
    pack,
    pack_dense,
    stack,
    unpack,
    warmup,
)
from kawai.kernels.qtypes import GGMLType
from kawai.kernels.threads import ThreadingError, configure_threads, max_threads
from python_runner import run_python

# Relative error bounds vs a float64 product, near the measured ones: int8 activations give 3.3e-3..7.0e-3
# on the random weights here (every quant type, 1 and 7 tokens; about 1e-2 on real tensors with Gaussian
# activations); float32 accumulation of dense weights 9.6e-8..1.4e-7.
QUANT_BOUND = 1e-2
DENSE_BOUND = 3e-7
QUANT_TYPES = sorted(t for t in MATMUL_TYPES if t.block_size > 1)  # the table's rows with a PackSpec
DENSE_TYPES = sorted(DENSE)


def oracle_dequant(raw: np.ndarray, qtype: GGMLType, cols: int) -> np.ndarray:
    rows = raw.shape[0]
    return gguf_quants.dequantize(np.asarray(raw), GGMLQuantizationType(int(qtype))).reshape(rows, cols)


# Types gguf.quants can quantize: their test weights are quantized Gaussians (zero-mean, like real ones).
GGUF_QUANTIZABLE = {GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0}


def random_raw(qtype: GGMLType, rows: int, cols: int, rng: np.random.Generator, bits: bool = False) -> np.ndarray:
    """Blocks of `qtype`: quantized Gaussian weights where gguf.quants can quantize (unless `bits`), else
    random quant bits with random but finite, small f16 scales."""
    if qtype in DENSE_TYPES or (qtype in GGUF_QUANTIZABLE and not bits):
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        if qtype == GGMLType.F32:
            return w.view(np.uint8)
        return gguf_quants.quantize(w, GGMLQuantizationType(int(qtype))).view(np.uint8).reshape(rows, -1)
    blocks = rng.integers(0, 256, (rows * cols // qtype.block_size, qtype.type_size), dtype=np.uint8)
    for at in FORMATS[qtype].f16_fields:  # random bytes elsewhere, sane halves here
        halves = (rng.random(blocks.shape[0]) * 0.02 + 0.001).astype("<f2")
        blocks[:, at : at + 2] = halves.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(y.astype(np.float64) - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module", autouse=True)
def _threads():
    configure_threads()
    warmup()


# --- repacking -----------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", QUANT_TYPES + DENSE_TYPES, ids=lambda t: t.name)
def test_repack_is_bit_exact(qtype):
    rng = np.random.default_rng(int(qtype))
    raw = random_raw(qtype, 6, 512, rng, bits=True)
    packed = pack(raw, qtype, 512)
    assert (packed.rows, packed.cols, packed.qtype) == (6, 512, qtype)
    np.testing.assert_array_equal(unpack(packed), oracle_dequant(raw, qtype, 512))


def test_repack_of_every_stored_bit_pattern():
    """Q5_0 with all 32 values of each weight in turn: the 5th bit is placed right for every element."""
    q = (np.arange(32)[:, None] + np.arange(32)[None, :]) % 32  # (32 blocks, 32 weights)
    qs = (q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)
    qh = np.bitwise_or.reduce((q >> 4).astype(np.uint32) << np.arange(32, dtype=np.uint32), axis=1)
    d = np.full(32, 0.5, "<f2")
    raw = np.concatenate([d.view(np.uint8).reshape(32, 2), qh.astype("<u4").view(np.uint8).reshape(32, 4),
                          qs.astype(np.uint8)], axis=1).reshape(1, -1)
    packed = pack(raw, GGMLType.Q5_0, 32 * 32)
    expected = ((q - 16) * 0.5).reshape(1, -1)
    np.testing.assert_array_equal(unpack(packed), expected)
    np.testing.assert_array_equal(unpack(packed), oracle_dequant(raw, GGMLType.Q5_0, 1024))


# --- matmul on random weights ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7])
@pytest.mark.parametrize("qtype", QUANT_TYPES + DENSE_TYPES, ids=lambda t: t.name)
def test_matmul_matches_float64_oracle(qtype, n):
    rng = np.random.default_rng(100 + int(qtype))
    rows, cols = 40, 768
    raw = random_raw(qtype, rows, cols, rng)
    w = oracle_dequant(raw, qtype, cols).astype(np.float64)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    y = matmul(pack(raw, qtype, cols), x)
    assert y.shape == (n, rows) and y.dtype == np.float32
    bound = DENSE_BOUND if qtype in DENSE_TYPES else QUANT_BOUND
    assert rel_err(y, x.astype(np.float64) @ w.T) < bound


def test_pack_dense_is_float32_exact_product():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((33, 100)).astype(np.float32)  # any width: dense needs no blocks
    x = rng.standard_normal((5, 100)).astype(np.float32)
    packed = pack_dense(w)
    assert packed.nbytes == w.nbytes and packed.weights is not w
    assert rel_err(matmul(packed, x), x.astype(np.float64) @ w.T.astype(np.float64)) < DENSE_BOUND


@pytest.mark.parametrize("qtype", QUANT_TYPES + [GGMLType.F32], ids=lambda t: t.name)
def test_prefill_rows_equal_single_token_rows(qtype):
    """A token's output does not depend on the other tokens of the call: every tile size (8, 4, 2), the
    single-token tail, and the threaded activation quantization of long inputs."""
    rng = np.random.default_rng(7)
    packed = pack(random_raw(qtype, 24, 256, rng), qtype, 256)
    x = rng.standard_normal((PARALLEL_QUANTIZE_TOKENS + 7, 256)).astype(np.float32)
    alone = np.concatenate([matmul(packed, x[i : i + 1]) for i in range(len(x))])
    for n in (2, 3, 5, 7, 8, PARALLEL_QUANTIZE_TOKENS + 7):  # 23 = 8 + 8 + 4 + 2 + 1 on the 512-bit paths
        np.testing.assert_array_equal(matmul(packed, x[:n]), alone[:n])


def test_fused_equals_separate():
    rng = np.random.default_rng(3)
    ws = [pack(random_raw(t, r, 256, rng), t, 256)
          for t, r in ((GGMLType.Q5_0, 64), (GGMLType.Q8_0, 16), (GGMLType.Q4_K, 16), (GGMLType.F16, 8))]
    x = rng.standard_normal((3, 256)).astype(np.float32)
    for y_fused, w in zip(matmul_fused(ws, x), ws):
        np.testing.assert_array_equal(y_fused, matmul(w, x))


@pytest.mark.parametrize("n", [1, 5])
def test_stacked_equals_separate(n):
    """Stacks form where formats agree (Q5_0 q and k, not the Q8_0 v), and every part's output is the
    part's own matmul bit for bit, as a C-contiguous array."""
    rng = np.random.default_rng(9)
    kinds = ((GGMLType.Q5_0, 64), (GGMLType.Q5_0, 32), (GGMLType.Q8_0, 32), (GGMLType.Q6_K, 16), (GGMLType.Q6_K, 48))
    ws = [pack(random_raw(t, r, 256, rng), t, 256) for t, r in kinds]
    stacked = stack(ws)
    assert [w.rows for w in stacked.stacks] == [96, 32, 64]
    assert stacked.nbytes == sum(w.nbytes for w in ws)
    x = rng.standard_normal((n, 256)).astype(np.float32)
    for y, part, w in zip(matmul_stacked(stacked, x), stacked.parts, ws):
        assert y.flags.c_contiguous
        np.testing.assert_array_equal(unpack(part), unpack(w))
        np.testing.assert_array_equal(y, matmul(w, x))
    with pytest.raises(MatmulError):
        stack([ws[0], pack(random_raw(GGMLType.Q8_0, 8, 64, rng), GGMLType.Q8_0, 64)])


def test_no_tokens():
    packed = pack(random_raw(GGMLType.Q8_0, 8, 64, np.random.default_rng(0)), GGMLType.Q8_0, 64)
    assert matmul(packed, np.zeros((0, 64), np.float32)).shape == (0, 8)


def test_zero_and_tiny_activations():
    rng = np.random.default_rng(4)
    raw = random_raw(GGMLType.Q4_1, 8, 64, rng)
    packed = pack(raw, GGMLType.Q4_1, 64)
    assert not matmul(packed, np.zeros((2, 64), np.float32)).any()
    x = np.zeros((1, 64), np.float32)
    x[0, 5] = 1e-30  # one nonzero element in a block of zeros
    ref = x.astype(np.float64) @ oracle_dequant(raw, GGMLType.Q4_1, 64).T.astype(np.float64)
    assert rel_err(matmul(packed, x), ref) < QUANT_BOUND


# --- real tensors from the catalog models ---------------------------------------------------------


def _real_cases(path, names):
    g = open_gguf(path)
    for name, max_rows in names:
        info = g.tensors[name]
        raw = g.tensor_data(name)[:max_rows]
        yield name, info.ggml_type, raw, info.shape[1]


def _first_tensor(path, suffix, qtype):
    g = open_gguf(path)
    return next(n for n, t in g.tensors.items() if n.endswith(suffix) and t.ggml_type == qtype)


def _check_real(name, qtype, raw, cols):
    rng = np.random.default_rng(5)
    packed = pack(raw, qtype, cols)
    w = oracle_dequant(raw, qtype, cols)
    np.testing.assert_array_equal(unpack(packed), w, err_msg=name)
    for n in (1, 7):
        x = rng.standard_normal((n, cols)).astype(np.float32)
        err = rel_err(matmul(packed, x), x.astype(np.float64) @ w.T.astype(np.float64))
        assert err < QUANT_BOUND, (name, n, err)


def test_real_qwen_tensors(default_model_path):
    q4k = _first_tensor(default_model_path, "ffn_down.weight", GGMLType.Q4_K)
    names = [("blk.0.attn_q.weight", None), ("blk.0.attn_v.weight", None), ("blk.0.ffn_down.weight", None),
             ("blk.0.ffn_up.weight", 1024), (q4k, None), ("output.weight", 4096)]
    seen = set()
    for name, qtype, raw, cols in _real_cases(default_model_path, names):
        seen.add(qtype)
        _check_real(name, qtype, raw, cols)
    assert seen == {GGMLType.Q5_0, GGMLType.Q8_0, GGMLType.Q6_K, GGMLType.Q4_K}


def test_real_smollm_tensors(smollm_model_path):
    names = [("blk.0.attn_k.weight", None), ("blk.0.ffn_down.weight", None), ("token_embd.weight", 2048)]
    seen = set()
    for name, qtype, raw, cols in _real_cases(smollm_model_path, names):
        seen.add(qtype)
        _check_real(name, qtype, raw, cols)
    assert seen == {GGMLType.Q4_1, GGMLType.Q8_0}


# --- the SIMD row dot products against their portable definition -----------------------------------


def _jitted(dot):
    """A jitted caller of one dot product (intrinsics are called from compiled code only)."""

    @numba.njit
    def call(w, w_off, s, m, ss, sm, g_off, x, xd, xqsum, t0, n_blocks, bias_factor):
        return dot(w, w_off, s, m, ss, sm, g_off, x, xd, xqsum, t0, n_blocks, bias_factor)

    return call


@pytest.mark.parametrize("scales", ["float16", "int8"])
@pytest.mark.parametrize("fmt", sorted(simd.FORMAT_CODES))
def test_dots_match_portable_definition(fmt, scales):
    """The dot products (SIMD intrinsics where available) against `dot_portable`, on a row and tokens
    inside larger arrays, with extreme values: w = -128 (s8) or the largest quant, |x| = 127; scales as
    float16 (an odd block count: the last block alone) or as int8 sub-scales of float32 super-scales."""
    rng = np.random.default_rng(6)
    code = simd.FORMAT_CODES[fmt]
    n_blocks = 9 if scales == "float16" else 2 * simd.SUPER_BLOCKS
    rows, tokens = 3, simd.TOKEN_TILE + 3
    block_bytes, n_groups = simd.BLOCK_BYTES[fmt], simd.GROUPS[fmt]
    w = rng.integers(0, 256, (rows, n_blocks * block_bytes), dtype=np.uint8)
    if fmt == "u8":
        w %= 64  # "u8" quants are 0..63
    w[:, :block_bytes] = {"s8": 128, "u8": 63, "u6": 255, "u4": 255, "u5": 255}[fmt]  # block 0: the largest
    n_all = rows * n_blocks * n_groups
    if scales == "float16":
        s = rng.random(n_all).astype(np.float16).view(np.uint16)
        m = rng.standard_normal(n_all).astype(np.float16).view(np.uint16)
        ss = sm = np.zeros(0, np.float32)
    else:
        s = rng.integers(-128, 128, n_all).astype(np.int8)
        m = rng.integers(-128, 128, n_all).astype(np.int8)
        ss = rng.random(rows * n_blocks // simd.SUPER_BLOCKS).astype(np.float32)
        sm = rng.standard_normal(ss.shape[0]).astype(np.float32)
    x = rng.integers(-127, 128, (tokens, n_blocks * 32)).astype(np.int8)
    x[:, :32] = -127 if fmt in simd.SIGNED_FORMATS else np.where(np.arange(32) % 2, 127, -127)
    x = x.reshape(-1)
    xd = rng.random(tokens * n_blocks).astype(np.float32)
    xqsum = rng.standard_normal(tokens * n_blocks * n_groups).astype(np.float32)
    row, t0 = 1, 2
    args = (w.reshape(-1), row * w.shape[1], s, m, ss, sm, row * n_blocks * n_groups, x, xd, xqsum, t0, n_blocks,
            -0.75)
    expected = [simd.dot_portable(code, *args[:10], t0 + i, n_blocks, -0.75) for i in range(simd.TOKEN_TILE)]
    one = _jitted(simd.DOTS[code][1])(*args)
    np.testing.assert_allclose(one, expected[0], rtol=1e-5)
    for size, dot in simd.DOTS[code].items():
        if size > 1:
            tile = _jitted(dot)(*args)
            np.testing.assert_allclose(tile, expected[:size], rtol=1e-5)
            assert tile[0] == one  # the same operations for the same token, bit for bit, whatever the tile


# --- errors ---------------------------------------------------------------------------------------


def test_bad_inputs_raise_matmul_error():
    rng = np.random.default_rng(8)
    raw = random_raw(GGMLType.Q8_0, 4, 64, rng)
    with pytest.raises(MatmulError, match="IQ2_XXS"):
        pack(np.zeros((4, 66), np.uint8), GGMLType.IQ2_XXS, 256)
    with pytest.raises(MatmulError, match="bytes"):
        pack(raw[:, :-1], GGMLType.Q8_0, 64)
    with pytest.raises(MatmulError, match="multiple"):
        pack(raw, GGMLType.Q8_0, 60)
    with pytest.raises(MatmulError, match="uint8"):
        pack(raw.astype(np.int16), GGMLType.Q8_0, 64)
    with pytest.raises(MatmulError, match="no rows"):
        pack(raw[:0], GGMLType.Q8_0, 64)
    packed = pack(raw, GGMLType.Q8_0, 64)
    with pytest.raises(MatmulError, match=r"\(n, 64\)"):
        matmul(packed, np.zeros((2, 63), np.float32))
    with pytest.raises(MatmulError, match=r"\(n, 64\)"):
        matmul(packed, np.zeros(64, np.float32))
    with pytest.raises(MatmulError, match="share"):
        matmul_fused([packed, pack_dense(np.zeros((2, 32), np.float32))], np.zeros((1, 64), np.float32))
    with pytest.raises(MatmulError, match="2-D"):
        pack_dense(np.zeros(5, np.float32))


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_packed_weights_cost_about_their_gguf_bytes(qtype):
    """A decode step streams every weight once, so its speed is the bytes it reads: the packed layout
    keeps the file's scales (float16, or int8 sub-scales of a float32 per 256), within 6% of the GGUF
    bytes. Q2_K and Q3_K are the exception, one byte per quant ("u8")."""
    rows, cols = 8, 512
    packed = pack(random_raw(qtype, rows, cols, np.random.default_rng(3)), qtype, cols)
    gguf_bytes = rows * qtype.row_bytes(cols)
    if qtype in (GGMLType.Q2_K, GGMLType.Q3_K):  # 8 bits per quant, int8 scales and mins per 16, 2 floats per 256
        assert packed.nbytes * 8 / (rows * cols) <= 8 + 1 + 0.25
    else:
        assert packed.nbytes <= 1.06 * gguf_bytes, (packed.nbytes, gguf_bytes)


def test_packed_matrix_is_frozen_and_reports_bytes():
    rng = np.random.default_rng(9)
    packed = pack(random_raw(GGMLType.Q4_K, 8, 256, rng), GGMLType.Q4_K, 256)
    assert isinstance(packed, PackedMatrix)
    # u4 quants 16 bytes + int8 scale + int8 min per 32 weights, float32 d and dmin per 256: 4.75 bits
    assert packed.nbytes == 8 * (256 // 32 * (16 + 1 + 1) + 4 + 4)
    with pytest.raises(AttributeError):
        packed.rows = 3


# --- threads --------------------------------------------------------------------------------------


def test_configure_threads_uses_openmp():
    assert configure_threads(1) == 1
    assert numba.get_num_threads() == 1
    assert numba.threading_layer() == "omp"
    assert configure_threads() == max_threads()
    with pytest.raises(ThreadingError, match="within"):
        configure_threads(max_threads() + 1)
    with pytest.raises(ThreadingError, match="already runs"):
        configure_threads(layer="workqueue")


# --- compiled code and the plain-Python mode -----------------------------------------------------


SCRIPT_NO_JIT = """
import numpy as np
from gguf import GGMLQuantizationType, quants
from kawai.kernels import matmul_simd
from kawai.kernels.matmul import matmul, pack
from kawai.kernels.qtypes import GGMLType
assert not matmul_simd.AVAILABLE
rng = np.random.default_rng(0)
for qtype in (GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q4_1, GGMLType.Q6_K, GGMLType.F16):
    cols = 256
    if qtype == GGMLType.Q6_K:  # random bits, sane scale
        raw = rng.integers(0, 64, (3, 210), dtype=np.uint8)
        raw[:, 208:210] = np.full(3, 0.01, "<f2").view(np.uint8).reshape(3, 2)
    else:
        w = rng.standard_normal((3, cols)).astype(np.float32)
        raw = quants.quantize(w, GGMLQuantizationType(int(qtype))).view(np.uint8).reshape(3, -1)
    ref_w = quants.dequantize(raw, GGMLQuantizationType(int(qtype))).reshape(3, cols).astype(np.float64)
    x = rng.standard_normal((5, cols)).astype(np.float32)
    y = matmul(pack(raw, qtype, cols), x)
    ref = x.astype(np.float64) @ ref_w.T
    err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert err < 1e-2, (qtype, err)
print("ok")
"""


def test_runs_without_jit():
    """NUMBA_DISABLE_JIT=1: the kernels run as Python (the portable path) and give the same results."""
    assert run_python(SCRIPT_NO_JIT, jit=False) == "ok"


def test_packed_matrix_rejects_inconsistent_arrays():
    """The kernels read without bounds checks, so a PackedMatrix checks its arrays when it is built."""
    good = pack(random_raw(GGMLType.Q5_0, 4, 64, np.random.default_rng(0)), GGMLType.Q5_0, 64)
    arrays = dict(scales=good.scales, mins=good.mins, group=32, offset=16)
    with pytest.raises(MatmulError, match="C-contiguous"):
        PackedMatrix(good.qtype, 4, 64, "u5", good.weights[:, :20], **arrays)
    with pytest.raises(MatmulError, match="C-contiguous"):
        PackedMatrix(good.qtype, 5, 64, "u5", good.weights, **arrays)
    with pytest.raises(MatmulError, match="C-contiguous"):  # float32 scales: not a stored scale type
        PackedMatrix(good.qtype, 4, 64, "u5", good.weights, **{**arrays, "scales": good.scales.astype(np.float32)})
    with pytest.raises(MatmulError, match="format"):
        PackedMatrix(good.qtype, 4, 64, "u7", good.weights, **arrays)
    with pytest.raises(MatmulError, match="per 32"):
        PackedMatrix(good.qtype, 4, 64, "u5", good.weights, **{**arrays, "group": 16})
    k = pack(random_raw(GGMLType.Q4_K, 4, 256, np.random.default_rng(1)), GGMLType.Q4_K, 256)
    with pytest.raises(MatmulError, match="C-contiguous"):  # int8 sub-scales need their super-scales
        PackedMatrix(k.qtype, 4, 256, "u4", k.weights, k.scales, k.mins, group=32)


RELEASE_PROBE = """
import os, threading
import numpy as np
from kawai.kernels.threads import _touch, configure_threads, release_threads
def tasks():
    return len(os.listdir("/proc/self/task"))
configure_threads(2)  # starts the threading layer, and a worker for the main thread
out = [tasks(), release_threads(), tasks()]
def loader():  # a thread that runs kernels, then hands over (engine.load on a server's worker thread)
    configure_threads(2)
    before = tasks()
    _touch(np.empty(64, np.int64))
    out.extend([before, tasks(), release_threads(), tasks()])
    x = np.zeros(64, np.int64)
    _touch(x)  # still launches after the release: the pool comes back
    out.extend([int(x.sum()), tasks()])
t = threading.Thread(target=loader); t.start(); t.join()
print(*out)
"""


@pytest.mark.skipif(max_threads() < 2 or not os.path.isdir("/proc/self/task"), reason="needs 2 threads, Linux")
def test_release_threads_ends_the_calling_threads_openmp_workers():
    """libgomp keeps a worker pool per launching thread; an idle one makes every other thread's workers
    sleep between launches (kernels/threads.py). release_threads ends the caller's pool, and only that."""
    out = subprocess.run([sys.executable, "-P", "-c", RELEASE_PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, "NUMBA_NUM_THREADS": "2"})
    main_pool, main_released, main_after, before, launched, released, after, total, relaunched = out.stdout.split()
    assert main_released == "True" and int(main_after) == int(main_pool) - 1
    assert int(launched) == int(before) + 1  # one worker joined this thread's launches
    assert released == "True" and int(after) == int(before)
    assert int(total) == sum(range(64)) and int(relaunched) == int(launched)


def test_openmp_threads_spin_briefly_unless_the_user_says_otherwise():
    """GOMP's long default spin made 2-thread decode ~7x slower on a busy machine; no spin at all made
    every launch wait for a sleeping thread (kernels/threads.py). A user's setting always wins."""
    from kawai.kernels.threads import SPIN_COUNT

    code = ("import os; from kawai.kernels.threads import configure_threads; configure_threads(1); "
            "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}

    def settings(**extra):
        # -P: the repo root is never a top-level package (a "kernels.threads" would poison Numba's cache)
        out = subprocess.run([sys.executable, "-P", "-c", code], env={**env, **extra}, capture_output=True,
                             text=True, check=True)
        return out.stdout.split()

    assert settings() == [SPIN_COUNT, "None"]
    assert settings(OMP_WAIT_POLICY="passive") == ["None", "passive"]
    assert settings(GOMP_SPINCOUNT="5") == ["5", "None"]
