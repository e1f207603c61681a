"""Causal grouped-query attention over a KV cache, tiled with an online softmax (flash-attention style).

    attention(q, k_cache, v_cache, start, scale, out)    # out[i, h] = softmax(scale q[i,h] . K) V

Letters used in shape comments:
    n   query rows (new tokens), at positions start..start+n-1     S   cache capacity (positions)
    H   query heads     Hkv  key/value heads     G = H / Hkv  query heads sharing one key/value head
    hd  head dimension  L    positions row i attends to: 0..start+i (start + i + 1 of them)
    T   KV_TILE positions per tile      R   Q_TILE query rows per job      P   KV splits (below)

The cache holds keys transposed, k_cache (Hkv, hd, S), so one key dimension is contiguous over
positions, and values v_cache (Hkv, S, hd). Either is float32 or float16; Numba has no float16 type,
so a float16 cache reaches the kernel as its uint16 bits and `as_float32` widens them (one `vcvtph2ps`
per 8 or 16 values where the CPU has F16C, else a few integer and float operations).

`attention_reference` is the definition, in NumPy. The kernel computes the same without ever holding
more than one tile of scores per query (Milakov & Gimelshein 2018, "Online normalizer calculation for
softmax"; Dao et al. 2022, "FlashAttention"). Per query vector it keeps the running maximum m of its
scores, the running sum l of exp(score - m) and the unnormalized output o = sum_p exp(score_p - m) v_p.
A tile of T more positions with scores s updates them as

    m' = max(m, max s)    a = exp(m - m')    l' = a l + sum_p exp(s_p - m')    o' = a o + sum_p exp(s_p - m') v_p

and out = o / l at the end. Two partial results (m1, l1, o1), (m2, l2, o2) over disjoint positions merge
by the same rule, which lets one row's positions be split across threads.

Work is split into jobs of (key/value head, query tile of R rows, KV split). A job handles the G query
heads of its key/value head for its R rows together: each key and value tile is widened to float32 once
and used by G R query vectors. A prefill chunk has many query tiles; a decode step has one row, so its
positions are split into P ranges ("flash-decoding") to give every thread work, and the P partial
results are merged. Memory: a job holds (G R, hd) accumulators and two (T, hd) tiles; the partial
results are (P, n, H, hd) -- nothing grows with n x L.

Per tile the work is two small matrix products, scores (G R, T) = qs (G R, hd) @ keys (hd, T) and
o (G R, hd) += weights (G R, T) @ values (T, hd), both done by one register-blocked micro-kernel
(`score_block`, `value_block`), and a softmax step per query vector (`softmax_tile`), each emitted as
LLVM IR next to its plain-loop definition (the portable path). A decode row's G query vectors are one
micro-kernel block: it reads the float16 cache directly instead of a widened copy.

Every kernel takes C-contiguous arrays and runs unchanged with NUMBA_DISABLE_JIT=1.
"""

from __future__ import annotations

import math

import llvmlite.binding as llvm_binding
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from kawai.kernels import isa
from kawai.kernels.ops import EXP2_TAYLOR, exp_inplace

Q_TILE = 32  # query rows per job: with G = 7 (Qwen2.5-0.5B), 224 query vectors share each widened tile
KV_TILE = 128  # positions per tile (measured: 64 and 256 are slower)
MIN_SPLIT_TILES = 4  # a KV split covers at least this many tiles, so its setup and merge stay small
JOBS_PER_THREAD = 4  # decode splits its positions until there are this many jobs per thread


# ---- the definition -------------------------------------------------------------------------------


