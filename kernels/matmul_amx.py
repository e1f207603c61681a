"""Prefill matmuls on AMX tiles (Intel Sapphire Rapids and later), where the CPU has them and the OS
grants them (kernels/isa.py: ISA "amx"), in bfloat16 with float32 sums.

AMX adds eight tile registers of 16 rows x 64 bytes and an instruction that multiplies two of them into a
third: `tdpbf16ps C, A, B` adds to each float32 C[i, j] the dot product of row i of A (32 bfloat16) with
column j of B (stored in pairs: tile row p holds, for each of the 16 columns, elements 2p and 2p + 1).
That is 16 x 16 x 32 multiply-adds in one instruction, 8x a 512-bit FMA. Here, per step of 32 inputs:

    A   16 weight rows: the step's 32 weights of each, dequantized (scale * (q - offset) + min, float32,
        as kernels/matmul.py `unpack` forms them) and rounded to bfloat16 (`decode_rows`, once per chunk
        of rows and call)
    B   16 tokens' 32 activations, rounded to bfloat16, in pairs (`layout_activations`, once per call)
    C   16 weight rows x 16 tokens of float32 sums, kept in the tile over all the steps

Four C tiles (2 row tiles x 2 token tiles) share each loaded A and B tile (`tile_steps`). The sums never
leave the tiles until the row is done: no per-block scale multiply, as the integer paths need (an int8
AMX kernel, tdpbssd with the scales applied per 32-weight group, measured ~25% slower: storing and
converting each group's int32 tile cost more than the multiply).

Precision: bfloat16 keeps 8 significant bits, so each product is off by up to ~2^-8 relative, randomly;
measured on random blocks, the output's error against float64 is ~0.25% of its norm, against ~0.55% for
the int8 activations of the vector paths (tests/kernels/test_matmul_amx.py). `precise=True` (the q, k, v
projections, see kernels/matmul_precise.py) splits both sides, x = x_hi + x_lo and W = W_hi + W_lo, each
part bfloat16, and sums W_hi.x_hi + W_hi.x_lo + W_lo.x_hi: three segments along the inputs of one call,
~16 significant bits. Results differ from the vector paths by that rounding: a token's output depends on
whether its call ran here (MIN_TOKENS tokens or more: a prompt's chunk) or there (a decode step).

Work per call: the weight rows in chunks of 32 (`prange`): decode the chunk (32 rows x C bfloat16, in the
A tiles' layout), then per block of KB steps (the chunk's A tiles of those steps stay in L1) and per
pair of token tiles, load the four C tiles, run the steps, store them (`tile_steps`); at the end copy the
chunk's sums into y. Each thread loads the tile configuration (`CONFIG`) before its first tile
instruction and releases the tiles after; the OS's permission was asked for once, by kernels/isa.py.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from kawai.kernels import matmul_simd as simd
from kawai.kernels.isa import ISA

AVAILABLE = ISA == "amx"
TILE = 16  # weight rows, and tokens, per tile
STEP = 32  # inputs per tile step (one A row: 32 bfloat16)
ROWS = 2 * TILE  # weight rows per work item (two row tiles)
PAIR = 2 * TILE  # tokens per pass (two token tiles)
KB = 8  # steps per block: the chunk's A tiles of a block (16 KiB) stay in L1 while every token pair runs
MIN_TOKENS = 32  # fewer tokens run on the vector path: decoding the weights to bfloat16 costs ~20 tokens
SEGMENTS = {False: 1, True: 3}  # steps per 32 inputs: plain, or precise (hi.hi + hi.lo + lo.hi)

_I8, _I16, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
_PTR = _I8.as_pointer()
_VOID = ir.VoidType()


def _config() -> np.ndarray:
    """The 64-byte tile configuration: palette 1, then per tile its bytes per row (u16 at 16 + 2i) and
    rows (u8 at 48 + i): all eight tiles 16 x 64 bytes (C0-3 float32, A0-1 and B0-1 bfloat16)."""
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1
    cfg[16:32].view(np.uint16)[:] = 64
    cfg[48:56] = 16
    return cfg


CONFIG = _config()


def _splat(builder, value, n: int):
    """<n x T> of the scalar value."""
    v = builder.insert_element(ir.Constant(ir.VectorType(value.type, n), None), value, ir.Constant(_I32, 0))
    return simd._shuffle(builder, v, v, [0] * n)


def _data(context, builder, ty, value):
    return cgutils.create_struct_proxy(ty)(context, builder, value=value).data


def _flat(arr, dtype) -> bool:
    return isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C" and arr.dtype == dtype


class _BFloat(ir.Type):
    """LLVM's bfloat type (llvmlite has none): only what the IR text needs."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash("bfloat")


