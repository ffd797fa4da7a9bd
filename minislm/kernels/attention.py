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


# ---------------------------------------------------------------- backward
#
# Per (batch row, head), with S = q k^T / sqrt(D) + pos_bias + mask, P = softmax(S) row by row, O = P v:
#     dv = P^T dO,   dP = dO v^T,   dS = P * (dP - rowsum(P * dP)),   dq = dS k / sqrt(D),   dk = dS^T q / sqrt(D)
# and the position bias, shared by the batch, gets the sum of dS over it. P is recomputed from qkv, one
# (batch row, head) block at a time in per-thread scratch: nothing of size [B, N, T, T] exists, and the bias
# gradient is one [N, T, T] per thread. A padding key has P = 0 exactly
# (see `exp32`), hence dS = 0 in its column and dk = dv = 0; a padding query row is an ordinary row.

from minislm.kernels.activations import softmax_np  # noqa: E402  (the float64-capable softmax of the reference)

def attention_backward_reference(qkv, mask_add, n_heads, pos_bias, dctx):
    """qkv [B, T, 3H], mask_add [B, T], pos_bias [N, T, T] or None, dctx [B, T, H]
    -> (dqkv [B, T, 3H], dpos_bias [N, T, T] summed over the batch, or None). Plain NumPy in the inputs' dtype,
    one (batch row, head) block of scores at a time; the math is in the section comment above."""
    B, T, H3 = qkv.shape
    H = H3 // 3
    D = H // n_heads
    scale = 1.0 / math.sqrt(D)
    dqkv = np.zeros_like(qkv, dtype=np.result_type(qkv, dctx))
    dbias = None if pos_bias is None else np.zeros(pos_bias.shape, dtype=dqkv.dtype)
    for b in range(B):
        for h in range(n_heads):
            qc, kc, vc = (slice(i * H + h * D, i * H + (h + 1) * D) for i in range(3))
            q, k, v, do = qkv[b, :, qc], qkv[b, :, kc], qkv[b, :, vc], dctx[b, :, h * D:(h + 1) * D]
            s = q @ k.T * scale + mask_add[b][None, :]
            if pos_bias is not None:
                s = s + pos_bias[h]
            p = softmax_np(s)
            dp = do @ v.T
            ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))
            dqkv[b, :, qc] = ds @ k * scale
            dqkv[b, :, kc] = ds.T @ q * scale
            dqkv[b, :, vc] = p.T @ do
            if dbias is not None:
                dbias[h] += ds
    return dqkv, dbias


@njit(cache=True, fastmath=SOFTMAX_FASTMATH, parallel=True)
def _add_thread_partials(db_scratch, n_threads, dpos_bias):
    # dpos_bias [N, T, T] = the sum of the first n_threads partial sums db_scratch [threads, N, T, T], added in
    # thread order (so the result does not depend on scheduling); shared by both backward kernels
    n_heads, T = dpos_bias.shape[0], dpos_bias.shape[1]
    for row in prange(n_heads * T):
        h = row // T
        i = row % T
        dst = dpos_bias[h, i]
        for j in range(T):
            dst[j] = 0.0
        for t in range(n_threads):
            src = db_scratch[t, h, i]
            for j in range(T):
                dst[j] += src[j]