def attention_reference(q, k, v, start, scale):
    """Causal GQA attention in float64 NumPy. q (n, H, hd); k, v (L_all, Hkv, hd) for positions
    0..start+n-1, in position order (not the cache layout); -> (n, H, hd) float64.
    Query row i sees positions 0..start+i; query head h uses key/value head h // G."""
    n, n_heads, _ = q.shape
    group = n_heads // k.shape[1]
    k = np.repeat(k.astype(np.float64), group, axis=1)  # (L_all, H, hd)
    v = np.repeat(v.astype(np.float64), group, axis=1)
    scores = np.einsum("ihd,phd->hip", q.astype(np.float64), k) * scale  # (H, n, L_all)
    visible = np.arange(k.shape[0])[None, :] <= start + np.arange(n)[:, None]  # (n, L_all)
    scores = np.where(visible, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("hip,phd->ihd", weights, v)


# ---- float16 storage ------------------------------------------------------------------------------


@njit(cache=True)
def f16_bits_to_f32(h):
    """An IEEE half given as its uint16 bits -> float32, exactly (every half is a float32), in portable
    integer and float operations (F. Giesen, "half_to_float_fast"). The exponent and mantissa are
    shifted into float32 position, and one multiply by 2^112 rebiases the exponent (127 - 15) -- which
    also turns half subnormals into normal float32s. Inf and NaN (half exponent 31) come out >= 2^16 and
    get the float32 exponent 255."""
    x = np.uint32(h)
    shifted = np.uint32((x & np.uint32(0x7FFF)) << np.uint32(13))
    f = np.float32(shifted.view(np.float32) * np.float32(5.192296858534828e33))  # * 2^112
    bits = np.uint32(f.view(np.uint32))
    if f >= np.float32(65536.0):  # inf or NaN: keep the mantissa (NaN payload), set every exponent bit
        bits = np.uint32(bits | np.uint32(0x7F800000))
    bits = np.uint32(bits | ((x & np.uint32(0x8000)) << np.uint32(16)))  # the sign
    return bits.view(np.float32)


@intrinsic
def _f16_bits_to_f32_llvm(typingctx, h):
    """The same as one LLVM `fpext half to float`: vcvtph2ps (F16C) on x86-64, vectorized in loops."""
    if h != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


def _target_has_f16c() -> bool:
    """F16C among the features Numba compiles for: the host's, less what a forced KAWAI_ISA switches off
    (`portable` drops it; without it LLVM lowers `fpext half` to a libcall the JIT cannot link)."""
    host = dict(llvm_binding.get_host_cpu_features())
    return "+f16c" in isa.target_features(isa.ISA, host).split(",")


HARDWARE_F16 = not numba.config.DISABLE_JIT and _target_has_f16c()


def as_float32(x):
    """A cache element as float32: float16 bits (uint16) are widened, float32 passes through.
    (Plain Python here, for NUMBA_DISABLE_JIT=1; compiled code uses the overload below.)"""
    if isinstance(x, np.uint16):
        return np.float32(x.view(np.float16))
    return np.float32(x)


@overload(as_float32)
def _as_float32_jit(x):
    if x == types.uint16:
        widen = _f16_bits_to_f32_llvm if HARDWARE_F16 else f16_bits_to_f32
        return lambda x: widen(x)
    if x == types.float32:
        return lambda x: x
    return None


def kernel_view(cache_array: np.ndarray) -> np.ndarray:
    """A cache array as the kernels take it: float16 as its uint16 bits, float32 unchanged."""
    return cache_array.view(np.uint16) if cache_array.dtype == np.float16 else cache_array


# ---- the kernel -----------------------------------------------------------------------------------


def attention(q, k_cache, v_cache, start, scale, out, splits=None, prefix=None):
    """out (n, H, hd) = causal attention of q (n, H, hd) over one layer's cache, which already holds
    positions 0..start+n-1: k_cache (Hkv, hd, S), v_cache (Hkv, S, hd), float32 or float16.
    splits: KV ranges per row (default: `kv_splits` for this call and the thread count).

    prefix: (k_prefix (Hkv, hd, S'), v_prefix (Hkv, S', hd), P) -- P positions before the cache's, read
    in place from another cache's first P positions (a prompt prefix shared between sequences). Every
    row sees all P of them; the cache's index p then holds position P + p (start counts from P). The
    prefix's partial results merge with the cache's like KV splits: the same attention as over one
    cache holding both, up to float32 rounding."""
    n, n_heads, head_dim = q.shape
    if splits is None:
        splits = kv_splits(n, k_cache.shape[0], start + n, numba.get_num_threads())
    shared = 0  # splits of the shared prefix's positions
    if prefix is not None and prefix[2] > 0:
        shared = kv_splits(1, k_cache.shape[0], prefix[2], numba.get_num_threads())
    o_part = np.empty((splits + shared, n, n_heads, head_dim), np.float32)  # unnormalized outputs per split
    m_part = np.empty((splits + shared, n, n_heads), np.float32)  # running score maximum per split
    l_part = np.empty((splits + shared, n, n_heads), np.float32)  # sum of exp(score - max) per split
    parts = own = (o_part, m_part, l_part)
    if shared:
        own = tuple(a[:splits] for a in parts)
        k_prefix, v_prefix, p = prefix
        _prefix_partial(q, kernel_view(k_prefix), kernel_view(v_prefix), p, scale, *(a[splits:] for a in parts))
    attention_partial(q, kernel_view(k_cache), kernel_view(v_cache), start, scale, *own)
    merge_splits(o_part, m_part, l_part, out)


def _prefix_partial(q, k_prefix, v_prefix, p, scale, o_part, m_part, l_part):
    """Partial results of q (n, H, hd) over all P prefix positions, no causal limit: the n rows are
    regrouped as the query heads of ONE row at position P-1 (row i, head h -> head (h // G) n G + i G +
    h % G, still on key/value head h // G), which sees exactly positions 0..P-1. o_part (P', n, H, hd),
    m_part and l_part (P', n, H) are written for every (row, head)."""
    n, n_heads, head_dim = q.shape
    n_kv = k_prefix.shape[0]
    group = n_heads // n_kv
    splits = o_part.shape[0]
    rows = np.ascontiguousarray(q.reshape(n, n_kv, group, head_dim).transpose(1, 0, 2, 3)).reshape(1, -1, head_dim)
    o = np.empty((splits, 1, n_heads * n, head_dim), np.float32)  # (P', 1, Hkv n G, hd)
    m = np.empty((splits, 1, n_heads * n), np.float32)
    l = np.empty((splits, 1, n_heads * n), np.float32)
    attention_partial(rows, k_prefix, v_prefix, p - 1, scale, o, m, l)
    o_part[...] = o.reshape(splits, n_kv, n, group, head_dim).transpose(0, 2, 1, 3, 4).reshape(o_part.shape)
    m_part[...] = m.reshape(splits, n_kv, n, group).transpose(0, 2, 1, 3).reshape(m_part.shape)
    l_part[...] = l.reshape(splits, n_kv, n, group).transpose(0, 2, 1, 3).reshape(l_part.shape)


def kv_splits(n: int, n_kv: int, length: int, threads: int) -> int:
    """How many ranges to split the positions into: 1 when the query tiles give every thread several
    jobs (prefill); else enough for JOBS_PER_THREAD jobs per thread, each of MIN_SPLIT_TILES tiles or more."""
    jobs = n_kv * -(-n // Q_TILE)
    wanted = JOBS_PER_THREAD * threads
    if threads == 1 or jobs >= wanted:
        return 1
    tiles = -(-length // KV_TILE)
    return max(1, min(-(-wanted // jobs), tiles // MIN_SPLIT_TILES))


@njit(cache=True, parallel=True)
def attention_partial(q, k_cache, v_cache, start, scale, o_part, m_part, l_part):
    """Every job's partial result. q (n, H, hd); k_cache (Hkv, hd, S), v_cache (Hkv, S, hd) float32 or
    float16 bits; o_part (P, n, H, hd), m_part and l_part (P, n, H) are written for every (row, head).

    Job order interleaves light and heavy query tiles (0, last, 1, last-1, ...): a causal prefill's
    first rows see fewer positions, and each thread takes a contiguous run of jobs."""
    n = q.shape[0]
    n_kv = k_cache.shape[0]
    splits = o_part.shape[0]
    n_qt = (n + Q_TILE - 1) // Q_TILE
    n_tiles = (start + n + KV_TILE - 1) // KV_TILE  # tiles the last row sees
    for job in prange(n_qt * splits * n_kv):
        kv = job % n_kv
        split = (job // n_kv) % splits
        k = job // (n_kv * splits)
        qt = k // 2 if k % 2 == 0 else n_qt - 1 - k // 2
        r0 = qt * Q_TILE
        r1 = min(n, r0 + Q_TILE)
        t_lo = split * n_tiles // splits
        t_hi = (split + 1) * n_tiles // splits
        _attend_tiles(q, k_cache, v_cache, start, scale, kv, r0, r1, t_lo, t_hi,
                      o_part[split], m_part[split], l_part[split])


@njit(cache=True)
def _attend_tiles(q, k_cache, v_cache, start, scale, kv, r0, r1, t_lo, t_hi, o_out, m_out, l_out):
    """Rows r0..r1-1, the query heads of key/value head kv, over tiles t_lo..t_hi-1 (positions
    t_lo*T.. ; each row stops at its causal limit). Writes o_out (n, H, hd), m_out and l_out (n, H).
    Query vector u is row r0 + u // G, head kv*G + u % G. Their count is padded to a multiple of MR, and
    the accumulators' width to a multiple of NC, for the micro-kernel (zero padding, never written out)."""
    n_heads, head_dim = q.shape[1], q.shape[2]
    group = n_heads // k_cache.shape[0]
    mq = (r1 - r0) * group
    rows = (mq + MR - 1) // MR * MR  # G R padded
    width = (head_dim + NC - 1) // NC * NC  # hd padded
    qs = np.zeros((rows, head_dim), np.float32)  # (G R padded, hd) scaled queries
    for u in range(mq):
        qrow = q[r0 + u // group, kv * group + u % group]
        for j in range(head_dim):
            qs[u, j] = qrow[j] * scale
    acc = np.zeros((rows, width), np.float32)  # (G R padded, hd padded) o
    m = np.full(mq, -np.inf, np.float32)  # (G R,)
    total = np.zeros(mq, np.float32)  # (G R,) l
    scores = np.zeros((rows, KV_TILE), np.float32)  # (G R padded, T), then weights
    keys = k_cache[kv]  # (hd, S)
    values = v_cache[kv]  # (S, hd)
    # One block of query vectors (decode) uses each key and value once: the products read the cache
    # itself, widening as they load. Several blocks share a widened float32 copy of the tile.
    direct = rows == MR and width == head_dim
    kt = np.zeros((head_dim, KV_TILE), np.float32)  # (hd, T) keys of the tile
    vt = np.zeros((KV_TILE, width), np.float32)  # (T, hd padded) values of the tile
    for t in range(t_lo, min(t_hi, (start + r1 + KV_TILE - 1) // KV_TILE)):
        p0 = t * KV_TILE
        count = min(KV_TILE, start + r1 - p0)  # positions of the tile that the last row sees
        # scores (G R, T) = qs (G R, hd) @ keys (hd, T); columns past `count` are never read
        if p0 + 2 * KV_TILE <= keys.shape[1]:  # the next tile's keys: hd short runs far apart, which
            for j in range(head_dim):  # the hardware prefetchers do not foresee; one hint per 64 bytes
                for p in range(p0 + KV_TILE, p0 + 2 * KV_TILE, 64 // keys.itemsize):
                    prefetch(keys, j, p)
        if direct and p0 + KV_TILE <= keys.shape[1]:
            scores_product(scores, qs, keys, p0, head_dim)
        else:
            for j in range(head_dim):  # widen; columns past `count` keep finite older values (or 0)
                src = keys[j, p0 : p0 + count]
                dst = kt[j]
                for p in range(count):
                    dst[p] = as_float32(src[p])
            scores_product(scores, qs, kt, 0, head_dim)
        for u in range(rows):
            # scores[u] -> weights exp(s - m_new) for p < valid, else 0; m, l, o rescaled to m_new
            valid = min(count, start + r0 + u // group + 1 - p0) if u < mq else 0  # causal limit
            if valid <= 0:  # a row that does not reach this tile, or padding
                scores[u, :] = 0.0
                continue
            m_new, tile_sum = softmax_tile(scores[u], valid, m[u])
            if m_new != m[u]:
                alpha = np.float32(math.exp(m[u] - m_new))  # 0 on the first tile (m = -inf)
                total[u] *= alpha
                a = acc[u]
                for j in range(head_dim):
                    a[j] *= alpha
            total[u] += tile_sum
            m[u] = m_new
        # acc (G R, hd) += weights (G R, count) @ values (count, hd)
        if direct:
            values_product(acc, scores, values, p0, count)
        else:
            for p in range(count):
                src = values[p0 + p]
                dst = vt[p]
                for j in range(head_dim):
                    dst[j] = as_float32(src[j])
            values_product(acc, scores, vt, 0, count)
    for u in range(mq):
        i = r0 + u // group
        h = kv * group + u % group
        o_out[i, h, :] = acc[u, :head_dim]
        m_out[i, h] = m[u]
        l_out[i, h] = total[u]


@njit(cache=True, fastmath={"reassoc"})
def _max(x, n):
    """max(x[:n]), n >= 1, in vector lanes (a chain of scalar max would wait on each one's latency)."""
    m = x[0]
    for p in range(1, n):
        m = max(m, x[p])
    return m


@njit(cache=True, fastmath={"reassoc"})
def _sum(x, n):
    """sum(x[:n]) in float32 vector lanes (reassociated: a fixed order for a given n)."""
    total = np.float32(0.0)
    for p in range(n):
        total += x[p]
    return total


# ---- the tile's arithmetic: a register-blocked micro-kernel and the softmax update ----------------
#
# Both products of a tile are small matrix products C (+)= A B with B's rows contiguous: the scores
# qs (G R, hd) @ keys (hd, T) and the value update weights (G R, T) @ values (T, hd). A block of MR
# rows x NC columns of C is computed by the outer-product micro-kernel of every BLAS:
#
#     for kk < k:  b = B[kk, 0:NC] (as float32)      for r < MR:  c_r += A[r, kk] * b    (FMA, NC lanes)
#
# with the MR accumulators kept in registers over the whole k loop: one load of B serves MR FMAs, and no
# horizontal sum is ever needed. 512-bit paths have 32 vector registers: NC = 32 lanes is two, and MR = 8
# rows take 16 accumulators; 256-bit paths have 16: NC = 16 lanes, MR = 6 rows, 12 accumulators.
#
# The sum over kk is taken in runs of `part` consecutive terms, each run from zero in registers and then
# added to C: a long running sum collects rounding error in proportion to its size, and real models'
# scores sum large products of either sign (a few "massive" dimensions of q and k). The teacher-forced
# agreement of tests/engine/test_model_real.py measured it (SmolLM2, hd = 64): with two runs per score and
# one per tile of values, 11 of 362 top-1 tokens differed from transformers'; with runs of 16 and 32, 4
# (as with the earlier kernel's 16-lane sums).

WIDE = isa.VECTOR_ISA in ("avx512vnni", "avx512bw")
SIMD = isa.ISA != "portable" and HARDWARE_F16  # the LLVM micro-kernel (else its plain-loop definition)
NC = 32 if WIDE else 16  # columns per block
MR = 8 if WIDE else 6  # rows per block (and the padding of G R)
SCORE_PART = 16  # key dimensions per partial sum of a score
VALUE_PART = 32  # positions per partial sum of an output


def _block_product_portable(c, ci, cj, a, ai, aj, b, bi, bj, k, part, accumulate):
    """c[ci+r, cj:cj+NC] (+)= sum over kk < k of a[ai+r, aj+kk] * b[bi+kk, bj:bj+NC], for r < MR, summed
    in runs of `part` terms added to c in turn (the first one stored unless accumulate): the definition of
    the micro-kernel, in plain loops. c, a float32 (2-D); b float32 or float16 bits."""
    run = np.empty(NC, np.float32)
    for r in range(MR):
        out = c[ci + r, cj : cj + NC]
        for k0 in range(0, k, part):
            run[:] = 0.0
            for kk in range(k0, min(k, k0 + part)):
                x = a[ai + r, aj + kk]
                src = b[bi + kk, bj : bj + NC]
                for j in range(NC):
                    run[j] += x * as_float32(src[j])
            if accumulate or k0 > 0:
                out += run
            else:
                out[:] = run


def _emit_block_product(context, builder, sig, args, part):
    """IR of `_block_product_portable` for a fixed `part`: MR <NC x float> accumulators in allocas
    (promoted to registers by LLVM); per run, a loop over its kk (of constant length: unrolled), then one
    store (or add) into c."""
    c, a, b = (context.make_array(sig.args[i])(context, builder, value=args[i]) for i in (0, 3, 6))
    ci, cj, ai, aj, bi, bj, k = (context.cast(builder, args[i], sig.args[i], types.int64)
                                 for i in (1, 2, 4, 5, 7, 8, 9))
    accumulate = context.cast(builder, args[10], sig.args[10], types.boolean)
    f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
    vec = ir.VectorType(f32, NC)
    half = sig.args[6].dtype == types.uint16
    b_vec = ir.VectorType(ir.HalfType() if half else f32, NC)
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]), f"llvm.fma.v{NC}f32")

    def at(array, row, col):  # &array[row, col], row-major
        return builder.gep(array.data, [builder.add(builder.mul(row, builder.extract_value(array.shape, 1)), col)])

    accs = [cgutils.alloca_once(builder, vec) for _ in range(MR)]

    def run(k0, length, add):
        """c (+)= the products of kk = k0 .. k0+length-1, summed from zero."""
        for r in range(MR):
            builder.store(ir.Constant(vec, None), accs[r])
        with cgutils.for_range(builder, length) as loop:
            kk = builder.add(k0, loop.index)
            row = builder.load(builder.bitcast(at(b, builder.add(bi, kk), bj), b_vec.as_pointer()), align=1)
            if half:
                row = builder.fpext(row, vec)
            for r in range(MR):
                x = builder.load(at(a, builder.add(ai, ir.Constant(i64, r)), builder.add(aj, kk)))
                spread = builder.shuffle_vector(
                    builder.insert_element(ir.Constant(vec, ir.Undefined), x, ir.Constant(i32, 0)),
                    ir.Constant(vec, ir.Undefined), ir.Constant(ir.VectorType(i32, NC), None))
                builder.store(builder.call(fma, [spread, row, builder.load(accs[r])]), accs[r])
        for r in range(MR):
            ptr = builder.bitcast(at(c, builder.add(ci, ir.Constant(i64, r)), cj), vec.as_pointer())
            with builder.if_then(add):
                builder.store(builder.fadd(builder.load(ptr, align=4), builder.load(accs[r])), accs[r])
            builder.store(builder.load(accs[r]), ptr, align=4)

    full = builder.sdiv(k, ir.Constant(i64, part))  # whole runs, then the rest
    with cgutils.for_range(builder, full) as outer:
        run(builder.mul(outer.index, ir.Constant(i64, part)), ir.Constant(i64, part),
            builder.or_(accumulate, builder.icmp_signed(">", outer.index, ir.Constant(i64, 0))))
    rest = builder.srem(k, ir.Constant(i64, part))
    with builder.if_then(builder.icmp_signed(">", rest, ir.Constant(i64, 0))):
        run(builder.mul(full, ir.Constant(i64, part)), rest,
            builder.or_(accumulate, builder.icmp_signed(">", full, ir.Constant(i64, 0))))
    return context.get_dummy_value()


def _make_block_product(part: int):
    """block(c, ci, cj, a, ai, aj, b, bi, bj, k, accumulate): `_block_product_portable` in runs of `part`."""
    if not SIMD:
        @njit(cache=True)
        def block(c, ci, cj, a, ai, aj, b, bi, bj, k, accumulate):
            _block_product_portable(c, ci, cj, a, ai, aj, b, bi, bj, k, part, accumulate)
        return block

    @intrinsic
    def block(typingctx, c, ci, cj, a, ai, aj, b, bi, bj, k, accumulate):
        for arr, dtypes in ((c, (types.float32,)), (a, (types.float32,)), (b, (types.float32, types.uint16))):
            if not (isinstance(arr, types.Array) and arr.ndim == 2 and arr.layout == "C" and arr.dtype in dtypes):
                return None

        def codegen(context, builder, signature, args):
            return _emit_block_product(context, builder, signature, args, part)

        return types.void(c, ci, cj, a, ai, aj, b, bi, bj, k, accumulate), codegen

    return block


_block_product_portable = njit(cache=True, fastmath={"contract"})(_block_product_portable)
score_block = _make_block_product(SCORE_PART)
value_block = _make_block_product(VALUE_PART)


@njit(cache=True)
def scores_product(scores, qs, keys, p0, head_dim):
    """scores (M, T) = qs (M, hd) @ keys[:, p0 : p0+T] (M a multiple of MR); keys (hd, >= p0+T) float32
    or float16 bits."""
    for cj in range(0, scores.shape[1], NC):
        for ci in range(0, scores.shape[0], MR):
            score_block(scores, ci, cj, qs, ci, 0, keys, 0, p0 + cj, head_dim, False)


@njit(cache=True)
def values_product(acc, weights, values, p0, count):
    """acc (M, hd) += weights[:, :count] @ values[p0 : p0+count, :hd] (M a multiple of MR, hd of NC)."""
    for cj in range(0, acc.shape[1], NC):
        for ci in range(0, acc.shape[0], MR):
            value_block(acc, ci, cj, weights, ci, 0, values, p0, cj, count, True)


def _prefetch_portable(array, i, j):
    """Ask the CPU to bring array[i, j]'s cache line closer (a hint: no effect on results)."""


@intrinsic
def _prefetch_llvm(typingctx, array, i, j):
    if not (isinstance(array, types.Array) and array.ndim == 2 and array.layout == "C"):
        return None

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, value=args[0])
        i, j = (context.cast(builder, args[k], sig.args[k], types.int64) for k in (1, 2))
        ptr = builder.gep(a.data, [builder.add(builder.mul(i, builder.extract_value(a.shape, 1)), j)])
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0i8")
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(array, i, j), codegen


prefetch = _prefetch_llvm if SIMD else njit(cache=True)(_prefetch_portable)


def _softmax_tile_portable(s, valid, m_old):
    """One query vector's online-softmax step over a tile. s (T,) its scores, valid >= 1 of them visible:
    m_new = max(m_old, s[:valid]); s[:valid] = exp(s - m_new), s[valid:] = 0; -> (m_new, sum of s)."""
    m_new = max(m_old, _max(s, valid))
    for p in range(valid):
        s[p] -= m_new
    exp_inplace(s, valid, np.empty(valid, np.int32))
    s[valid:] = 0.0
    return m_new, _sum(s, valid)


def _emit_softmax_tile(context, builder, sig, args):
    """IR of `_softmax_tile_portable` on the whole tile as one <T x float> (LLVM splits it into vector
    registers): lanes p >= valid are selected away, max and sum are fixed-order trees, and exp is
    exp_inplace's: 2^k * P(f), k = rint(x log2 e), P its Taylor polynomial, 2^k built as exponent bits."""
    s = context.make_array(sig.args[0])(context, builder, value=args[0])
    valid = context.cast(builder, args[1], sig.args[1], types.int32)
    m_old = context.cast(builder, args[2], sig.args[2], types.float32)
    f32, i32 = ir.FloatType(), ir.IntType(32)
    vec, ivec = ir.VectorType(f32, KV_TILE), ir.VectorType(i32, KV_TILE)

    def splat(value, ty=vec):
        return ir.Constant(ty, [ir.Constant(ty.element, value)] * KV_TILE)

    def intrinsic_call(name, *operands):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * len(operands)), name)
        return builder.call(fn, operands)

    def tree(v, combine):  # combine(halves) down to one lane, in a fixed order
        n = KV_TILE
        while n > 1:
            n //= 2
            lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, n), list(range(n))))
            hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, n), list(range(n, 2 * n))))
            v = combine(lo, hi)
        return builder.extract_element(v, ir.Constant(i32, 0))

    def vmax(x, y):
        return builder.select(builder.fcmp_ordered(">", x, y), x, y)

    ptr = builder.bitcast(s.data, vec.as_pointer())
    lanes = ir.Constant(ivec, list(range(KV_TILE)))
    visible = builder.icmp_signed("<", lanes, builder.shuffle_vector(
        builder.insert_element(ir.Constant(ivec, ir.Undefined), valid, ir.Constant(i32, 0)),
        ir.Constant(ivec, ir.Undefined), ir.Constant(ivec, None)))
    x = builder.select(visible, builder.load(ptr, align=4), splat(-math.inf))
    m_new = vmax(m_old, tree(x, vmax))
    m_spread = builder.shuffle_vector(builder.insert_element(ir.Constant(vec, ir.Undefined), m_new,
                                                             ir.Constant(i32, 0)),
                                      ir.Constant(vec, ir.Undefined), ir.Constant(ivec, None))
    t = builder.fmul(builder.fsub(x, m_spread), splat(1.4426950408889634))  # x - m_new <= 0, in log2 units
    t = vmax(t, splat(-125.0))
    k = intrinsic_call(f"llvm.rint.v{KV_TILE}f32", t)
    f = builder.fsub(t, k)
    y = splat(EXP2_TAYLOR[0])
    for coefficient in EXP2_TAYLOR[1:]:
        y = intrinsic_call(f"llvm.fma.v{KV_TILE}f32", y, f, splat(coefficient))
    scale = builder.bitcast(builder.shl(builder.add(builder.fptosi(k, ivec), splat(127, ivec)), splat(23, ivec)), vec)
    e = builder.select(visible, builder.fmul(y, scale), splat(0.0))
    builder.store(e, ptr, align=4)
    total = tree(e, builder.fadd)
    return context.make_tuple(builder, sig.return_type, [m_new, total])


