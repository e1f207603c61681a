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

Every kernel takes C-contiguous arrays and runs unchanged with NUMBA_DISABLE_JIT=1.
"""

from __future__ import annotations

import math

import llvmlite.binding as llvm_binding
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from kawai.kernels import isa
from kawai.kernels.ops import exp_inplace

Q_TILE = 16  # query rows per job: with G = 7 (Qwen2.5-0.5B), 112 query vectors share each widened tile
KV_TILE = 64  # positions per tile: the float32 key and value tiles (2 x 64 x hd x 4 bytes) stay in L1
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


def attention(q, k_cache, v_cache, start, scale, out, splits=None):
    """out (n, H, hd) = causal attention of q (n, H, hd) over one layer's cache, which already holds
    positions 0..start+n-1: k_cache (Hkv, hd, S), v_cache (Hkv, S, hd), float32 or float16.
    splits: KV ranges per row (default: `kv_splits` for this call and the thread count)."""
    n, n_heads, head_dim = q.shape
    if splits is None:
        splits = kv_splits(n, k_cache.shape[0], start + n, numba.get_num_threads())
    o_part = np.empty((splits, n, n_heads, head_dim), np.float32)  # unnormalized outputs per split
    m_part = np.empty((splits, n, n_heads), np.float32)  # running score maximum per split
    l_part = np.empty((splits, n, n_heads), np.float32)  # sum of exp(score - max) per split
    attention_partial(q, kernel_view(k_cache), kernel_view(v_cache), start, scale, o_part, m_part, l_part)
    merge_splits(o_part, m_part, l_part, out)


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
    Query vector u is row r0 + u // G, head kv*G + u % G; their count is padded to a multiple of 4
    (zero queries, never written out) for `_scores`."""
    n_heads, head_dim = q.shape[1], q.shape[2]
    group = n_heads // k_cache.shape[0]
    mq = (r1 - r0) * group
    qs = np.zeros(((mq + 3) // 4 * 4, head_dim), np.float32)  # (G R padded, hd) scaled queries
    for u in range(mq):
        qrow = q[r0 + u // group, kv * group + u % group]
        for j in range(head_dim):
            qs[u, j] = qrow[j] * scale
    acc = np.zeros((qs.shape[0], head_dim), np.float32)  # (G R padded, hd) o
    m = np.full(mq, -np.inf, np.float32)  # (G R,)
    total = np.zeros(mq, np.float32)  # (G R,) l
    kt = np.zeros((KV_TILE, head_dim), np.float32)  # (T, hd) keys of the tile
    vt = np.zeros((KV_TILE, head_dim), np.float32)  # (T, hd) values of the tile
    scores = np.empty((qs.shape[0], KV_TILE), np.float32)  # (G R padded, T), then weights
    bits = np.empty(KV_TILE, np.int32)  # exp_inplace scratch
    keys = k_cache[kv]  # (hd, S)
    values = v_cache[kv]  # (S, hd)
    for t in range(t_lo, min(t_hi, (start + r1 + KV_TILE - 1) // KV_TILE)):
        p0 = t * KV_TILE
        count = min(KV_TILE, start + r1 - p0)  # positions of the tile that the last row sees
        end = (count + 7) // 8 * 8  # <= T: `_accumulate` takes 8 positions at a time
        # Widen to float32; keys to position-major. Rows past `count` keep finite older values.
        for j in range(head_dim):
            src = keys[j, p0 : p0 + count]
            for p in range(count):
                kt[p, j] = as_float32(src[p])
        for p in range(count):
            src = values[p0 + p]
            dst = vt[p]
            for j in range(head_dim):
                dst[j] = as_float32(src[j])
        _scores(qs, kt, scores)  # (G R padded, T) over the whole tile; row u uses [:valid]
        for u in range(qs.shape[0]):
            # scores[u] -> weights exp(s - m_new) for p < valid, 0 for valid <= p < end
            valid = min(count, start + r0 + u // group + 1 - p0) if u < mq else 0  # causal limit
            s = scores[u]
            if valid <= 0:  # a row that does not reach this tile, or padding
                s[:end] = 0.0
                continue
            m_new = max(m[u], _max(s, valid))
            for p in range(valid):
                s[p] -= m_new
            exp_inplace(s, valid, bits)
            s[valid:end] = 0.0
            alpha = np.float32(math.exp(m[u] - m_new))  # 0 on the first tile (m = -inf)
            total[u] = total[u] * alpha + _sum(s, valid)
            m[u] = m_new
            if alpha != 1.0:
                a = acc[u]
                for j in range(head_dim):
                    a[j] *= alpha
        _accumulate(scores, end, vt, acc)
    for u in range(mq):
        i = r0 + u // group
        h = kv * group + u % group
        o_out[i, h, :] = acc[u]
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


@njit(cache=True, fastmath={"reassoc", "contract"})
def _scores(qs, kt, scores):
    """scores[u, p] = qs[u] . kt[p]. qs (M, hd) with M a multiple of 4; kt (T, hd); scores (M, T).
    Four queries per pass share each key load, and the dot products are summed in vector lanes
    (reassociated: the order differs from a sequential sum, fixed for given shapes)."""
    head_dim = qs.shape[1]
    for u in range(0, qs.shape[0], 4):
        q0, q1, q2, q3 = qs[u], qs[u + 1], qs[u + 2], qs[u + 3]
        for p in range(KV_TILE):
            k = kt[p]
            s0 = s1 = s2 = s3 = np.float32(0.0)
            for j in range(head_dim):
                kj = k[j]
                s0 += q0[j] * kj
                s1 += q1[j] * kj
                s2 += q2[j] * kj
                s3 += q3[j] * kj
            scores[u, p], scores[u + 1, p], scores[u + 2, p], scores[u + 3, p] = s0, s1, s2, s3


@njit(cache=True, fastmath={"contract"})
def _accumulate(w, end, vt, acc):
    """acc[u] += sum_p w[u, p] vt[p] over p < end. w (M, T) weights, M a multiple of 4, end a multiple
    of 8; vt (T, hd); acc (M, hd). Four queries and four value rows per pass: each accumulator load and
    store serves four products, each value load four queries."""
    head_dim = acc.shape[1]
    for u in range(0, acc.shape[0], 4):
        a0, a1, a2, a3 = acc[u], acc[u + 1], acc[u + 2], acc[u + 3]
        x0, x1, x2, x3 = w[u], w[u + 1], w[u + 2], w[u + 3]
        for p in range(0, end, 4):
            v0, v1, v2, v3 = vt[p], vt[p + 1], vt[p + 2], vt[p + 3]
            w00, w01, w02, w03 = x0[p], x0[p + 1], x0[p + 2], x0[p + 3]
            w10, w11, w12, w13 = x1[p], x1[p + 1], x1[p + 2], x1[p + 3]
            w20, w21, w22, w23 = x2[p], x2[p + 1], x2[p + 2], x2[p + 3]
            w30, w31, w32, w33 = x3[p], x3[p + 1], x3[p + 2], x3[p + 3]
            for j in range(head_dim):
                y0, y1, y2, y3 = v0[j], v1[j], v2[j], v3[j]
                a0[j] += w00 * y0 + w01 * y1 + w02 * y2 + w03 * y3
                a1[j] += w10 * y0 + w11 * y1 + w12 * y2 + w13 * y3
                a2[j] += w20 * y0 + w21 * y1 + w22 * y2 + w23 * y3
                a3[j] += w30 * y0 + w31 * y1 + w32 * y2 + w33 * y3


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
