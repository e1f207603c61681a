"""AVX2 dot products of packed weight blocks with int8 activations, as Numba intrinsics in LLVM IR.

Numba's default pipeline leaves the 32-element block loops of a quantized dot product scalar (its SLP
vectorizer is off), so the innermost work is emitted here directly. Per block of 32 weights:

    vpmaddubsw(u8 weights, i8 activations) -> 16 x i16 pair sums   (|pair| <= 2 * 128 * 127: no saturation)
    vpmaddwd(.., 1)                        -> 8 x i32
    vcvtdq2ps, vfmadd by (block scale * activation scale) into an 8-lane float accumulator

and one horizontal sum per output. Signed weights ("s8", Q8_0) use the sign trick: |w| as the unsigned
operand, x with w's sign as the signed one. The call

    dot_<fmt>_t<NT>(w, w_off, s, m, g_off, x, xd, xqsum, t0, B, bias_factor)

computes, for one weight row (its B blocks from byte w_off of the flat uint8 w, its groups from g_off of
the flat float32 s and m) and NT tokens t = t0 + i (NT = 1: a float, NT = 4: a tuple),

    out[i] = sum_b sum_g s[b*G + g] * xd[t*B + b] * isum(t, b, g)  +  bias_factor * sum_bg m * xqsum
    isum   = sum over the weights k of group g of block b: q[b, k] * x[t*B*32 + b*32 + k]

where xqsum[t*B*G + b*G + g] is the sum of the quantized x over the group times xd, and m holds the
mins (bias_factor 1) or, for formats with an offset, the scales (bias_factor = -offset). The quants q are
decoded from each block by format:

    "s8"  32 bytes per block: int8 quants                                             G = 1
    "u8"  32 bytes: unsigned quants 0..63, a scale per 16 weights                      G = 2
    "u4"  16 bytes: element j in the low nibble of byte j, element j + 16 in its high nibble   G = 1
    "u5"  20 bytes: the "u4" nibbles, then a little-endian u32 with the 5th bit of element j at bit j

"s8" has no bias term (its m and bias_factor are ignored). The other formats' bias term is a dot product
of the row's m with xqsum, computed after the blocks, 8 groups per vector FMA.

Each token's output goes through the same operations whatever NT is, so a prefill row equals the same
token computed alone, bit for bit. The intrinsics exist where `AVAILABLE` (x86-64 with
AVX2 and FMA, JIT on). Elsewhere, and with NUMBA_DISABLE_JIT=1, the same names are plain-loop Numba
functions over `dot_portable`, which is also the definition the intrinsics are tested against.

Numba caches the kernels that call these intrinsics by their own source file only: after editing this
file, clear kernels/__pycache__/*.nbi and *.nbc.
"""

from __future__ import annotations

import llvmlite.binding as llvm_binding
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

BLOCK_BYTES = {"s8": 32, "u8": 32, "u4": 16, "u5": 20}
GROUPS = {"s8": 1, "u8": 2, "u4": 1, "u5": 1}  # scales per block of 32
SIGNED_FORMATS = frozenset({"s8"})  # signed quants: no bias term
FMT_S8, FMT_U8, FMT_U4, FMT_U5 = 0, 1, 2, 3  # format codes passed to the Numba kernels
FORMAT_CODES = {"s8": FMT_S8, "u8": FMT_U8, "u4": FMT_U4, "u5": FMT_U5}


def _host_has_avx2_fma() -> bool:
    features = llvm_binding.get_host_cpu_features()
    return bool(features.get("avx2", False) and features.get("fma", False))


AVAILABLE = not numba.config.DISABLE_JIT and _host_has_avx2_fma()

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F32 = ir.FloatType()


