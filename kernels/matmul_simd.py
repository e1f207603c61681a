"""AVX2 row dot products of packed weight blocks with int8 activations, as Numba intrinsics in LLVM IR.

Numba's default pipeline leaves the 32-element block loops of a quantized dot product scalar (its SLP
vectorizer is off), so the innermost work is emitted here directly: per block of 32 weights,

    vpmaddubsw(u8 weights, i8 activations) -> 16 x i16 pair sums   (|sum| <= 2 * 255 * 127 never saturates
    vpmaddwd(.., 1)                        -> 8 x i32                for the value ranges used here)
    vcvtdq2ps, vmulps by the block scale, vaddps into an 8-lane float accumulator; one horizontal sum per row.

Signed weights ("s8", Q8_0) use the usual sign trick: |w| as the unsigned operand, x with w's sign
applied as the signed one. One intrinsic computes, for one weight row and NT tokens (NT = 1 or 4),

    out[i] = sum_b sum_g scale[s_off + b*G + g] * xd[xd_off + i*B + b] * isum(b, g, token i)
    isum(b, g, i) = sum over the 32/G weights k of group g: q[b, k] * x[x_off + i*B*32 + b*32 + k]

with q the block's quants decoded from `w` (flat uint8, `w_off` bytes in) by the format:

    "s8"  32 bytes per block: int8 quants
    "u8"  32 bytes: unsigned quants 0..63
    "u4"  16 bytes: element j in the low nibble of byte j, element j + 16 in its high nibble
    "u5"  20 bytes: the "u4" nibbles, then a little-endian u32 with the 5th bit of element j at bit j

G = 32 // group scales per block ("u8" has G = 2, the others G = 1). Each token's float operations run
in the same order whatever NT is, so a prefill row equals the same token computed alone, bit for bit.

The intrinsics exist where `AVAILABLE` (x86-64 with AVX2, JIT on). Elsewhere, and with
NUMBA_DISABLE_JIT=1, the same names are plain-loop Numba functions over `isum_portable`, which is also
the readable definition the intrinsics are tested against.
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
FMT_S8, FMT_U8, FMT_U4, FMT_U5 = 0, 1, 2, 3  # format codes passed to the Numba kernels
FORMAT_CODES = {"s8": FMT_S8, "u8": FMT_U8, "u4": FMT_U4, "u5": FMT_U5}


def _host_has_avx2() -> bool:
    features = llvm_binding.get_host_cpu_features()
    return bool(features.get("avx2", False))


AVAILABLE = not numba.config.DISABLE_JIT and _host_has_avx2()

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


def _emit_row_dot(context, builder, sig, args, fmt: str, group: int, nt: int):
    wp, sp, xp, xdp = (cgutils.create_struct_proxy(sig.args[i])(context, builder, value=args[i]).data
                       for i in (0, 2, 4, 6))
    w_off, s_off, x_off, xd_off, n_blocks = (context.cast(builder, args[i], sig.args[i], types.int64)
                                             for i in (1, 3, 5, 7, 8))
    v8i8, v16i16, v8i32, v8f32 = _vec(_I8, 32), _vec(_I16, 16), _vec(_I32, 8), _vec(_F32, 8)
    ones16 = _consts(_I16, [1] * 16)
    n_groups = 32 // group
    accs = [cgutils.alloca_once_value(builder, ir.Constant(v8f32, None)) for _ in range(nt)]
    with cgutils.for_range(builder, n_blocks) as loop:
        b = loop.index
        q = _decode_block(builder, wp, builder.add(w_off, builder.mul(b, ir.Constant(_I64, BLOCK_BYTES[fmt]))), fmt)
        if fmt == "s8":
            q_abs = _call(builder, "llvm.abs.v32i8", v8i8, [q, ir.Constant(ir.IntType(1), 0)])
        s_at = builder.add(s_off, builder.mul(b, ir.Constant(_I64, n_groups)))
        if n_groups == 1:
            scale_lanes = _splat(builder, _load(builder, sp, s_at, _F32), 8)
        else:  # lanes 0-3 hold elements 0-15, lanes 4-7 elements 16-31
            pair = _load(builder, sp, s_at, _vec(_F32, 2))
            scale_lanes = _shuffle(builder, pair, pair, [0, 0, 0, 0, 1, 1, 1, 1])
        for i in range(nt):
            blk = builder.add(builder.mul(n_blocks, ir.Constant(_I64, i)), b)
            x = _load(builder, xp, builder.add(x_off, builder.mul(blk, ir.Constant(_I64, 32))), v8i8)
            dx = _load(builder, xdp, builder.add(xd_off, blk), _F32)
            if fmt == "s8":
                pairs = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", v16i16,
                              [q_abs, _call(builder, "llvm.x86.avx2.psign.b", v8i8, [x, q])])
            else:
                pairs = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", v16i16, [q, x])
            quads = _call(builder, "llvm.x86.avx2.pmadd.wd", v8i32, [pairs, ones16])
            term = builder.fmul(builder.sitofp(quads, v8f32), builder.fmul(scale_lanes, _splat(builder, dx, 8)))
            builder.store(builder.fadd(builder.load(accs[i]), term), accs[i])
    sums = [_hsum8(builder, builder.load(acc)) for acc in accs]
    return sums[0] if nt == 1 else context.make_tuple(builder, sig.return_type, sums)


def _make_row_dot(fmt: str, group: int, nt: int):
    @intrinsic
    def row_dot(typingctx, w, w_off, s, s_off, x, x_off, xd, xd_off, n_blocks):
        ret = types.float32 if nt == 1 else types.UniTuple(types.float32, nt)
        sig = ret(w, w_off, s, s_off, x, x_off, xd, xd_off, n_blocks)

        def codegen(context, builder, signature, args):
            return _emit_row_dot(context, builder, signature, args, fmt, group, nt)

        return sig, codegen

    return row_dot


@numba.njit(cache=True)
def isum_portable(fmt, w, w_off, s, s_off, x, x_off, xd, xd_off, n_blocks):
    """sum_b sum_g s * xd * (int dot of group g's quants with x): what every row_dot computes, in plain loops."""
    n_groups = 2 if fmt == FMT_U8 else 1
    group = 32 // n_groups
    q = np.empty(32, np.int32)
    total = np.float32(0.0)
    for b in range(n_blocks):
        if fmt == FMT_S8 or fmt == FMT_U8:
            at = w_off + b * 32
            for j in range(32):
                v = int(w[at + j])
                q[j] = v - 256 if (fmt == FMT_S8 and v > 127) else v
        else:
            at = w_off + b * (16 if fmt == FMT_U4 else 20)
            for j in range(16):
                q[j] = int(w[at + j]) & 15
                q[j + 16] = int(w[at + j]) >> 4
            if fmt == FMT_U5:
                for j in range(32):
                    q[j] |= ((int(w[at + 16 + j // 8]) >> (j % 8)) & 1) << 4
        dx = xd[xd_off + b]
        for g in range(n_groups):
            isum = 0
            for j in range(g * group, g * group + group):
                isum += int(q[j]) * int(x[x_off + b * 32 + j])
            total += s[s_off + b * n_groups + g] * dx * np.float32(isum)
    return total


def _make_portable(fmt: str, nt: int):
    code = FORMAT_CODES[fmt]

    if nt == 1:
        @numba.njit(cache=True)
        def row_dot(w, w_off, s, s_off, x, x_off, xd, xd_off, n_blocks):
            return isum_portable(code, w, w_off, s, s_off, x, x_off, xd, xd_off, n_blocks)
    else:
        @numba.njit(cache=True)
        def row_dot(w, w_off, s, s_off, x, x_off, xd, xd_off, n_blocks):
            step = n_blocks * 32
            return (isum_portable(code, w, w_off, s, s_off, x, x_off, xd, xd_off, n_blocks),
                    isum_portable(code, w, w_off, s, s_off, x, x_off + step, xd, xd_off + n_blocks, n_blocks),
                    isum_portable(code, w, w_off, s, s_off, x, x_off + 2 * step, xd, xd_off + 2 * n_blocks, n_blocks),
                    isum_portable(code, w, w_off, s, s_off, x, x_off + 3 * step, xd, xd_off + 3 * n_blocks, n_blocks))
    return row_dot


def _make(fmt: str, group: int, nt: int):
    return _make_row_dot(fmt, group, nt) if AVAILABLE else _make_portable(fmt, nt)


# One row dot per (format, weights per scale, tokens): dot_<fmt>[_g16]_t<NT>.
dot_s8_t1 = _make("s8", 32, 1)
dot_s8_t4 = _make("s8", 32, 4)
dot_u8_g16_t1 = _make("u8", 16, 1)
dot_u8_g16_t4 = _make("u8", 16, 4)
dot_u4_t1 = _make("u4", 32, 1)
dot_u4_t4 = _make("u4", 32, 4)
dot_u5_t1 = _make("u5", 32, 1)
dot_u5_t4 = _make("u5", 32, 4)
