"""Fused multi-head scaled-dot-product attention over a packed QKV projection.

One parallel task per (batch row, head), and both products are GEMMs on the matmul's register tiles
(tiles.py: 8 x 32 on AVX-512, 6 x 16 on AVX2). A task copies its head into per-thread scratch
(AttentionScratch, made once per forward by the encoder), zero-padded to whole panels of W = PANEL:
    q  [T, D']          the queries, already multiplied by 1/sqrt(D)
    kt [T'/W, D', W]    keys transposed into panels, so that s = q @ kt is the tiles' x @ panel
    vp [D'/W, T', W]    values cut into panels of W dims, so that o = p @ vp likewise
(D' and T' are D and T rounded up to W.) Small inputs (one short text) run the same steps on one thread
(_attention_kernel_serial; see matmul.SERIAL_MAX_FLOP). Then: the scores s [T, T'] = q K^T; per row, mask + bias added
and a max-subtracted exp (`exp32`; the row max with 16-lane SIMD max, simd.py), the row's 1/sum kept;
o = p V; out = o * (1/sum). The [T, T] score block of one head is 64 KB at T = 128, so it stays in L2
between the two products. Zero-padded keys get probability exactly 0.
Keys whose score is more than 87 below the row's maximum get exactly 0 weight (every padding key under a
mask of -inf, float32 min or -1e4; see `exp32`). `_attention_kernel_reference` is the same computation
one query at a time, kept as the readable version and tested against this one.
"""
import math

import numba
import numpy as np
from numba import njit, prange

from minislm.kernels.activations import SOFTMAX_FASTMATH, SOFTMAX_FLOPS_PER_ELEM, exp32, softmax_reference
from minislm.kernels.checks import check_array, output_array
from minislm.kernels.matmul import SERIAL_MAX_FLOP
from minislm.kernels.simd import LANES, hmax16, load16, max16
from minislm.kernels.tiles import PANEL, rows_times_panels, whole_panels

_NO_BIAS = np.zeros((0, 0, 0), dtype=np.float32)


def attention_reference(qkv, mask_add, n_heads, pos_bias=None):
    """Multi-head attention.

    qkv      [B, T, 3H]  queries, keys, values side by side (H = N * D)
    mask_add [B, T]      added to every score of a key column: 0 for real tokens, large negative for padding
    pos_bias [N, T, T]   optional additive bias per head (MPNet's relative positions), shared over the batch
    returns  [B, T, H]   softmax(q k^T / sqrt(D) + bias + mask) v, heads concatenated
    """
    B, T, H3 = qkv.shape
    H = H3 // 3
    D = H // n_heads
    q, k, v = (qkv[:, :, i * H:(i + 1) * H].reshape(B, T, n_heads, D).transpose(0, 2, 1, 3) for i in range(3))
    scores = q @ k.transpose(0, 1, 3, 2) / np.float32(np.sqrt(D))  # [B, N, T, T]
    if pos_bias is not None:
        scores = scores + pos_bias[None]
    scores = scores + mask_add[:, None, None, :]
    p = softmax_reference(scores)
    return (p @ v).transpose(0, 2, 1, 3).reshape(B, T, H).astype(np.float32)


@njit(cache=True, fastmath=SOFTMAX_FASTMATH, parallel=True)
def _attention_kernel_reference(qkv, mask_add, n_heads, pos_bias, n_threads, out):
    # qkv [B, T, 3H], mask_add [B, T], pos_bias [N, T, T] or empty -> out [B, T, H];
    # n_threads bounds numba.get_thread_id() and sizes the per-thread scratch
    B, T, H3 = qkv.shape
    H = H3 // 3
    D = H // n_heads
    scale = np.float32(1.0 / math.sqrt(D))
    has_bias = pos_bias.shape[0] > 0
    kt_scratch = np.empty((n_threads, D, T), dtype=np.float32)  # one K^T per thread
    vt_scratch = np.empty((n_threads, D, T), dtype=np.float32)  # one V^T per thread
    s_scratch = np.empty((n_threads, T), dtype=np.float32)      # one score row per thread
    for task in prange(B * n_heads):
        b = task // n_heads
        h = task % n_heads
        tid = numba.get_thread_id()
        kt = kt_scratch[tid]
        vt = vt_scratch[tid]
        s = s_scratch[tid]
        q0 = h * D
        k0 = H + h * D
        v0 = 2 * H + h * D
        for j in range(T):
            for d in range(D):
                kt[d, j] = qkv[b, j, k0 + d]
                vt[d, j] = qkv[b, j, v0 + d]
        for i in range(T):
            if has_bias:
                for j in range(T):
                    s[j] = mask_add[b, j] + pos_bias[h, i, j]
            else:
                for j in range(T):
                    s[j] = mask_add[b, j]
            for d in range(D):  # s += q_i K^T * scale, T innermost so it vectorises
                qd = qkv[b, i, q0 + d] * scale
                ktd = kt[d]
                for j in range(T):
                    s[j] += qd * ktd[j]
            m = s[0]
            for j in range(1, T):
                m = max(m, s[j])
            if m == -np.inf:  # every key is masked with -inf: no distribution exists, output zeros
                for d in range(D):
                    out[b, i, q0 + d] = 0.0
                continue
            total = np.float32(0.0)
            for j in range(T):
                e = exp32(s[j] - m)
                s[j] = e
                total += e
            inv = np.float32(1.0) / total
            for d in range(D):  # o_d = p . V^T[d], a contiguous dot over the keys
                vtd = vt[d]
                acc = np.float32(0.0)
                for j in range(T):
                    acc += s[j] * vtd[j]
                out[b, i, q0 + d] = acc * inv