def _vec(t: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(t, n)


def _consts(t: ir.Type, values) -> ir.Constant:
    return ir.Constant(_vec(t, len(values)), [ir.Constant(t, v) for v in values])


def _shuffle(builder: ir.IRBuilder, a, b, indices):
    return builder.shuffle_vector(a, b, _consts(_I32, list(indices)))


def _splat(builder: ir.IRBuilder, value, n: int):
    v = builder.insert_element(ir.Constant(_vec(value.type, n), None), value, ir.Constant(_I32, 0))
    return _shuffle(builder, v, v, [0] * n)


def _load(builder: ir.IRBuilder, base_ptr, offset, ty: ir.Type):
    """Load a value of type `ty` from base_ptr + offset elements (unaligned)."""
    return builder.load(builder.bitcast(builder.gep(base_ptr, [offset]), ty.as_pointer()), align=1)


def _call(builder: ir.IRBuilder, name: str, ret: ir.Type, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _decode_block(builder: ir.IRBuilder, wp, w_off, fmt: str):
    """The 32 quants of the block at byte w_off, as <32 x i8>."""
    if fmt in ("s8", "u8"):
        return _load(builder, wp, w_off, _vec(_I8, 32))
    packed = _load(builder, wp, w_off, _vec(_I8, 16))
    low = builder.and_(packed, _consts(_I8, [15] * 16))
    high = builder.lshr(packed, _consts(_I8, [4] * 16))
    q = _shuffle(builder, low, high, range(32))
    if fmt == "u5":
        bits = _load(builder, wp, builder.add(w_off, ir.Constant(_I64, 16)), _vec(_I8, 4))
        spread = _shuffle(builder, bits, bits, [j // 8 for j in range(32)])  # byte j // 8 holds bit j
        masked = builder.and_(spread, _consts(_I8, [1 << (j % 8) for j in range(32)]))
        hit = builder.icmp_unsigned("!=", masked, _consts(_I8, [0] * 32))
        q = builder.or_(q, builder.select(hit, _consts(_I8, [16] * 32), _consts(_I8, [0] * 32)))
    return q


def _hsum8(builder: ir.IRBuilder, v):
    """Sum of a <8 x float> in a fixed tree order."""
    v = builder.fadd(_shuffle(builder, v, v, range(4)), _shuffle(builder, v, v, range(4, 8)))
    v = builder.fadd(_shuffle(builder, v, v, range(2)), _shuffle(builder, v, v, range(2, 4)))
    return builder.fadd(builder.extract_element(v, ir.Constant(_I32, 0)),
                        builder.extract_element(v, ir.Constant(_I32, 1)))


def _emit_dot(context, builder, sig, args, fmt: str, nt: int):
    """IR for one weight row x NT tokens (see the module docstring); returns the NT outputs.

    Each token has its own accumulators and sees the same operations whatever NT is."""
    wp, sp, mp, xp, xdp, xqp = (cgutils.create_struct_proxy(sig.args[i])(context, builder, value=args[i]).data
                                for i in (0, 2, 3, 5, 6, 7))
    w_off, g_off, t0, n_blocks = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (1, 4, 8, 9))
    bias_factor = context.cast(builder, args[10], sig.args[10], types.float32)
    i64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
    v32i8, v16i16, v8i32, v8f32 = _vec(_I8, 32), _vec(_I16, 16), _vec(_I32, 8), _vec(_F32, 8)
    ones16 = _consts(_I16, [1] * 16)
    n_groups = GROUPS[fmt]
    signed = fmt in SIGNED_FORMATS
    accs = [cgutils.alloca_once_value(builder, ir.Constant(v8f32, None)) for _ in range(nt)]
    biases = [cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0)) for _ in range(nt)]

    def block(b):
        q = _decode_block(builder, wp, builder.add(w_off, builder.mul(b, i64(BLOCK_BYTES[fmt]))), fmt)
        if signed:
            q_abs = _call(builder, "llvm.abs.v32i8", v32i8, [q, ir.Constant(ir.IntType(1), 0)])
        g_at = builder.add(g_off, builder.mul(b, i64(n_groups)))
        group_scales = [_load(builder, sp, builder.add(g_at, i64(g)), _F32) for g in range(n_groups)]
        if n_groups == 1:
            scale = _splat(builder, group_scales[0], 8)
        else:  # lanes 0-3 sum elements 0-15, lanes 4-7 elements 16-31
            pair = builder.insert_element(_splat(builder, group_scales[0], 2), group_scales[1], ir.Constant(_I32, 1))
            scale = _shuffle(builder, pair, pair, [0, 0, 0, 0, 1, 1, 1, 1])
        for i in range(nt):
            blk = builder.add(builder.mul(n_blocks, builder.add(t0, i64(i))), b)  # token t0+i, block b
            x = _load(builder, xp, builder.mul(blk, i64(32)), v32i8)
            dx = _splat(builder, _load(builder, xdp, blk, _F32), 8)
            if signed:  # sign trick: |q| (unsigned) times x with q's sign
                signed_x = _call(builder, "llvm.x86.avx2.psign.b", v32i8, [x, q])
                pairs = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", v16i16, [q_abs, signed_x])
            else:
                pairs = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", v16i16, [q, x])
            quads = _call(builder, "llvm.x86.avx2.pmadd.wd", v8i32, [pairs, ones16])
            total = _call(builder, "llvm.fma.v8f32", v8f32,
                          [builder.sitofp(quads, v8f32), builder.fmul(scale, dx), builder.load(accs[i])])
            builder.store(total, accs[i])

    def bias_terms():
        """sum over the row's groups of m * xqsum, per token: 8 groups per vector FMA, then the tail."""
        n_all = builder.mul(n_blocks, i64(n_groups))  # B*G groups per row and per token
        vec_accs = [cgutils.alloca_once_value(builder, ir.Constant(v8f32, None)) for _ in range(nt)]
        with cgutils.for_range(builder, builder.sdiv(n_all, i64(8))) as loop:
            at = builder.mul(loop.index, i64(8))
            coefs = _load(builder, mp, builder.add(g_off, at), v8f32)
            for i in range(nt):
                sums = _load(builder, xqp, builder.add(builder.mul(n_all, builder.add(t0, i64(i))), at), v8f32)
                builder.store(_call(builder, "llvm.fma.v8f32", v8f32, [coefs, sums, builder.load(vec_accs[i])]),
                              vec_accs[i])
        for i in range(nt):
            builder.store(_hsum8(builder, builder.load(vec_accs[i])), biases[i])
        with cgutils.for_range(builder, builder.srem(n_all, i64(8))) as loop:
            at = builder.add(builder.mul(builder.sdiv(n_all, i64(8)), i64(8)), loop.index)
            coef = _load(builder, mp, builder.add(g_off, at), _F32)
            for i in range(nt):
                xq_sum = _load(builder, xqp, builder.add(builder.mul(n_all, builder.add(t0, i64(i))), at), _F32)
                builder.store(_call(builder, "llvm.fma.f32", _F32, [coef, xq_sum, builder.load(biases[i])]),
                              biases[i])

    with cgutils.for_range(builder, n_blocks) as loop:
        block(loop.index)
    if not signed:
        bias_terms()
    outs = []
    for k, acc in enumerate(accs):
        out = _hsum8(builder, builder.load(acc))
        if not signed:
            out = builder.fadd(out, builder.fmul(bias_factor, builder.load(biases[k])))
        outs.append(out)
    return outs[0] if nt == 1 else context.make_tuple(builder, sig.return_type, outs)


def _make_intrinsic(fmt: str, nt: int):
    @intrinsic
    def dot(typingctx, w, w_off, s, m, g_off, x, xd, xqsum, t0, n_blocks, bias_factor):
        # The IR reads raw data pointers: only flat C-contiguous arrays of the expected dtypes type-check.
        expected = {w: types.uint8, s: types.float32, m: types.float32, x: types.int8, xd: types.float32,
                    xqsum: types.float32}
        for arr, dtype in expected.items():
            if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C" and arr.dtype == dtype):
                return None
        ret = types.float32 if nt == 1 else types.UniTuple(types.float32, nt)
        sig = ret(w, w_off, s, m, g_off, x, xd, xqsum, t0, n_blocks, bias_factor)

        def codegen(context, builder, signature, args):
            return _emit_dot(context, builder, signature, args, fmt, nt)

        return sig, codegen

    return dot


@numba.njit(cache=True)
def _decode_portable(fmt, w, at, q):
    """The 32 quants of the block at byte `at` into q (32,) int32: unsigned, or signed for the signed formats."""
    if fmt == FMT_S8 or fmt == FMT_U8:
        for j in range(32):
            v = int(w[at + j])
            q[j] = v - 256 if (fmt == FMT_S8 and v > 127) else v
        return
    for j in range(16):
        q[j] = int(w[at + j]) & 15
        q[j + 16] = int(w[at + j]) >> 4
    if fmt == FMT_U5:
        for j in range(32):
            q[j] |= ((int(w[at + 16 + j // 8]) >> (j % 8)) & 1) << 4


@numba.njit(cache=True)
def dot_portable(fmt, w, w_off, s, m, g_off, x, xd, xqsum, t, n_blocks, bias_factor):
    """One row (bytes from w_off, groups from g_off) and token t, in plain loops: what the intrinsics
    compute (up to float rounding order)."""
    n_groups = 2 if fmt == FMT_U8 else 1
    group = 32 // n_groups
    block_bytes = 32 if (fmt == FMT_S8 or fmt == FMT_U8) else (16 if fmt == FMT_U4 else 20)
    q = np.empty(32, np.int32)
    total = np.float32(0.0)
    bias = np.float32(0.0)
    for b in range(n_blocks):
        _decode_portable(fmt, w, w_off + b * block_bytes, q)
        blk = t * n_blocks + b
        for g in range(n_groups):
            isum = 0
            for j in range(g * group, g * group + group):
                isum += int(q[j]) * int(x[blk * 32 + j])
            at_g = g_off + b * n_groups + g
            total += s[at_g] * xd[blk] * np.float32(isum)
            bias += m[at_g] * xqsum[blk * n_groups + g]
    if fmt == FMT_S8:
        return total
    return total + np.float32(bias_factor) * bias


def _make_portable(fmt: str, nt: int):
    code = FORMAT_CODES[fmt]

    if nt == 1:
        @numba.njit(cache=True)
        def dot(w, w_off, s, m, g_off, x, xd, xqsum, t0, n_blocks, bias_factor):
            return dot_portable(code, w, w_off, s, m, g_off, x, xd, xqsum, t0, n_blocks, bias_factor)
    else:  # NT == 4
        @numba.njit(cache=True)
        def dot(w, w_off, s, m, g_off, x, xd, xqsum, t0, n_blocks, bias_factor):
            return (dot_portable(code, w, w_off, s, m, g_off, x, xd, xqsum, t0, n_blocks, bias_factor),
                    dot_portable(code, w, w_off, s, m, g_off, x, xd, xqsum, t0 + 1, n_blocks, bias_factor),
                    dot_portable(code, w, w_off, s, m, g_off, x, xd, xqsum, t0 + 2, n_blocks, bias_factor),
                    dot_portable(code, w, w_off, s, m, g_off, x, xd, xqsum, t0 + 3, n_blocks, bias_factor))
    return dot


def _make(fmt: str, nt: int):
    return _make_intrinsic(fmt, nt) if AVAILABLE else _make_portable(fmt, nt)


# Dot products dot_<fmt>_t<NT>: one weight row with one token (decode) or with 4 tokens (prefill).
dot_s8_t1 = _make("s8", 1)
dot_s8_t4 = _make("s8", 4)
dot_u8_t1 = _make("u8", 1)
dot_u8_t4 = _make("u8", 4)
dot_u4_t1 = _make("u4", 1)
dot_u4_t4 = _make("u4", 4)
dot_u5_t1 = _make("u5", 1)
dot_u5_t4 = _make("u5", 4)