def _bf16(builder, v):
    """<32 x float> -> (<32 x i16> bfloat16 bits rounded to nearest even, <32 x float> their value):
    one vcvtne2ps2bf16 (AVX512-BF16, which every AMX CPU has; it reads subnormal inputs as zero)."""
    halves = [simd._shuffle(builder, v, v, range(16 * h, 16 * h + 16))
              for h in (1, 0)]  # the instruction's first operand fills the upper half
    bf = simd._call(builder, "llvm.x86.avx512bf16.cvtne2ps2bf16.512", ir.VectorType(_BFloat(), 32), halves)
    bits = builder.bitcast(bf, ir.VectorType(_I16, 32))
    value = builder.bitcast(builder.shl(builder.zext(bits, ir.VectorType(_I32, 32)),
                                        _splat(builder, ir.Constant(_I32, 16), 32)), v.type)
    return bits, value


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> the float32 value of its bfloat16 rounding (nearest even): the NumPy definition."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


@intrinsic
def tile_config(typingctx, cfg):
    """Load the tile configuration cfg (64,) uint8 into this thread's tile registers (ldtilecfg)."""
    if not _flat(cfg, types.uint8):
        return None

    def codegen(context, builder, sig, args):
        cfg_ptr = builder.bitcast(_data(context, builder, sig.args[0], args[0]), _PTR)
        simd._call(builder, "llvm.x86.ldtilecfg", _VOID, [cfg_ptr])
        return context.get_dummy_value()

    return types.void(cfg), codegen


@intrinsic
def tile_release(typingctx):
    """Return this thread's tiles to their initial state (the OS then saves no tile data on a switch)."""

    def codegen(context, builder, sig, args):
        simd._call(builder, "llvm.x86.tilerelease", _VOID, [])
        return context.get_dummy_value()

    return types.void(), codegen


