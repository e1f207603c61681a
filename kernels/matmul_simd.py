"""Dot products of packed weight blocks with int8 activations, as Numba intrinsics in LLVM IR, one per
instruction set (kernels/isa.py chooses which at start-up), next to their portable definition.

Numba's default pipeline leaves the 32-element block loops of a quantized dot product scalar (its SLP
vectorizer is off), so the innermost work is emitted here directly. Per block of 32 weights, the integer
dot product of the quants q (unsigned) with the int8 activations x is 8 partial sums of 4 products:

    avx2, avx512bw      vpmaddubsw(q, x) -> i16 pair sums, vpmaddwd(.., 1) -> i32 sums of 4
    avxvnni, avx512vnni vpdpbusd(0, q, x) -> i32 sums of 4, in one instruction

(|pair| <= 2 * 128 * 127 fits an i16: both give the same integers.) The 512-bit paths (avx512bw,
avx512vnni) take two blocks per instruction; the 256-bit ones one. Each partial sum then goes to float:

    vcvtdq2ps, vfmadd by (block scale * activation scale) into a float accumulator lane

Every path accumulates into the same 16 float lanes: lanes 0-7 take the even blocks, lanes 8-15 the odd
ones (the 256-bit paths hold them as two 8-lane registers; the 512-bit paths as one register, with an odd
last block added to lanes 0-7 only). Then lanes 0-7 plus lanes 8-15, and one horizontal sum in a fixed
tree. So all SIMD paths do the same float operations on the same integers: their results are identical,
bit for bit. Signed weights ("s8", Q8_0) use the sign trick: |w| as the unsigned operand, x with w's sign
as the signed one (vpsignb at 256 bits; a compare and a masked negation at 512 bits, which has no vpsignb).

The call

    DOTS[code][n](w, w_off, s, m, ss, sm, g_off, x, xd, xqsum, t0, B, bias_factor)
        n = 1: one token (a float); n = TOKEN_TILE, SMALL_TILE, PAIR_TILE: a tile of tokens (a tuple)

computes, for one weight row (its B blocks from byte w_off of the flat uint8 w, its groups from g_off of
the flat s and m) and the tokens t = t0 + i,

    out[i] = sum_b sum_g S(b*G + g) * xd[t*B + b] * isum(t, b, g)  +  bias_factor * sum_bg M(b*G + g) * xqsum
    isum   = sum over the weights k of group g of block b: q[b, k] * x[t*B*32 + b*32 + k]

where xqsum[t*B*G + b*G + g] is the sum of the quantized x over the group times xd. S and M are the
group scales and bias coefficients as stored (kernels/matmul_pack.py), chosen by the dtype of s:

    float16 bits (uint16)   S(g) = s[g], widened                        the 32-weight formats
    int8                    S(g) = ss[g // (8 G)] * s[g], in float32     the K-quants: one ss per 256 weights
    float32                 S(g) = s[g]

and M likewise from m and sm: the mins (bias_factor 1) or, for formats with an offset, the scales
(bias_factor = -offset). The quants q are decoded from each block by format:

    "s8"  32 bytes per block: int8 quants                                             G = 1
    "u8"  32 bytes: unsigned quants 0..63, a scale per 16 weights                      G = 2
    "u6"  24 bytes: the "u4" nibbles, then 8 bytes: byte i holds bits 4-5 of elements i + 8k at bits 2k   G = 2
    "u4"  16 bytes: element j in the low nibble of byte j, element j + 16 in its high nibble   G = 1
    "u5"  20 bytes: the "u4" nibbles, then a little-endian u32 with the 5th bit of element j at bit j

With int8 scales a row's super-block (8 blocks) is one loop step: its scales are formed once. Every block
step asks for the weight bytes PREFETCH_BYTES ahead (`llvm.prefetch`): a decode step streams the weights.

"s8" has no bias term (its m and bias_factor are ignored). The other formats' bias term is a dot product
of the row's m with xqsum, computed after the blocks, 8 groups per 256-bit FMA on every path.

Each token's output goes through the same operations whatever the tile is, so a prefill row equals the
same token computed alone, bit for bit. With ISA "portable" (no AVX2, NUMBA_DISABLE_JIT=1, or forced)
the same names are plain-loop Numba functions over `dot_portable`, the definition the intrinsics are
tested against: it adds the same products in another order (per block, not per lane), so it agrees with
the SIMD paths to float rounding (relative ~1e-6 of the sum of |terms|), not bit for bit.

Numba caches the kernels that call these intrinsics by their own source file only: after editing this
file, clear kernels/__pycache__/*.nbi and *.nbc.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from kawai.kernels.formats import f16_to_f32
from kawai.kernels.isa import VECTOR_ISA as ISA

BLOCK_BYTES = {"s8": 32, "u8": 32, "u6": 24, "u4": 16, "u5": 20}
GROUPS = {"s8": 1, "u8": 2, "u6": 2, "u4": 1, "u5": 1}  # scales per block of 32
SIGNED_FORMATS = frozenset({"s8"})  # signed quants: no bias term
FMT_S8, FMT_U8, FMT_U4, FMT_U5, FMT_U6 = 0, 1, 2, 3, 4  # format codes passed to the Numba kernels
FORMAT_CODES = {"s8": FMT_S8, "u8": FMT_U8, "u4": FMT_U4, "u5": FMT_U5, "u6": FMT_U6}
# A decode step streams the weights from memory once, computing little per byte: the hardware prefetcher
# alone left the core waiting (one thread read ~6.5 GB/s of a ~16 GB/s stream). Each block step asks for
# the bytes this far ahead (docs/quantization.md: 512 B gained 1.4x, 1-4 KiB 1.6x, on Sapphire Rapids).
# A tile of 8 tokens of a batched decode waited as well (8 rows: 98 -> 69 ms); a prefill tile finds the
# rows in cache after its first pass, and the prefetch costs it nothing measurable.
PREFETCH_BYTES = 2048
SUPER_BLOCKS = 8  # blocks of 32 per float32 super-scale (int8 sub-scales: the K-quants' 256 weights)

WIDE_ISAS = frozenset({"avx512bw", "avx512vnni"})  # 512-bit vectors: two blocks per instruction
VNNI_ISAS = frozenset({"avxvnni", "avx512vnni"})  # vpdpbusd
AVAILABLE = ISA != "portable"  # the intrinsics are in use
# Tokens per prefill tile (each weight row is decoded once per tile; measured in docs/benchmarks.md). The
# 256-bit paths hold two 8-lane accumulators per token in 16 registers; the 512-bit ones one in 32.
TOKEN_TILE = 8 if ISA in WIDE_ISAS else 4
# Tiles of a batched decode step of a few sequences (n < TOKEN_TILE), which would otherwise run its tokens
# one at a time: each weight row streams once for the tile.
SMALL_TILE, PAIR_TILE = 4, 2

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F32 = ir.FloatType()


def _vec(t: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(t, n)


def _consts(t: ir.Type, values) -> ir.Constant:
    return ir.Constant(_vec(t, len(values)), [ir.Constant(t, v) for v in values])


def _shuffle(builder: ir.IRBuilder, a, b, indices):
    return builder.shuffle_vector(a, b, _consts(_I32, list(indices)))


def _load(builder: ir.IRBuilder, base_ptr, offset, ty: ir.Type):
    """Load a value of type `ty` from base_ptr + offset elements (unaligned)."""
    return builder.load(builder.bitcast(builder.gep(base_ptr, [offset]), ty.as_pointer()), align=1)


def _spread(builder: ir.IRBuilder, v, first: int, count: int, lanes: int):
    """Elements first..first+count-1 of the vector v, each repeated over lanes // count consecutive lanes."""
    return _shuffle(builder, v, v, [first + j * count // lanes for j in range(lanes)])


def _load_spread(builder: ir.IRBuilder, base_ptr, offset, n: int, lanes: int):
    """n floats from base_ptr + offset, each repeated over lanes // n consecutive lanes: <lanes x float>."""
    return _spread(builder, _load(builder, base_ptr, offset, _vec(_F32, n)), 0, n, lanes)


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
    if fmt == "u6":  # byte i of the 8 high bytes: bits 4-5 of elements i + 8k at bits 2k, 2k+1
        high = _load(builder, wp, builder.add(w_off, ir.Constant(_I64, 16)), _vec(_I64, 1))
        spread = builder.lshr(_shuffle(builder, high, high, [0] * 4), _consts(_I64, [0, 2, 4, 6]))
        pairs = builder.and_(builder.bitcast(spread, _vec(_I8, 32)), _consts(_I8, [3] * 32))
        q = builder.or_(q, builder.shl(pairs, _consts(_I8, [4] * 32)))
    if fmt == "u5":
        bits = _load(builder, wp, builder.add(w_off, ir.Constant(_I64, 16)), _vec(_I8, 4))
        spread = _shuffle(builder, bits, bits, [j // 8 for j in range(32)])  # byte j // 8 holds bit j
        masked = builder.and_(spread, _consts(_I8, [1 << (j % 8) for j in range(32)]))
        hit = builder.icmp_unsigned("!=", masked, _consts(_I8, [0] * 32))
        q = builder.or_(q, builder.select(hit, _consts(_I8, [16] * 32), _consts(_I8, [0] * 32)))
    return q


def _integer_dot(builder: ir.IRBuilder, isa: str, q, x, signed: bool):
    """<n x i8> quants q and activations x (n = 32 or 64) -> <n/4 x i32>, lane j = sum of products 4j..4j+3.

    q is unsigned, or signed for the "s8" format (then the sign trick: |q| times x with q's sign)."""
    n = q.type.count
    bits = 8 * n
    if signed:
        if n == 32:
            x = _call(builder, "llvm.x86.avx2.psign.b", q.type, [x, q])
        else:  # no vpsignb at 512 bits; where q is 0 the product is 0 either way
            negative = builder.icmp_signed("<", q, ir.Constant(q.type, None))
            x = builder.select(negative, builder.sub(ir.Constant(x.type, None), x), x)
        q = _call(builder, f"llvm.abs.v{n}i8", q.type, [q, ir.Constant(ir.IntType(1), 0)])
    v_i32 = _vec(_I32, n // 4)
    if isa in VNNI_ISAS:  # vpdpbusd(acc, u8, s8): acc + sums of 4 u8*s8 products, exact in i32
        return _call(builder, f"llvm.x86.avx512.vpdpbusd.{bits}", v_i32,
                     [ir.Constant(v_i32, None), builder.bitcast(q, v_i32), builder.bitcast(x, v_i32)])
    v_i16 = _vec(_I16, n // 2)
    if n == 32:
        pairs = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", v_i16, [q, x])
        return _call(builder, "llvm.x86.avx2.pmadd.wd", v_i32, [pairs, _consts(_I16, [1] * 16)])
    pairs = _call(builder, "llvm.x86.avx512.pmaddubs.w.512", v_i16, [q, x])
    return _call(builder, "llvm.x86.avx512.pmaddw.d.512", v_i32, [pairs, _consts(_I16, [1] * 32)])


def _hsum8(builder: ir.IRBuilder, v):
    """Sum of a <8 x float> in a fixed tree order."""
    v = builder.fadd(_shuffle(builder, v, v, range(4)), _shuffle(builder, v, v, range(4, 8)))
    v = builder.fadd(_shuffle(builder, v, v, range(2)), _shuffle(builder, v, v, range(2, 4)))
    return builder.fadd(builder.extract_element(v, ir.Constant(_I32, 0)),
                        builder.extract_element(v, ir.Constant(_I32, 1)))


def _emit_dot(context, builder, sig, args, fmt: str, nt: int, isa: str):
    """IR for one weight row x nt tokens (see the module docstring); returns the nt outputs.

    Each token has its own accumulator (16 float lanes: even blocks in 0-7, odd blocks in 8-15) and sees
    the same operations whatever nt and the vector width are."""
    wp, sp, mp, ssp, smp, xp, xdp, xqp = (cgutils.create_struct_proxy(sig.args[i])(context, builder, value=args[i]).data
                                          for i in (0, 2, 3, 4, 5, 7, 8, 9))
    w_off, g_off, t0, n_blocks = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (1, 6, 10, 11))
    bias_factor = context.cast(builder, args[12], sig.args[12], types.float32)
    i64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
    v8f32, v16f32 = _vec(_F32, 8), _vec(_F32, 16)
    n_groups = GROUPS[fmt]
    signed = fmt in SIGNED_FORMATS
    wide = isa in WIDE_ISAS
    scale_type = sig.args[2].dtype  # int8 (x float32 super-scales), float16 bits (uint16) or float32
    int_scales = scale_type == types.int8
    super_base = builder.sdiv(g_off, i64(SUPER_BLOCKS * n_groups))  # the row's first super-block
    # accs[i]: token i's 16 lanes, as one <16 x float> (wide) or [even, odd] <8 x float> halves
    if wide:
        accs = [cgutils.alloca_once_value(builder, ir.Constant(v16f32, None)) for _ in range(nt)]
    else:
        accs = [[cgutils.alloca_once_value(builder, ir.Constant(v8f32, None)) for _ in range(2)] for _ in range(nt)]
    biases = [cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0)) for _ in range(nt)]

    def quants(b):
        return _decode_block(builder, wp, builder.add(w_off, builder.mul(b, i64(BLOCK_BYTES[fmt]))), fmt)

    def token_block(i, b):
        return builder.add(builder.mul(n_blocks, builder.add(t0, i64(i))), b)  # token t0+i, block b

    def group_values(small_p, super_p, at, n: int):
        """n (1 or 8, or 2G) float32 scales or mins of the row's groups at..at+n-1 (they share one
        super-block): float32 as stored, float16 widened, or int8 times the super-block's float32."""
        if scale_type == types.float32:
            return _load(builder, small_p, builder.add(g_off, at), _vec(_F32, n))
        if scale_type == types.uint16:
            halves = _load(builder, small_p, builder.add(g_off, at), _vec(_I16, n))
            return builder.fpext(builder.bitcast(halves, _vec(ir.HalfType(), n)), _vec(_F32, n))
        values = builder.sitofp(_load(builder, small_p, builder.add(g_off, at), _vec(_I8, n)), _vec(_F32, n))
        sup = _load(builder, super_p, builder.add(super_base, builder.sdiv(at, i64(SUPER_BLOCKS * n_groups))),
                    _vec(_F32, 1))
        return builder.fmul(_shuffle(builder, sup, sup, [0] * n), values)

    def block_scales(b, n_blocks_here: int, lanes: int):
        """The scales of blocks b..b+n_blocks_here-1, each group's repeated over its lanes: <lanes x float>."""
        count = n_blocks_here * n_groups
        return _spread(builder, group_values(sp, ssp, builder.mul(b, i64(n_groups)), count), 0, count, lanes)

    def accumulate(acc, isums, scale, dx):
        """acc + float(isums) * (scale * dx), one rounding per lane (FMA)."""
        return _call(builder, f"llvm.fma.v{isums.type.count}f32", acc.type,
                     [builder.sitofp(isums, acc.type), builder.fmul(scale, dx), acc])

    def narrow_block(b, half, scale):
        """Block b into lanes 0-7 (half 0) or 8-15 (half 1) of every token's accumulator, 256 bits."""
        q = quants(b)
        isa_256 = "avxvnni" if isa in VNNI_ISAS else "avx2"  # the same integers at 256 bits
        for i in range(nt):
            blk = token_block(i, b)
            isums = _integer_dot(builder, isa_256, q, _load(builder, xp, builder.mul(blk, i64(32)), _vec(_I8, 32)),
                                 signed)
            dx = _load_spread(builder, xdp, blk, 1, 8)
            if wide:  # the last block of an odd count: only lanes 0-7 change
                acc = builder.load(accs[i])
                low = accumulate(_shuffle(builder, acc, acc, range(8)), isums, scale, dx)
                builder.store(_shuffle(builder, low, _shuffle(builder, acc, acc, range(8, 16)), range(16)), accs[i])
            else:
                builder.store(accumulate(builder.load(accs[i][half]), isums, scale, dx), accs[i][half])

    def wide_pair(b, scale):
        """Blocks b (lanes 0-7) and b + 1 (lanes 8-15) of every token, in 512-bit instructions."""
        q = _shuffle(builder, quants(b), quants(builder.add(b, i64(1))), range(64))
        for i in range(nt):
            blk = token_block(i, b)
            x = _load(builder, xp, builder.mul(blk, i64(32)), _vec(_I8, 64))
            dx = _load_spread(builder, xdp, blk, 2, 16)
            isums = _integer_dot(builder, isa, q, x, signed)
            builder.store(accumulate(builder.load(accs[i]), isums, scale, dx), accs[i])

    def bias_terms():
        """sum over the row's groups of m * xqsum, per token: 8 groups per vector FMA, then the tail."""
        n_all = builder.mul(n_blocks, i64(n_groups))  # B*G groups per row and per token
        vec_accs = [cgutils.alloca_once_value(builder, ir.Constant(v8f32, None)) for _ in range(nt)]
        with cgutils.for_range(builder, builder.sdiv(n_all, i64(8))) as loop:
            at = builder.mul(loop.index, i64(8))
            coefs = group_values(mp, smp, at, 8)
            for i in range(nt):
                sums = _load(builder, xqp, builder.add(builder.mul(n_all, builder.add(t0, i64(i))), at), v8f32)
                builder.store(_call(builder, "llvm.fma.v8f32", v8f32, [coefs, sums, builder.load(vec_accs[i])]),
                              vec_accs[i])
        for i in range(nt):
            builder.store(_hsum8(builder, builder.load(vec_accs[i])), biases[i])
        with cgutils.for_range(builder, builder.srem(n_all, i64(8))) as loop:
            at = builder.add(builder.mul(builder.sdiv(n_all, i64(8)), i64(8)), loop.index)
            coef = builder.extract_element(group_values(mp, smp, at, 1), ir.Constant(_I32, 0))
            for i in range(nt):
                xq_sum = _load(builder, xqp, builder.add(builder.mul(n_all, builder.add(t0, i64(i))), at), _F32)
                builder.store(_call(builder, "llvm.fma.f32", _F32, [coef, xq_sum, builder.load(biases[i])]),
                              biases[i])

    def blocks_pair(b, scale_of):
        """Blocks b and b + 1; scale_of(k, lanes): the spread scales of block b + k (k = 0, 1), or of
        both (k = None) for the wide paths."""
        if wide:
            wide_pair(b, scale_of(None, 16))
        else:
            narrow_block(b, 0, scale_of(0, 8))
            narrow_block(builder.add(b, i64(1)), 1, scale_of(1, 8))

    def prefetch(b, nbytes: int):
        """Ask for the weight bytes PREFETCH_BYTES ahead of block b (nbytes of them) to be brought to cache."""
        at = builder.add(builder.add(w_off, builder.mul(b, i64(BLOCK_BYTES[fmt]))), i64(PREFETCH_BYTES))
        for line in range(0, nbytes, 64):
            ptr = builder.bitcast(builder.gep(wp, [builder.add(at, i64(line))]), ir.IntType(8).as_pointer())
            _call(builder, "llvm.prefetch.p0", ir.VoidType(), [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 3),
                                                              ir.Constant(_I32, 1)])

    if int_scales:  # a super-block per step (n_blocks is a multiple of 8): its scales formed once
        with cgutils.for_range(builder, builder.sdiv(n_blocks, i64(SUPER_BLOCKS))) as loop:
            b0 = builder.mul(loop.index, i64(SUPER_BLOCKS))
            if PREFETCH_BYTES:
                prefetch(b0, SUPER_BLOCKS * BLOCK_BYTES[fmt])
            sb_scales = group_values(sp, ssp, builder.mul(b0, i64(n_groups)), SUPER_BLOCKS * n_groups)
            for k in range(0, SUPER_BLOCKS, 2):
                blocks_pair(builder.add(b0, i64(k)), lambda j, lanes, k=k: _spread(
                    builder, sb_scales, (k + (j or 0)) * n_groups, (2 if j is None else 1) * n_groups, lanes))
    else:
        with cgutils.for_range(builder, builder.sdiv(n_blocks, i64(2))) as loop:  # pairs of blocks
            b = builder.mul(loop.index, i64(2))
            if PREFETCH_BYTES:
                prefetch(b, 2 * BLOCK_BYTES[fmt])
            blocks_pair(b, lambda j, lanes, b=b: block_scales(b if j is None else builder.add(b, i64(j)),
                                                              2 if j is None else 1, lanes))
        with builder.if_then(builder.icmp_signed("!=", builder.srem(n_blocks, i64(2)), i64(0))):  # odd last block
            last = builder.sub(n_blocks, i64(1))
            narrow_block(last, 0, block_scales(last, 1, 8))
    if not signed:
        bias_terms()
    outs = []
    for i in range(nt):
        if wide:
            acc = builder.load(accs[i])
            even, odd = _shuffle(builder, acc, acc, range(8)), _shuffle(builder, acc, acc, range(8, 16))
        else:
            even, odd = builder.load(accs[i][0]), builder.load(accs[i][1])
        out = _hsum8(builder, builder.fadd(even, odd))
        if not signed:
            out = builder.fadd(out, builder.fmul(bias_factor, builder.load(biases[i])))
        outs.append(out)
    return outs[0] if nt == 1 else context.make_tuple(builder, sig.return_type, outs)


def _make_intrinsic(fmt: str, nt: int, isa: str):
    @intrinsic
    def dot(typingctx, w, w_off, s, m, ss, sm, g_off, x, xd, xqsum, t0, n_blocks, bias_factor):
        # The IR reads raw data pointers: only flat C-contiguous arrays of the expected dtypes type-check.
        small = s.dtype if isinstance(s, types.Array) and s.dtype in (types.float32, types.uint16, types.int8) else None
        expected = [(w, types.uint8), (s, small), (m, small), (ss, types.float32), (sm, types.float32),
                    (x, types.int8), (xd, types.float32), (xqsum, types.float32)]
        for arr, dtype in expected:
            if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C" and arr.dtype == dtype):
                return None
        ret = types.float32 if nt == 1 else types.UniTuple(types.float32, nt)
        sig = ret(w, w_off, s, m, ss, sm, g_off, x, xd, xqsum, t0, n_blocks, bias_factor)

        def codegen(context, builder, signature, args):
            return _emit_dot(context, builder, signature, args, fmt, nt, isa)

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
    if fmt == FMT_U6:
        for j in range(32):
            q[j] |= ((int(w[at + 16 + j % 8]) >> (2 * (j // 8))) & 3) << 4


def widen(v):
    """A stored scale as float32: float32 as is, float16 bits (uint16) widened, int8 converted. (Plain
    Python here, for NUMBA_DISABLE_JIT=1; compiled code uses the overload below.)"""
    if isinstance(v, np.uint16):
        return np.float32(np.uint16(v).view(np.float16))
    return np.float32(v)


@overload(widen)
def _widen_jit(v):
    if v == types.uint16:
        return lambda v: f16_to_f32(int(v) & 0xFF, int(v) >> 8)
    if v in (types.float32, types.int8):
        return lambda v: np.float32(v)
    return None


@numba.njit(cache=True)
def group_value(small, supers, at, per_super):
    """Group `at`'s scale (or min) as float32: small[at] widened (float32, float16 bits), or with
    super-scales, the int8 sub-scale times its super-block's float32 (`per_super` groups per super-block)."""
    if supers.shape[0] == 0:
        return widen(small[at])
    return supers[at // per_super] * widen(small[at])


@numba.njit(cache=True)
def dot_portable(fmt, w, w_off, s, m, ss, sm, g_off, x, xd, xqsum, t, n_blocks, bias_factor):
    """One row (bytes from w_off, groups from g_off) and token t, in plain loops: what the intrinsics
    compute (up to float rounding order)."""
    n_groups = 2 if (fmt == FMT_U8 or fmt == FMT_U6) else 1
    group = 32 // n_groups
    per_super = SUPER_BLOCKS * n_groups
    block_bytes = 32 if (fmt == FMT_S8 or fmt == FMT_U8) else (16 if fmt == FMT_U4 else (24 if fmt == FMT_U6 else 20))
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
            total += group_value(s, ss, at_g, per_super) * xd[blk] * np.float32(isum)
            if fmt != FMT_S8:
                bias += group_value(m, sm, at_g, per_super) * xqsum[blk * n_groups + g]
    if fmt == FMT_S8:
        return total
    return total + np.float32(bias_factor) * bias


def _make_portable(fmt: str, nt: int):
    code = FORMAT_CODES[fmt]

    if nt == 1:
        @numba.njit(cache=True)
        def dot(w, w_off, s, m, ss, sm, g_off, x, xd, xqsum, t0, n_blocks, bias_factor):
            return dot_portable(code, w, w_off, s, m, ss, sm, g_off, x, xd, xqsum, t0, n_blocks, bias_factor)
    elif nt == 2:
        @numba.njit(cache=True)
        def dot(w, w_off, s, m, ss, sm, g_off, x, xd, xqsum, t0, n_blocks, bias_factor):
            return (dot_portable(code, w, w_off, s, m, ss, sm, g_off, x, xd, xqsum, t0, n_blocks, bias_factor),
                    dot_portable(code, w, w_off, s, m, ss, sm, g_off, x, xd, xqsum, t0 + 1, n_blocks, bias_factor))
    else:  # a tile of 4 tokens
        @numba.njit(cache=True)
        def dot(w, w_off, s, m, ss, sm, g_off, x, xd, xqsum, t0, n_blocks, bias_factor):
            return (dot_portable(code, w, w_off, s, m, ss, sm, g_off, x, xd, xqsum, t0, n_blocks, bias_factor),
                    dot_portable(code, w, w_off, s, m, ss, sm, g_off, x, xd, xqsum, t0 + 1, n_blocks, bias_factor),
                    dot_portable(code, w, w_off, s, m, ss, sm, g_off, x, xd, xqsum, t0 + 2, n_blocks, bias_factor),
                    dot_portable(code, w, w_off, s, m, ss, sm, g_off, x, xd, xqsum, t0 + 3, n_blocks, bias_factor))
    return dot


def _make(fmt: str, nt: int):
    return _make_intrinsic(fmt, nt, ISA) if AVAILABLE else _make_portable(fmt, nt)


# DOTS[code][n]: the dot product of one weight row with n tokens, n in 1 (decode), TOKEN_TILE (prefill),
# SMALL_TILE and PAIR_TILE (a batched decode step of a few sequences).
DOTS = {code: {n: _make(fmt, n) for n in sorted({1, PAIR_TILE, SMALL_TILE, TOKEN_TILE})}
        for fmt, code in FORMAT_CODES.items()}
dot_s8_t1, dot_s8_tile = DOTS[FMT_S8][1], DOTS[FMT_S8][TOKEN_TILE]
dot_u8_t1, dot_u8_tile = DOTS[FMT_U8][1], DOTS[FMT_U8][TOKEN_TILE]
dot_u6_t1, dot_u6_tile = DOTS[FMT_U6][1], DOTS[FMT_U6][TOKEN_TILE]
dot_u4_t1, dot_u4_tile = DOTS[FMT_U4][1], DOTS[FMT_U4][TOKEN_TILE]
dot_u5_t1, dot_u5_tile = DOTS[FMT_U5][1], DOTS[FMT_U5][TOKEN_TILE]