@njit(cache=True, fastmath=SOFTMAX_FASTMATH, inline="always")  # inlined into the prange body
def _softmax_rows(s, mask_row, bias, T, inv):
    # s [T, T'] scores (T' a multiple of 16) -> unnormalised probabilities exp(s + mask + bias - max),
    # exactly 0 past column T; inv [T] <- 1 / row sum (0 for a row whose keys are all -inf: zero output)
    has_bias = bias.shape[0] > 0
    for i in range(T):
        row = s[i]
        if has_bias:
            bias_row = bias[i]
            for j in range(T):
                row[j] += mask_row[j] + bias_row[j]
        else:
            for j in range(T):
                row[j] += mask_row[j]
        for j in range(T, row.shape[0]):
            row[j] = -np.inf  # padding keys: exp32 turns them into exactly 0
        peak = load16(row, 0)
        for j in range(LANES, row.shape[0], LANES):
            peak = max16(peak, load16(row, j))
        m = hmax16(peak)
        if m == -np.inf:
            inv[i] = 0.0
            row[:] = 0.0
            continue
        total = np.float32(0.0)
        for j in range(row.shape[0]):
            e = exp32(row[j] - m)
            row[j] = e
            total += e
        inv[i] = np.float32(1.0) / total


class AttentionScratch:
    """Per-thread buffers of the attention kernel for one (T, head dim): allocated once per forward and
    reused by every layer, so nothing is allocated inside the layer loop.

    q [n, T, D'], kt [n, T'/W, D', W], vp [n, D'/W, T', W], s [n, T, T'], o [n, T, D'], inv [n, T]
    for n threads. Zeroed at creation: the kernel never writes the padding, so it stays zero.
    """

    def __init__(self, T, head_dim, n_threads=None):
        n = n_threads or numba.config.NUMBA_NUM_THREADS
        Dp, Tp = whole_panels(head_dim), whole_panels(T)
        self.T, self.head_dim, self.n_threads = T, head_dim, n
        z = lambda *shape: np.zeros(shape, dtype=np.float32)  # noqa: E731
        self.arrays = (z(n, T, Dp), z(n, Tp // PANEL, Dp, PANEL), z(n, Dp // PANEL, Tp, PANEL), z(n, T, Tp),
                       z(n, T, Dp), z(n, T))


@njit(cache=True, fastmath=SOFTMAX_FASTMATH, parallel=True)
def _attention_kernel(qkv, mask_add, n_heads, pos_bias, out, q_scratch, kt_scratch, vp_scratch, s_scratch,
                      o_scratch, inv_scratch):
    # qkv [B, T, 3H], mask_add [B, T], pos_bias [N, T, T] or empty -> out [B, T, H], with the per-thread
    # scratch of AttentionScratch (indexed by numba.get_thread_id())
    for task in prange(qkv.shape[0] * n_heads):
        tid = numba.get_thread_id()
        _attention_head(qkv, mask_add, n_heads, pos_bias, out, task // n_heads, task % n_heads, q_scratch[tid],
                        kt_scratch[tid], vp_scratch[tid], s_scratch[tid], o_scratch[tid], inv_scratch[tid])


@njit(cache=True, fastmath=SOFTMAX_FASTMATH)  # serial on purpose: see SERIAL_MAX_FLOP
def _attention_kernel_serial(qkv, mask_add, n_heads, pos_bias, out, q_scratch, kt_scratch, vp_scratch, s_scratch,
                             o_scratch, inv_scratch):
    # _attention_kernel on one thread (the scratch of thread 0), for small inputs
    for task in range(qkv.shape[0] * n_heads):
        _attention_head(qkv, mask_add, n_heads, pos_bias, out, task // n_heads, task % n_heads, q_scratch[0],
                        kt_scratch[0], vp_scratch[0], s_scratch[0], o_scratch[0], inv_scratch[0])


@njit(cache=True, fastmath=SOFTMAX_FASTMATH, inline="always")  # inlined into both kernels' loops
def _attention_head(qkv, mask_add, n_heads, pos_bias, out, b, h, q, kt, vp, s, o, inv):
    # one (batch row b, head h): out[b, :, hD:hD+D] from qkv [B, T, 3H], with one thread's scratch
    # q [T, D'], kt [T'/W, D', W], vp [D'/W, T', W], s [T, T'], o [T, D'], inv [T]
    T, H3 = qkv.shape[1], qkv.shape[2]
    H = H3 // 3
    D = H // n_heads
    Dp = q.shape[1]  # D' and T': whole panels
    Tp = s.shape[1]
    scale = np.float32(1.0 / math.sqrt(D))
    has_bias = pos_bias.shape[0] > 0
    no_bias = np.zeros((0, 0), dtype=np.float32)
    q0 = h * D
    k0 = H + h * D
    v0 = 2 * H + h * D
    tokens = qkv[b]
    # (slices first, so every index starts at 0: LLVM then emits plain vector loads and stores)
    for j in range(T):  # queries and values: contiguous row copies
        q_src, q_row = tokens[j, q0:q0 + D], q[j]
        for d in range(D):
            q_row[d] = q_src[d] * scale
        for p in range(Dp // PANEL):
            width = min(PANEL, D - p * PANEL)
            v_src, v_row = tokens[j, v0 + p * PANEL:v0 + p * PANEL + width], vp[p, j]
            for dd in range(width):
                v_row[dd] = v_src[dd]
    for p in range(Tp // PANEL):  # keys, transposed one panel of W keys at a time (8 KB at W = 32, D = 64)
        n_keys = min(PANEL, T - p * PANEL)
        keys, kt_panel = tokens[p * PANEL:p * PANEL + n_keys, k0:k0 + D], kt[p]
        for d in range(D):
            dst = kt_panel[d]
            for jj in range(n_keys):
                dst[jj] = keys[jj, d]
    rows_times_panels(q, kt, s, 0, T, 0, Tp // PANEL)          # s [T, T'] = q K^T
    _softmax_rows(s, mask_add[b], pos_bias[h] if has_bias else no_bias, T, inv)
    rows_times_panels(s, vp, o, 0, T, 0, Dp // PANEL)          # o [T, D'] = p V
    for i in range(T):
        dst = out[b, i]
        for d in range(D):
            dst[q0 + d] = o[i, d] * inv[i]


def attention(qkv, mask_add, n_heads, pos_bias=None, out=None, scratch=None):
    """qkv [B, T, 3H], mask_add [B, T], pos_bias [N, T, T] or None -> [B, T, H], all float32.

    softmax(q k^T / sqrt(D) + pos_bias + mask_add) v per head, heads concatenated (see attention_reference).
    A query whose keys are all -inf gets zeros. `out` [B, T, H] is written in place when given; `scratch`
    (an AttentionScratch for this T and head dim) is used instead of allocating one.
    """
    check_array("attention", "qkv", qkv, ndim=3)
    B, T, H3 = qkv.shape
    if not isinstance(n_heads, (int, np.integer)) or n_heads <= 0:
        raise ValueError(f"attention: n_heads must be a positive int, got {n_heads!r}")
    if H3 % 3 != 0 or (H3 // 3) % n_heads != 0:
        raise ValueError(f"attention: qkv's last axis {H3} must be 3 * H with H divisible by n_heads={n_heads}")
    check_array("attention", "mask_add", mask_add, shape=(B, T))
    if pos_bias is None:
        pos_bias = _NO_BIAS
    else:
        check_array("attention", "pos_bias", pos_bias, shape=(n_heads, T, T))
    out = output_array("attention", out, (B, T, H3 // 3))
    if np.may_share_memory(out, qkv):
        raise ValueError("attention: out overlaps qkv; pass a separate output array")
    head_dim = H3 // 3 // n_heads
    if scratch is None:
        scratch = AttentionScratch(T, head_dim)
    elif (scratch.T, scratch.head_dim) != (T, head_dim) or scratch.n_threads < numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"attention: scratch was made for T={scratch.T}, head dim {scratch.head_dim}, "
                         f"{scratch.n_threads} threads; this call needs T={T}, head dim {head_dim}: "
                         f"make one with AttentionScratch({T}, {head_dim})")
    if T > 0:
        small = attention_flops(B, T, n_heads, head_dim)["matmul"] < SERIAL_MAX_FLOP  # q k^T and p v
        (_attention_kernel_serial if small else _attention_kernel)(qkv, mask_add, int(n_heads), pos_bias, out,
                                                                   *scratch.arrays)
    return out


SCORE_FLOPS_PER_ELEM = 2  # scale by 1/sqrt(D), add the mask (MPNet adds its position bias too: +1)


def attention_flops(B, T, n_heads, head_dim, position_bias=False):
    """attention() on [B, T]: the products q k^T [T, D] x [D, T] and p v [T, T] x [T, D] per (row, head),
    plus the softmax and the scaling / masking of every score -> {"matmul", "other"}."""
    scores = B * n_heads * T * T
    per_score = SOFTMAX_FLOPS_PER_ELEM + SCORE_FLOPS_PER_ELEM + (1 if position_bias else 0)
    return {"matmul": B * n_heads * 2 * (2 * T * head_dim * T), "other": scores * per_score}