@njit(cache=True, fastmath=SOFTMAX_FASTMATH, parallel=True)
def _attention_backward_kernel_reference(qkv, mask_add, n_heads, pos_bias, dctx, n_threads, dqkv, dpos_bias):
    # one query row at a time, the readable version of _attention_backward_kernel (tested against it).
    # qkv [B, T, 3H], mask_add [B, T], pos_bias [N, T, T] or empty, dctx [B, T, H] -> dqkv [B, T, 3H] and, with
    # a bias, dpos_bias [N, T, T]; n_threads bounds numba.get_thread_id() and sizes the per-thread scratch
    B, T, H3 = qkv.shape
    H = H3 // 3
    D = H // n_heads
    scale = np.float32(1.0 / math.sqrt(D))
    has_bias = pos_bias.shape[0] > 0
    # per-thread scratch, allocated before the prange (inside it, one buffer could be shared: numba #9529)
    q_scratch = np.empty((n_threads, T, D), dtype=np.float32)    # q / sqrt(D)
    kt_scratch = np.empty((n_threads, D, T), dtype=np.float32)   # K^T and V^T: score rows vectorise over keys
    vt_scratch = np.empty((n_threads, D, T), dtype=np.float32)
    dk_scratch = np.empty((n_threads, T, D), dtype=np.float32)   # dk, dv summed over the query rows
    dv_scratch = np.empty((n_threads, T, D), dtype=np.float32)
    row_scratch = np.empty((n_threads, 2, T), dtype=np.float32)  # one row of P and of dP, then dS
    # every head's bias gradient per thread: tasks of different batch rows share a head, so they cannot share it
    db_scratch = np.zeros((n_threads if has_bias else 0, n_heads, T, T), dtype=np.float32)
    for task in prange(B * n_heads):
        b = task // n_heads
        h = task % n_heads
        tid = numba.get_thread_id()
        q, kt, vt = q_scratch[tid], kt_scratch[tid], vt_scratch[tid]
        dk, dv = dk_scratch[tid], dv_scratch[tid]
        p, ds = row_scratch[tid, 0], row_scratch[tid, 1]
        q0 = h * D
        k0 = H + h * D
        v0 = 2 * H + h * D
        for j in range(T):
            for d in range(D):
                q[j, d] = qkv[b, j, q0 + d] * scale
                kt[d, j] = qkv[b, j, k0 + d]
                vt[d, j] = qkv[b, j, v0 + d]
                dk[j, d] = 0.0
                dv[j, d] = 0.0
        for i in range(T):
            do = dctx[b, i, q0:q0 + D]
            if has_bias:
                for j in range(T):
                    p[j] = mask_add[b, j] + pos_bias[h, i, j]
            else:
                for j in range(T):
                    p[j] = mask_add[b, j]
            for d in range(D):  # the score row, as the forward computes it
                qd = q[i, d]
                ktd = kt[d]
                for j in range(T):
                    p[j] += qd * ktd[j]
            m = p[0]
            for j in range(1, T):
                m = max(m, p[j])
            if m == -np.inf:  # every key masked with -inf: the forward's output is 0, so is every gradient
                for d in range(D):
                    dqkv[b, i, q0 + d] = 0.0
                continue
            total = np.float32(0.0)
            for j in range(T):
                e = exp32(p[j] - m)
                p[j] = e
                total += e
            inv = np.float32(1.0) / total
            for j in range(T):
                p[j] *= inv
            for j in range(T):
                ds[j] = 0.0
            for d in range(D):  # dP row = dO_i V^T
                dod = do[d]
                vtd = vt[d]
                for j in range(T):
                    ds[j] += dod * vtd[j]
            c = np.float32(0.0)  # rowsum(P * dP) = dO_i . O_i
            for j in range(T):
                c += p[j] * ds[j]
            for j in range(T):
                ds[j] = p[j] * (ds[j] - c)
            for d in range(D):  # dq_i = dS_i K / sqrt(D): a contiguous dot over the keys
                ktd = kt[d]
                acc = np.float32(0.0)
                for j in range(T):
                    acc += ds[j] * ktd[j]
                dqkv[b, i, q0 + d] = acc * scale
            qi = q[i]
            for j in range(T):  # dk_j += dS_ij q_i / sqrt(D),  dv_j += P_ij dO_i
                sj = ds[j]
                pj = p[j]
                dkj = dk[j]
                dvj = dv[j]
                for d in range(D):
                    dkj[d] += sj * qi[d]
                    dvj[d] += pj * do[d]
            if has_bias:
                dbt = db_scratch[tid, h, i]
                for j in range(T):
                    dbt[j] += ds[j]
        for j in range(T):
            for d in range(D):
                dqkv[b, j, k0 + d] = dk[j, d]
                dqkv[b, j, v0 + d] = dv[j, d]
    if has_bias:
        _add_thread_partials(db_scratch, n_threads, dpos_bias)


