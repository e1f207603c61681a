"""Row dot products of packed weight blocks with int16 activations, written as LLVM vector IR.

Numba's default pipeline does not vectorize the 32-element block loops of a quantized dot product (its
SLP vectorizer is off), so the innermost work is emitted here as Numba intrinsics in portable LLVM IR:
`sext`, `mul`, even/odd lane pairs (which LLVM's x86 backend turns into vpmaddwd), `sitofp` and a float
accumulator per lane. No x86-only intrinsic is used, so the same IR compiles for any target LLVM has.

One intrinsic computes, for one weight row and NT tokens (NT = 1 or 4),

    out[i] = sum_b sum_g scale[s_off + b*G + g] * xd[xd_off + i*B + b] * isum(b, g, token i)
    isum(b, g, i) = sum over the 32/G weights k of group g: q[b, k] * x[x_off + i*B*32 + b*32 + k]

with q the block's integer quants decoded from `w` (flat uint8, `w_off` bytes in) by the format:

    "i8"  32 bytes per block: int8 quants
    "u4"  16 bytes: element j in the low nibble of byte j, element j + 16 in its high nibble
    "u5"  20 bytes: the "u4" nibbles, then a little-endian u32 with the 5th bit of element j at bit j

minus a constant `offset` (Q4_0: 8, Q5_0: 16). Each token's float operations run in the same order
whatever NT is, so a prefill row equals the same token computed alone, bit for bit.

With NUMBA_DISABLE_JIT=1 the same functions are NumPy code (`_row_dot_numpy`) with the same meaning.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

BLOCK_BYTES = {"i8": 32, "u4": 16, "u5": 20}

_I1, _I8, _I16, _I32, _I64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F32 = ir.FloatType()


def _vec(t: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(t, n)


def _consts(t: ir.Type, values) -> ir.Constant:
    return ir.Constant(_vec(t, len(values)), [ir.Constant(t, v) for v in values])


def _splat(builder: ir.IRBuilder, value, n: int):
    v = builder.insert_element(ir.Constant(_vec(value.type, n), None), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, n), [0] * n))


def _shuffle(builder: ir.IRBuilder, a, b, indices):
    return builder.shuffle_vector(a, b, _consts(_I32, list(indices)))


def _load(builder: ir.IRBuilder, base_ptr, offset, vty: ir.Type):
    """Load a vector (or scalar) of type vty from base_ptr + offset elements (unaligned)."""
    ptr = builder.gep(base_ptr, [offset])
    return builder.load(builder.bitcast(ptr, vty.as_pointer()), align=1)


def _data(context, builder, arrty, arr):
    return cgutils.create_struct_proxy(arrty)(context, builder, value=arr).data


def _decode_block(builder: ir.IRBuilder, wp, w_off, fmt: str, offset: int):
    """The 32 quants of the block at byte w_off, as <32 x i8>."""
    if fmt == "i8":
        q = _load(builder, wp, w_off, _vec(_I8, 32))
    else:
        packed = _load(builder, wp, w_off, _vec(_I8, 16))
        low = builder.and_(packed, _consts(_I8, [15] * 16))
        high = builder.lshr(packed, _consts(_I8, [4] * 16))
        q = _shuffle(builder, low, high, range(32))
        if fmt == "u5":
            bits = _load(builder, wp, builder.add(w_off, ir.Constant(w_off.type, 16)), _vec(_I8, 4))
            spread = _shuffle(builder, bits, bits, [j // 8 for j in range(32)])  # byte j // 8 for element j
            hit = builder.icmp_unsigned("!=", builder.and_(spread, _consts(_I8, [1 << (j % 8) for j in range(32)])),
                                        _consts(_I8, [0] * 32))
            q = builder.or_(q, builder.select(hit, _consts(_I8, [16] * 32), _consts(_I8, [0] * 32)))
    if offset:
        q = builder.sub(q, _consts(_I8, [offset] * 32))
    return q


def _pair_sums(builder: ir.IRBuilder, w_pairs, x16, half: int):
    """<8 x i32> sums of adjacent products over the 16 elements of `half` (the vpmaddwd pattern)."""
    even = [16 * half + 2 * k for k in range(8)]
    odd = [16 * half + 2 * k + 1 for k in range(8)]
    x_even = builder.sext(_shuffle(builder, x16, x16, even), _vec(_I32, 8))
    x_odd = builder.sext(_shuffle(builder, x16, x16, odd), _vec(_I32, 8))
    w_even, w_odd = w_pairs[half]
    return builder.add(builder.mul(w_even, x_even), builder.mul(w_odd, x_odd))


def _hsum8(builder: ir.IRBuilder, v):
    """Sum of a <8 x float> in a fixed tree order."""
    v = builder.fadd(_shuffle(builder, v, v, range(4)), _shuffle(builder, v, v, range(4, 8)))
    v = builder.fadd(_shuffle(builder, v, v, range(2)), _shuffle(builder, v, v, range(2, 4)))
    return builder.fadd(builder.extract_element(v, ir.Constant(_I32, 0)), builder.extract_element(v, ir.Constant(_I32, 1)))


def _emit_row_dot(context, builder, sig, args, fmt: str, offset: int, group: int, nt: int):
    w, w_off, s, s_off, x, x_off, xd, xd_off, n_blocks = args
    wp = _data(context, builder, sig.args[0], w)
    sp = _data(context, builder, sig.args[2], s)
    xp = _data(context, builder, sig.args[4], x)
    xdp = _data(context, builder, sig.args[6], xd)
    w_off, s_off, x_off, xd_off, n_blocks = (
        context.cast(builder, v, t, types.int64) for v, t in zip(
            (w_off, s_off, x_off, xd_off, n_blocks), (sig.args[1], sig.args[3], sig.args[5], sig.args[7], sig.args[8])))
    bpb = BLOCK_BYTES[fmt]
    n_groups = 32 // group
    zero = ir.Constant(_vec(_F32, 8), None)
    accs = [cgutils.alloca_once_value(builder, zero) for _ in range(nt)]
    with cgutils.for_range(builder, n_blocks) as loop:
        b = loop.index
        q = _decode_block(builder, wp, builder.add(w_off, builder.mul(b, ir.Constant(_I64, bpb))), fmt, offset)
        w_pairs = [
            (builder.sext(_shuffle(builder, q, q, [16 * h + 2 * k for k in range(8)]), _vec(_I32, 8)),
             builder.sext(_shuffle(builder, q, q, [16 * h + 2 * k + 1 for k in range(8)]), _vec(_I32, 8)))
            for h in range(2)
        ]
        scales = [_load(builder, sp, builder.add(s_off, builder.add(builder.mul(b, ir.Constant(_I64, n_groups)),
                                                                  ir.Constant(_I64, g))), _F32) for g in range(n_groups)]
        for i in range(nt):
            x_at = builder.add(x_off, builder.mul(builder.add(builder.mul(n_blocks, ir.Constant(_I64, i)), b),
                                                  ir.Constant(_I64, 32)))
            x16 = _load(builder, xp, x_at, _vec(_I16, 32))
            dx = _load(builder, xdp, builder.add(xd_off, builder.add(builder.mul(n_blocks, ir.Constant(_I64, i)), b)), _F32)
            lo = _pair_sums(builder, w_pairs, x16, 0)
            hi = _pair_sums(builder, w_pairs, x16, 1)
            if group == 32:
                term = builder.fmul(builder.sitofp(builder.add(lo, hi), _vec(_F32, 8)),
                                    _splat(builder, builder.fmul(scales[0], dx), 8))
            else:
                term = builder.fadd(
                    builder.fmul(builder.sitofp(lo, _vec(_F32, 8)), _splat(builder, builder.fmul(scales[0], dx), 8)),
                    builder.fmul(builder.sitofp(hi, _vec(_F32, 8)), _splat(builder, builder.fmul(scales[1], dx), 8)))
            builder.store(builder.fadd(builder.load(accs[i]), term), accs[i])
    sums = [_hsum8(builder, builder.load(acc)) for acc in accs]
    if nt == 1:
        return sums[0]
    return context.make_tuple(builder, sig.return_type, sums)


def _row_dot_numpy(w, w_off, s, s_off, x, x_off, xd, xd_off, n_blocks, fmt, offset, group, nt):
    """The NumPy meaning of the intrinsics (used with NUMBA_DISABLE_JIT=1)."""
    bpb = BLOCK_BYTES[fmt]
    raw = np.asarray(w[w_off : w_off + n_blocks * bpb]).reshape(n_blocks, bpb)
    if fmt == "i8":
        q = raw.view(np.int8).astype(np.int64)
    else:
        q = np.concatenate([raw[:, :16] & 15, raw[:, :16] >> 4], axis=1).astype(np.int64)
        if fmt == "u5":
            bits = raw[:, 16:20].copy().view("<u4").astype(np.int64)  # (n_blocks, 1)
            q |= ((bits >> np.arange(32)) & 1) << 4
    q -= offset
    n_groups = 32 // group
    sc = np.asarray(s[s_off : s_off + n_blocks * n_groups], np.float32).reshape(n_blocks, n_groups)
    out = []
    for i in range(nt):
        xs = np.asarray(x[x_off + i * n_blocks * 32 : x_off + (i + 1) * n_blocks * 32]).reshape(n_blocks, n_groups, group)
        isum = (q.reshape(n_blocks, n_groups, group) * xs).sum(axis=2)  # (n_blocks, n_groups)
        dx = np.asarray(xd[xd_off + i * n_blocks : xd_off + (i + 1) * n_blocks], np.float32)[:, None]
        out.append(np.float32((isum.astype(np.float32) * (sc * dx)).sum(dtype=np.float32)))
    return out[0] if nt == 1 else tuple(out)


def _make_row_dot(fmt: str, offset: int, group: int, nt: int):
    if numba.config.DISABLE_JIT:
        def row_dot(w, w_off, s, s_off, x, x_off, xd, xd_off, n_blocks):
            return _row_dot_numpy(w, w_off, s, s_off, x, x_off, xd, xd_off, n_blocks, fmt, offset, group, nt)
        return row_dot

    @intrinsic
    def row_dot(typingctx, w, w_off, s, s_off, x, x_off, xd, xd_off, n_blocks):
        ret = types.float32 if nt == 1 else types.UniTuple(types.float32, nt)
        sig = ret(w, w_off, s, s_off, x, x_off, xd, xd_off, n_blocks)

        def codegen(context, builder, signature, args):
            return _emit_row_dot(context, builder, signature, args, fmt, offset, group, nt)

        return sig, codegen

    return row_dot


# One intrinsic per (format, offset, scales per 32 weights, tokens). Names: dot_<fmt>[_o<offset>][_g16]_t<NT>.
dot_i8_t1 = _make_row_dot("i8", 0, 32, 1)
dot_i8_t4 = _make_row_dot("i8", 0, 32, 4)
dot_i8_g16_t1 = _make_row_dot("i8", 0, 16, 1)
dot_i8_g16_t4 = _make_row_dot("i8", 0, 16, 4)
dot_u4_t1 = _make_row_dot("u4", 0, 32, 1)
dot_u4_t4 = _make_row_dot("u4", 0, 32, 4)
dot_u4_o8_t1 = _make_row_dot("u4", 8, 32, 1)
dot_u4_o8_t4 = _make_row_dot("u4", 8, 32, 4)
dot_u5_t1 = _make_row_dot("u5", 0, 32, 1)
dot_u5_t4 = _make_row_dot("u5", 0, 32, 4)
dot_u5_o16_t1 = _make_row_dot("u5", 16, 32, 1)
dot_u5_o16_t4 = _make_row_dot("u5", 16, 32, 4)
