"""kernels/matmul_amx.py: the AMX prefill matmul, where the CPU has the tiles and the OS grants them.

Its definition is bf16(x) @ bf16(W).T (each side rounded to bfloat16, to nearest even; `bf16_round`), which
it must match to float32 summation; against float64 x @ dequant(W).T it is ~2.5e-3 of the output norm.
precise=True (x_hi.W_hi + x_lo.W_hi + x_hi.W_lo, each part bfloat16) must be within the bound the precise
vector path meets (tests/kernels/test_matmul_precise.py). On other CPUs the AMX tests skip; the rounding
reference runs everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from kawai.engine.gguf import open_gguf
from kawai.kernels import matmul_amx as amx
from kawai.kernels.formats import PACKED_TYPES
from kawai.kernels.matmul import matmul, matmul_fused, pack, pack_dense, tile_rows, unpack
from kawai.kernels.qtypes import GGMLType
from kawai.kernels.threads import configure_threads
from test_matmul import random_raw

needs_amx = pytest.mark.skipif(not amx.AVAILABLE, reason="no AMX tiles on this CPU (or the OS refused them)")
PLAIN_BOUND = 6e-3  # bfloat16 both sides, against float64 (measured ~2.5e-3 on random blocks)
PRECISE_BOUND = 3e-5  # the three bfloat16 parts (measured ~4e-6)


@pytest.fixture(scope="module", autouse=True)
def _threads():
    configure_threads()


def random_packed(qtype: GGMLType, rows: int, cols: int, rng: np.random.Generator):
    """Raw blocks of qtype (tests/kernels/test_matmul.py `random_raw`) and their packed matrix."""
    raw = random_raw(qtype, rows, cols, rng)
    return raw, pack(raw, qtype, cols)


def rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(y.astype(np.float64) - ref) / np.linalg.norm(ref))


def test_bf16_round_is_nearest_even():
    ulp = 2.0**-7  # bfloat16 spacing in [1, 2)
    x = np.array([1.0, 1 + ulp / 2, 1 + 1.5 * ulp, 1 + 0.7 * ulp, -3.0e-30, 65504.0], np.float32)
    got = amx.bf16_round(x)
    assert got[0] == 1.0 and got[1] == 1.0  # a tie goes to the even neighbour
    assert got[2] == np.float32(1 + 2 * ulp) and got[3] == np.float32(1 + ulp)
    assert abs(got[4] / x[4] - 1) < 2**-8 and got[5] == 65536.0
    assert np.all(amx.bf16_round(got) == got)  # bfloat16 values are fixed points


# every packed type; block counts that leave a partial block of KB steps (9, 3, 24); rows not a multiple of 32
COLS = {GGMLType.Q8_0: 288, GGMLType.Q4_1: 96, GGMLType.Q4_K: 768}


@needs_amx
@pytest.mark.parametrize("qtype", sorted(PACKED_TYPES), ids=lambda t: t.name)
def test_every_format_matches_the_bfloat16_definition(qtype):
    rng = np.random.default_rng(int(qtype))
    cols = COLS.get(qtype, 256)
    raw, w = random_packed(qtype, 37, cols, rng)
    x = rng.standard_normal((45, cols)).astype(np.float32)  # a full token pair and a partial one
    assert tile_rows(len(x)) == len(x)
    y = matmul(w, x)
    xb, wb = amx.bf16_round(x).astype(np.float64), amx.bf16_round(unpack(w)).astype(np.float64)
    definition = xb @ wb.T
    assert np.all(np.abs(y - definition) <= 1e-5 * (np.abs(xb) @ np.abs(wb).T))  # float32 sums of exact products
    oracle = x.astype(np.float64) @ gguf_quants.dequantize(raw, GGMLQuantizationType(int(qtype))).reshape(
        37, cols).astype(np.float64).T
    assert rel_err(y, oracle) < PLAIN_BOUND
    precise = matmul_fused([w], x, precise=True)[0]
    assert rel_err(precise, oracle) < PRECISE_BOUND


@needs_amx
def test_real_tensors_of_the_default_model(default_model_path):
    """Each weight type of the default model (the Q8_0 output projection included), plain and precise."""
    gguf = open_gguf(default_model_path)
    rng = np.random.default_rng(7)
    seen = set()
    for name in ["output.weight", "blk.0.attn_q.weight", "blk.0.ffn_gate.weight", "blk.0.ffn_down.weight",
                 "blk.2.ffn_down.weight"]:
        info = gguf.tensors[name]
        qtype, cols = GGMLType(info.ggml_type), int(info.shape[-1])
        raw = np.ascontiguousarray(gguf.tensor_data(name)[:96])
        w = pack(raw, qtype, cols)
        x = rng.standard_normal((40, cols)).astype(np.float32)
        x[:, rng.choice(cols, 3, replace=False)] *= 40  # outlier channels, as real activations have
        oracle = x.astype(np.float64) @ gguf_quants.dequantize(raw, GGMLQuantizationType(int(qtype))).reshape(
            len(raw), cols).astype(np.float64).T
        assert rel_err(matmul(w, x), oracle) < PLAIN_BOUND, name
        assert rel_err(matmul_fused([w], x, precise=True)[0], oracle) < PRECISE_BOUND, name
        seen.add(qtype)
    assert {GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q4_K, GGMLType.Q6_K} <= seen


@needs_amx
def test_a_token_does_not_depend_on_its_call():
    """Any call of MIN_TOKENS tokens or more gives a token the same output, bit for bit (each sum runs over
    the inputs in the same order whatever tiles it shares); below that, the vector path, row by row."""
    rng = np.random.default_rng(11)
    _, w = random_packed(GGMLType.Q4_K, 70, 512, rng)
    x = rng.standard_normal((100, 512)).astype(np.float32)
    whole = matmul(w, x)
    np.testing.assert_array_equal(matmul(w, x[30:30 + amx.MIN_TOKENS]), whole[30:30 + amx.MIN_TOKENS])
    np.testing.assert_array_equal(matmul(w, x[5:90]), whole[5:90])
    few = x[:amx.MIN_TOKENS - 1]
    assert tile_rows(len(few)) == 0
    np.testing.assert_array_equal(matmul(w, few), np.concatenate([matmul(w, row[None]) for row in few]))
    # the engine's choice: the first rows on the tiles (whatever their count), the rest on vectors
    mixed = matmul(w, x[:40], tiles=3)
    np.testing.assert_array_equal(mixed[:3], matmul(w, x[:3], tiles=3))
    np.testing.assert_array_equal(mixed[3:], matmul(w, x[3:40], tiles=0))
    np.testing.assert_array_equal(mixed[3:4], matmul(w, x[3:4]))


@needs_amx
def test_threads_split_rows_not_sums():
    rng = np.random.default_rng(12)
    _, w = random_packed(GGMLType.Q6_K, 100, 512, rng)
    x = rng.standard_normal((64, 512)).astype(np.float32)
    try:
        configure_threads(1)
        one = matmul(w, x)
    finally:
        configure_threads()
    np.testing.assert_array_equal(matmul(w, x), one)


@needs_amx
def test_dense_and_packed_weights_in_one_call():
    rng = np.random.default_rng(13)
    dense = pack_dense(rng.standard_normal((24, 256)).astype(np.float32))
    _, packed = random_packed(GGMLType.Q8_0, 40, 256, rng)
    x = rng.standard_normal((33, 256)).astype(np.float32)
    yd, yp = matmul_fused([dense, packed], x)
    np.testing.assert_array_equal(yd, matmul(dense, x))  # float32 dense products, untouched
    np.testing.assert_array_equal(yp, matmul(packed, x))
    yd_precise, _ = matmul_fused([dense, packed], x, precise=True)
    np.testing.assert_array_equal(yd_precise, yd)


def test_activation_tiles_layout():
    """B tiles: per token tile and step of 32 inputs, 16 pairs x 16 tokens x 2 (bfloat16 bits); padded
    tokens are zero; precise: the steps of x_hi, then x_lo = x - x_hi, then x_hi again."""
    rng = np.random.default_rng(14)
    x = rng.standard_normal((20, 64)).astype(np.float32)
    for precise in (False, True):
        xb = amx.activation_tiles(x, precise)
        segments = amx.SEGMENTS[precise]
        tiles = xb.reshape(2, segments * 2, 16, 16, 2)  # (token tiles, steps, pairs, tokens, 2)
        values = (tiles.astype(np.uint32) << 16).view(np.float32)
        padded = np.zeros((32, 64), np.float32)
        padded[:20] = x
        hi = amx.bf16_round(padded)
        # element (tile T, step k, pair p, token t, e) is input 32 k + 2 p + e of token 16 T + t
        as_x = values.transpose(0, 3, 1, 2, 4).reshape(32, segments * 64)
        np.testing.assert_array_equal(as_x[:, :64], hi)
        if precise:
            np.testing.assert_array_equal(as_x[:, 64:128], amx.bf16_round(padded - hi))
            np.testing.assert_array_equal(as_x[:, 128:], hi)
