"""Fused multi-head scaled-dot-product attention over a packed QKV projection.

One parallel task per (batch row, head). A task copies its head's keys transposed, K^T [D, T], into a
per-thread scratch buffer (16 KB at D=32, T=128, so it stays in L1) and then handles one query at a time:
the score row s [T] = mask + bias + q K^T / sqrt(D) is built with the T axis innermost (vectorised), turned
into probabilities by a max-subtracted softmax, and multiplied into the head's values. Nothing [T, T] is ever
materialised. Keys whose probability underflows to exactly 0 (every padding key under a mask of -inf,
float32 min or -1e4) are skipped, so padding costs no value-side work and gets exactly zero weight.
"""
import math

import numba
import numpy as np
from numba import njit, prange

from minislm.kernels.activations import SOFTMAX_FASTMATH, softmax_reference
from minislm.kernels.checks import check_array, output_array

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
def _attention_kernel(qkv, mask_add, n_heads, pos_bias, n_threads, out):
    # qkv [B, T, 3H], mask_add [B, T], pos_bias [N, T, T] or empty -> out [B, T, H];
    # n_threads bounds numba.get_thread_id() and sizes the per-thread scratch
    B, T, H3 = qkv.shape
    H = H3 // 3
    D = H // n_heads
    scale = np.float32(1.0 / math.sqrt(D))
    has_bias = pos_bias.shape[0] > 0
    kt_scratch = np.empty((n_threads, D, T), dtype=np.float32)  # one K^T per thread
    s_scratch = np.empty((n_threads, T), dtype=np.float32)      # one score row per thread
    for task in prange(B * n_heads):
        b = task // n_heads
        h = task % n_heads
        tid = numba.get_thread_id()
        kt = kt_scratch[tid]
        s = s_scratch[tid]
        q0 = h * D
        k0 = H + h * D
        v0 = 2 * H + h * D
        for j in range(T):
            for d in range(D):
                kt[d, j] = qkv[b, j, k0 + d]
        for i in range(T):
            if has_bias:
                for j in range(T):
                    s[j] = mask_add[b, j] + pos_bias[h, i, j]
            else:
                for j in range(T):
                    s[j] = mask_add[b, j]
            for d in range(D):
                qd = qkv[b, i, q0 + d] * scale
                ktd = kt[d]
                for j in range(T):
                    s[j] += qd * ktd[j]
            m = s[0]
            for j in range(1, T):
                m = max(m, s[j])
            o = out[b, i, q0:q0 + D]
            o[:] = 0.0
            if m == -np.inf:
                continue  # every key is masked with -inf: no distribution exists, output zeros
            total = np.float32(0.0)
            for j in range(T):
                e = math.exp(s[j] - m)
                s[j] = e
                total += e
            inv = np.float32(1.0) / total
            for j in range(T):
                if s[j] != 0.0:
                    p = s[j] * inv
                    v = qkv[b, j, v0:v0 + D]
                    for d in range(D):
                        o[d] += p * v[d]


def attention(qkv, mask_add, n_heads, pos_bias=None, out=None):
    """qkv [B, T, 3H], mask_add [B, T], pos_bias [N, T, T] or None -> [B, T, H], all float32.

    softmax(q k^T / sqrt(D) + pos_bias + mask_add) v per head, heads concatenated (see attention_reference).
    A query whose keys are all -inf gets zeros. `out` [B, T, H] is written in place when given.
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
    if T > 0:
        _attention_kernel(qkv, mask_add, int(n_heads), pos_bias, numba.config.NUMBA_NUM_THREADS, out)
    return out