def _make_decode(fmt: str, with_min: bool, segments: int):
    groups = simd.GROUPS[fmt]
    per_super = simd.SUPER_BLOCKS * groups

    @intrinsic
    def decode_row(typingctx, w, w_off, s, m, ss, sm, g_off, offset, n_blocks, dst, dst_off):
        """One weight row's blocks (bytes from w_off of w, groups from g_off of s, m, ss, sm) as bfloat16
        weights scale * (q - offset) (+ min): block b's 32 at dst[dst_off + b * ROWS * 32:+32] (uint16);
        with 3 segments also W_hi again at step B + b and W_lo = bf16(W - W_hi) at step 2B + b."""
        if not (_flat(w, types.uint8) and _flat(dst, types.uint16) and s.dtype in (types.uint16, types.int8)):
            return None
        scale_type = s.dtype

        def codegen(context, builder, sig, args):
            wp, sp, mp, ssp, smp, dp = (_data(context, builder, sig.args[i], args[i]) for i in (0, 2, 3, 4, 5, 9))
            w_at, g_at, off, nb, to = (context.cast(builder, args[i], sig.args[i], types.int64)
                                       for i in (1, 6, 7, 8, 10))
            i64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
            v32f = ir.VectorType(_F32, 32)

            def value(small, big, g):
                """Group g's scale (or min) in float32, as simd.group_value forms it."""
                at = builder.add(g_at, g)
                if scale_type == types.uint16:  # float16 bits
                    return builder.fpext(builder.bitcast(builder.load(builder.gep(small, [at])), ir.HalfType()), _F32)
                sub = builder.sitofp(builder.load(builder.gep(small, [at])), _F32)
                return builder.fmul(builder.load(builder.gep(big, [builder.sdiv(at, i64(per_super))])), sub)

            def spread(ptr, big, g0):
                """The block's groups' values over its 32 weights."""
                vals = [_splat(builder, value(ptr, big, builder.add(g0, i64(g))), 32 // groups) for g in range(groups)]
                if groups == 1:
                    return vals[0]
                return simd._shuffle(builder, vals[0], vals[1], range(32))

            def store(bits, step):
                ptr = builder.gep(dp, [builder.add(to, builder.mul(step, i64(ROWS * STEP)))])
                builder.store(bits, builder.bitcast(ptr, bits.type.as_pointer()), align=2)

            with cgutils.for_range(builder, nb) as loop:
                b = loop.index
                q = simd._decode_block(builder, wp, builder.add(w_at, builder.mul(b, i64(simd.BLOCK_BYTES[fmt]))), fmt)
                q = builder.sub(q, _splat(builder, builder.trunc(off, _I8), 32))
                g0 = builder.mul(b, i64(groups))
                weights = builder.fmul(builder.sitofp(q, v32f), spread(sp, ssp, g0))
                if with_min:
                    weights = builder.fadd(weights, spread(mp, smp, g0))
                hi, hi_value = _bf16(builder, weights)
                store(hi, b)
                if segments == 3:
                    store(hi, builder.add(b, nb))
                    store(_bf16(builder, builder.fsub(weights, hi_value))[0], builder.add(b, builder.mul(nb, i64(2))))
            return context.get_dummy_value()

        return types.void(w, w_off, s, m, ss, sm, g_off, offset, n_blocks, dst, dst_off), codegen

    return decode_row


@intrinsic
def tile_steps(typingctx, wa, xb, acc, k0, nk, n_steps, pair, first):
    """The four C tiles of a chunk's two row tiles (A: wa (steps, 2, 16, 32) bfloat16) and token pair
    `pair`'s two tiles (B: xb (tiles, steps, 16 pairs, 16, 2) bfloat16) over steps k0..k0+nk: acc (4, 16,
    16) float32 holds them between calls (C[2h + a] = row tile h x token tile a), zero when `first`."""
    if not (_flat(wa, types.uint16) and _flat(xb, types.uint16) and _flat(acc, types.float32)):
        return None

    def codegen(context, builder, sig, args):
        wp, xp, ap = (_data(context, builder, sig.args[i], args[i]) for i in range(3))
        k0_, nk_, steps, pair_ = (context.cast(builder, args[i], sig.args[i], types.int64) for i in range(3, 7))
        fresh = context.cast(builder, args[7], sig.args[7], types.boolean)
        i8 = lambda v: ir.Constant(_I8, v)  # noqa: E731
        i64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
        tile_bytes = i64(64)  # every tile row is 64 bytes

        def at(ptr, index):
            return builder.bitcast(builder.gep(ptr, [index]), _PTR)

        with builder.if_else(fresh) as (then, otherwise):
            with then:
                for c in range(4):
                    simd._call(builder, "llvm.x86.tilezero", _VOID, [i8(c)])
            with otherwise:
                for c in range(4):
                    simd._call(builder, "llvm.x86.tileloadd64", _VOID,
                               [i8(c), at(ap, i64(TILE * TILE * c)), tile_bytes])
        with cgutils.for_range(builder, nk_) as loop:
            k = builder.add(k0_, loop.index)
            for h in range(2):  # A: row tile h of step k
                index = builder.mul(builder.add(builder.mul(k, i64(2)), i64(h)), i64(TILE * STEP))
                simd._call(builder, "llvm.x86.tileloadd64", _VOID, [i8(4 + h), at(wp, index), tile_bytes])
            for a in range(2):  # B: token tile 2 pair + a, step k
                tile = builder.add(builder.mul(pair_, i64(2)), i64(a))
                index = builder.mul(builder.add(builder.mul(tile, steps), k), i64(TILE * STEP))
                simd._call(builder, "llvm.x86.tileloadd64", _VOID, [i8(6 + a), at(xp, index), tile_bytes])
            for h in range(2):
                for a in range(2):
                    simd._call(builder, "llvm.x86.tdpbf16ps", _VOID, [i8(2 * h + a), i8(4 + h), i8(6 + a)])
        for c in range(4):
            simd._call(builder, "llvm.x86.tilestored64", _VOID,
                       [i8(c), at(ap, i64(TILE * TILE * c)), tile_bytes])
        return context.get_dummy_value()

    return types.void(wa, xb, acc, k0, nk, n_steps, pair, first), codegen


@njit(cache=True)
def _bf16_bits(v):
    """The bfloat16 bits of float32 v, rounded to nearest even, and their float32 value."""
    bits = int(np.float32(v).view(np.uint32))
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded, np.uint32(rounded << 16).view(np.float32)


@njit(parallel=True, cache=True)
def layout_activations(x, segments, xb):
    """x (n, C) float32 -> xb (T, segments * C/32, 16 pairs, 16 tokens, 2) bfloat16 bits, T = 2 ceil(n/32)
    token tiles padded with zeros; with 3 segments the steps of x_hi, then x_lo = x - x_hi, then x_hi."""
    n, cols = x.shape
    blocks = cols // STEP
    steps = segments * blocks
    for tile in prange(xb.shape[0] // (steps * TILE * STEP)):
        for t in range(TILE):
            tok = tile * TILE + t
            for j in range(cols):
                hi, lo = 0, 0
                if tok < n:
                    hi, hi_value = _bf16_bits(x[tok, j])
                    if segments == 3:
                        lo = _bf16_bits(x[tok, j] - hi_value)[0]
                k, e = j // STEP, j % STEP
                within = (e // 2) * 2 * TILE + 2 * t + e % 2
                xb[(tile * steps + k) * TILE * STEP + within] = hi
                if segments == 3:
                    xb[(tile * steps + blocks + k) * TILE * STEP + within] = lo
                    xb[(tile * steps + 2 * blocks + k) * TILE * STEP + within] = hi


def activation_tiles(x: np.ndarray, precise: bool = False) -> np.ndarray:
    """x (n, C) float32 -> its bfloat16 B tiles for `gemm` (see layout_activations)."""
    n, cols = x.shape
    segments = SEGMENTS[precise]
    xb = np.empty(2 * ((n + PAIR - 1) // PAIR) * segments * cols * TILE, np.uint16)
    layout_activations(x, segments, xb)
    return xb


def _make_gemm(fmt: str):
    decoders = {(mn, seg): _make_decode(fmt, mn, seg) for mn in (False, True) for seg in (1, 3)}
    plain1, min1, plain3, min3 = decoders[(False, 1)], decoders[(True, 1)], decoders[(False, 3)], decoders[(True, 3)]
    groups = simd.GROUPS[fmt]

    @njit(parallel=True, cache=True)
    def gemm(w, s, m, ss, sm, offset, segments, xb, n, y):
        """y (n, R) = x @ W.T for packed weights w (R, B*P) of this format: scales s (R, B*G) (float16 bits,
        or int8 with super-scales ss (R, B // 8)), mins m, sm alike or (R, 0), `offset` of the stored
        quants; xb the activations' B tiles (`activation_tiles`) with `segments` steps per 32 inputs."""
        rows, row_bytes = w.shape
        n_groups = s.shape[1]
        n_blocks = n_groups // groups
        steps = segments * n_blocks
        with_min = m.shape[1] > 0
        wf, sf, mf, ssf, smf = w.reshape(-1), s.reshape(-1), m.reshape(-1), ss.reshape(-1), sm.reshape(-1)
        n_pairs = (n + PAIR - 1) // PAIR
        for c in prange((rows + ROWS - 1) // ROWS):
            r_lo = c * ROWS
            n_r = min(rows, r_lo + ROWS) - r_lo
            wa = np.empty(steps * ROWS * STEP, np.uint16)  # (steps, 2, 16, 32)
            if n_r < ROWS:  # the last chunk: rows past the matrix multiply as zeros
                wa[:] = 0
            for i in range(n_r):
                r = r_lo + i
                if segments == 1 and with_min:
                    min1(wf, r * row_bytes, sf, mf, ssf, smf, r * n_groups, offset, n_blocks, wa, i * STEP)
                elif segments == 1:
                    plain1(wf, r * row_bytes, sf, mf, ssf, smf, r * n_groups, offset, n_blocks, wa, i * STEP)
                elif with_min:
                    min3(wf, r * row_bytes, sf, mf, ssf, smf, r * n_groups, offset, n_blocks, wa, i * STEP)
                else:
                    plain3(wf, r * row_bytes, sf, mf, ssf, smf, r * n_groups, offset, n_blocks, wa, i * STEP)
            acc = np.empty(n_pairs * 4 * TILE * TILE, np.float32)  # (pairs, 4 C tiles, 16 rows, 16 tokens)
            tile_config(CONFIG)
            for k0 in range(0, steps, KB):
                for p in range(n_pairs):
                    tile_steps(wa, xb, acc[p * 4 * TILE * TILE:(p + 1) * 4 * TILE * TILE], k0, min(KB, steps - k0),
                               steps, p, k0 == 0)
            tile_release()
            for p in range(n_pairs):
                for a in range(2):
                    for t in range(TILE):
                        tok = p * PAIR + a * TILE + t
                        if tok < n:
                            for i in range(n_r):
                                y[tok, r_lo + i] = acc[((p * 4 + 2 * (i // TILE) + a) * TILE + i % TILE) * TILE + t]

    return gemm


GEMMS = {code: _make_gemm(fmt) for fmt, code in simd.FORMAT_CODES.items()} if AVAILABLE else {}