@njit(cache=True, fastmath=SOFTMAX_FASTMATH, parallel=True)
def _attention_backward_kernel(qkv, mask_add, n_heads, pos_bias, dctx, n_threads, dqkv, dpos_bias):
    # as _attention_backward_kernel_reference, with all five products of a (batch row, head) on the GEMM's
    # register tiles. Per-thread scratch, zero-padded to whole panels (D' = whole_panels(D), T' likewise):
    #   q [T, D'] and qp [D'/32, T, 32]  q / sqrt(D) as rows, and cut into panels of 32 dims
    #   do, dop                          dO the same two ways
    #   kt, vt [T'/32, D', 32]           K and V transposed into panels of 32 keys: S = q K^T, dP = dO V^T
    #   kp [D'/32, T', 32]               K in panels of 32 dims: dq = dS K
    #   s, dp [T, T']                    P, and dP then dS
    #   st [T, T]                        P^T, then dS^T: dv = P^T dO, dk = dS^T q
    #   dq, dk, dv [T, D']
    B, T, H3 = qkv.shape
    H = H3 // 3
    D = H // n_heads
    Dp = -(-D // PANEL) * PANEL  # whole_panels, which is plain Python
    Tp = -(-T // PANEL) * PANEL
    scale = np.float32(1.0 / math.sqrt(D))
    has_bias = pos_bias.shape[0] > 0
    no_bias = np.zeros((0, 0), dtype=np.float32)
    n = n_threads
    # allocated before the prange and zeroed once: tasks write only the real entries, so padding stays 0
    q_s, do_s = np.zeros((n, T, Dp), dtype=np.float32), np.zeros((n, T, Dp), dtype=np.float32)
    qp_s, dop_s = np.zeros((n, Dp // PANEL, T, PANEL), dtype=np.float32), np.zeros((n, Dp // PANEL, T, PANEL),
                                                                                   dtype=np.float32)
    kt_s, vt_s = np.zeros((n, Tp // PANEL, Dp, PANEL), dtype=np.float32), np.zeros((n, Tp // PANEL, Dp, PANEL),
                                                                                   dtype=np.float32)
    kp_s = np.zeros((n, Dp // PANEL, Tp, PANEL), dtype=np.float32)
    s_s, dp_s = np.zeros((n, T, Tp), dtype=np.float32), np.zeros((n, T, Tp), dtype=np.float32)
    st_s = np.zeros((n, T, T), dtype=np.float32)
    dq_s, dk_s, dv_s = (np.zeros((n, T, Dp), dtype=np.float32), np.zeros((n, T, Dp), dtype=np.float32),
                        np.zeros((n, T, Dp), dtype=np.float32))
    inv_s = np.zeros((n, T), dtype=np.float32)
    db_scratch = np.zeros((n if has_bias else 0, n_heads, T, T), dtype=np.float32)
    for task in prange(B * n_heads):
        b = task // n_heads
        h = task % n_heads
        tid = numba.get_thread_id()
        q, do, qp, dop = q_s[tid], do_s[tid], qp_s[tid], dop_s[tid]
        kt, vt, kp = kt_s[tid], vt_s[tid], kp_s[tid]
        s, dp, st, inv = s_s[tid], dp_s[tid], st_s[tid], inv_s[tid]
        dq, dk, dv = dq_s[tid], dk_s[tid], dv_s[tid]
        q0 = h * D
        k0 = H + h * D
        v0 = 2 * H + h * D
        tokens, grads = qkv[b], dctx[b]
        for j in range(T):  # row-wise copies: q and dO as rows and as dim panels, K as dim panels
            q_src, do_src, k_src = tokens[j, q0:q0 + D], grads[j, q0:q0 + D], tokens[j, k0:k0 + D]
            q_row, do_row = q[j], do[j]
            for d in range(D):
                q_row[d] = q_src[d] * scale
                do_row[d] = do_src[d]
            for p in range(Dp // PANEL):
                width = min(PANEL, D - p * PANEL)
                qp_row, dop_row, kp_row = qp[p, j], dop[p, j], kp[p, j]
                for dd in range(width):
                    qp_row[dd] = q_row[p * PANEL + dd]
                    dop_row[dd] = do_row[p * PANEL + dd]
                    kp_row[dd] = k_src[p * PANEL + dd]
        for p in range(Tp // PANEL):  # K and V transposed, one panel of 32 keys at a time
            n_keys = min(PANEL, T - p * PANEL)
            keys = tokens[p * PANEL:p * PANEL + n_keys, k0:k0 + D]
            values = tokens[p * PANEL:p * PANEL + n_keys, v0:v0 + D]
            kt_panel, vt_panel = kt[p], vt[p]
            for d in range(D):
                k_dst, v_dst = kt_panel[d], vt_panel[d]
                for jj in range(n_keys):
                    k_dst[jj] = keys[jj, d]
                    v_dst[jj] = values[jj, d]
        rows_times_panels(q, kt, s, 0, T, 0, Tp // PANEL)            # S [T, T'] = q K^T
        _softmax_rows(s, mask_add[b], pos_bias[h] if has_bias else no_bias, T, inv)
        rows_times_panels(do, vt, dp, 0, T, 0, Tp // PANEL)          # dP [T, T'] = dO V^T
        for i in range(T):
            p_row, dp_row = s[i], dp[i]
            r = inv[i]
            c = np.float32(0.0)
            for j in range(Tp):
                pij = p_row[j] * r
                p_row[j] = pij
                c += pij * dp_row[j]
            for j in range(Tp):  # dS = P (dP - rowsum(P dP)); padding keys have P = 0, so dS = 0
                dp_row[j] = p_row[j] * (dp_row[j] - c)
        for i in range(T):
            for j in range(T):
                st[j, i] = s[i, j]
        rows_times_panels(st, dop, dv, 0, T, 0, Dp // PANEL)         # dv [T, D'] = P^T dO
        for i in range(T):
            for j in range(T):
                st[j, i] = dp[i, j]
        rows_times_panels(st, qp, dk, 0, T, 0, Dp // PANEL)          # dk [T, D'] = dS^T q / sqrt(D)
        rows_times_panels(dp, kp, dq, 0, T, 0, Dp // PANEL)          # dq [T, D'] = dS K (then / sqrt(D))
        for j in range(T):
            dst = dqkv[b, j]
            for d in range(D):
                dst[q0 + d] = dq[j, d] * scale
                dst[k0 + d] = dk[j, d]
                dst[v0 + d] = dv[j, d]
        if has_bias:
            for i in range(T):
                db_row, ds_row = db_scratch[tid, h, i], dp[i]
                for j in range(T):
                    db_row[j] += ds_row[j]
    if has_bias:
        _add_thread_partials(db_scratch, n, dpos_bias)


def attention_backward(qkv, mask_add, n_heads, pos_bias, dctx, out=None):
    """Backward of `attention`: qkv [B, T, 3H], mask_add [B, T], pos_bias [N, T, T] or None, dctx [B, T, H]
    -> (dqkv [B, T, 3H], dpos_bias [N, T, T] summed over the batch, or None when pos_bias is None), float32.

    dv = P^T dO, dS = P * (dP - rowsum(P dP)) with dP = dO v^T, dq = dS k / sqrt(D), dk = dS^T q / sqrt(D),
    dpos_bias = sum_b dS (MPNet's bias is shared by every layer: the caller adds each layer's dpos_bias into its
    bucket table). Padding keys get exactly zero gradient; a query whose keys are all -inf gets zeros, as its
    output does. `out` [B, T, 3H] is written in place when given.
    """
    check_array("attention_backward", "qkv", qkv, ndim=3)
    B, T, H3 = qkv.shape
    if not isinstance(n_heads, (int, np.integer)) or n_heads <= 0:
        raise ValueError(f"attention_backward: n_heads must be a positive int, got {n_heads!r}")
    if H3 % 3 != 0 or (H3 // 3) % n_heads != 0:
        raise ValueError(f"attention_backward: qkv's last axis {H3} must be 3 * H with H divisible by "
                         f"n_heads={n_heads}")
    check_array("attention_backward", "mask_add", mask_add, shape=(B, T))
    check_array("attention_backward", "dctx", dctx, shape=(B, T, H3 // 3))
    dpos_bias = None
    if pos_bias is None:
        pos_bias = _NO_BIAS
    else:
        check_array("attention_backward", "pos_bias", pos_bias, shape=(n_heads, T, T))
        dpos_bias = np.zeros((n_heads, T, T), dtype=np.float32)
    out = output_array("attention_backward", out, (B, T, H3))
    if np.may_share_memory(out, qkv) or np.may_share_memory(out, dctx):
        raise ValueError("attention_backward: out overlaps qkv or dctx; pass a separate output array")
    if B and T:
        _attention_backward_kernel(qkv, mask_add, int(n_heads), pos_bias, dctx, numba.config.NUMBA_NUM_THREADS,
                                   out, _NO_BIAS if dpos_bias is None else dpos_bias)
    return out, dpos_bias


def attention_backward_flops(B, T, n_heads, head_dim, position_bias=False):
    """attention_backward on [B, T]: per (row, head) the recomputed scores q k^T and the four products dO v^T,
    dS k, dS^T q, P^T dO (each 2 T T D), plus the softmax again and 4 FLOPs per score for dS -> {"matmul", "other"}."""
    scores = B * n_heads * T * T
    per_score = SOFTMAX_FLOPS_PER_ELEM + SCORE_FLOPS_PER_ELEM + 4 + (2 if position_bias else 0)
    return {"matmul": B * n_heads * 5 * (2 * T * T * head_dim), "other": scores * per_score}