if SIMD:
    @intrinsic
    def softmax_tile(typingctx, s, valid, m_old):
        if not (isinstance(s, types.Array) and s.ndim == 1 and s.layout == "C" and s.dtype == types.float32):
            return None
        return types.UniTuple(types.float32, 2)(s, valid, m_old), _emit_softmax_tile
else:
    softmax_tile = njit(cache=True)(_softmax_tile_portable)


@njit(cache=True)
def merge_splits(o_part, m_part, l_part, out):
    """out[i, h] = the normalized merge of the P partial results of (row i, head h).
    o_part (P, n, H, hd); m_part, l_part (P, n, H); out (n, H, hd). A split that saw no position of a
    row has m = -inf and l = 0 and weighs nothing."""
    splits, n, n_heads, head_dim = o_part.shape
    for i in range(n):
        for h in range(n_heads):
            m = m_part[0, i, h]
            for p in range(1, splits):
                m = max(m, m_part[p, i, h])
            o = out[i, h]
            o[:] = 0.0
            total = np.float32(0.0)
            for p in range(splits):
                if l_part[p, i, h] == 0.0:
                    continue
                w = np.float32(math.exp(m_part[p, i, h] - m))
                total += w * l_part[p, i, h]
                part = o_part[p, i, h]
                for j in range(head_dim):
                    o[j] += w * part[j]
            inv = np.float32(1.0) / total
            for j in range(head_dim):
                o[j] *= inv
