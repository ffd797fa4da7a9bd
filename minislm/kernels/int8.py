"""int8 linear: y = dequant(quant(x) @ quant(w).T) + b, optionally GELU, with int32 accumulation.

Weights, once (`quantize_weight`): per output channel n, symmetric,
    sw[n] = max_k |w[n, k]| / 63,   wq[n, k] = round(w[n, k] / sw[n]) in [-63, 63]   (int8, 7 bits)
Activations, on every call, per row i, asymmetric unsigned (`quantize_rows_reference`):
    lo = min(0, min_k x[i, k]), hi = max(0, max_k x[i, k]), sx[i] = (hi - lo) / 255,
    z[i] = round(-lo / sx[i]),      xq[i, k] = clip(round(x[i, k] / sx[i]) + z[i], 0, 255)   (uint8)
so x[i, k] ~ sx[i] (xq[i, k] - z[i]) and w[n, k] ~ sw[n] wq[n, k]. The product in integers is
    acc[i, n] = sum_k xq[i, k] wq[n, k] - z[i] colsum[n],   colsum[n] = sum_k wq[n, k]
and y[i, n] = float32(acc[i, n]) * (sx[i] * sw[n]) + b[n]. (round = half to even, as np.rint.)

Why u8 x s8 and 7-bit weights: x86 multiplies unsigned by signed bytes (simd_int8.py). AVX-512 VNNI's
vpdpbusd sums 4 such products into int32 exactly; AVX2's vpmaddubsw first sums pairs into int16 with
saturation, and 2 x 255 x 127 = 64770 would overflow it, while 2 x 255 x 63 = 32130 cannot (ONNX
Runtime's `reduce_range` makes the same choice of 7-bit weights for CPUs without VNNI). Both paths then
compute the same integers, so results do not depend on the machine. Accumulators stay exact while
K x 255 x 63 < 2^31, i.e. K <= MAX_K.

Layout: Int8Weight.panels [ceil(N/32), K'/4, 128] int8 (K' = K rounded up to 4): panel p, group g holds
the 4 weights k = 4g .. 4g+3 of each of the 32 columns 32p .. 32p+31, column after column, so one int32
lane of a vector load is one column's 4 weights. A register tile (8 rows x 32 columns on AVX-512 VNNI:
16 accumulators of 16 lanes; 2 x 32 on AVX2: 8 accumulators of 8 lanes, the three-instruction madd needs
the remaining registers) broadcasts 4 activation bytes of a row and multiplies them into two (four)
weight vectors per step. Parallel tasks of rows x panels as in matmul.py; each task's int32 block goes
through the epilogue (zero-point correction, scales, bias, GELU) while still in cache.

`linear_int8_reference` is the same arithmetic in NumPy; the kernel's output equals it exactly without
GELU (tests/test_int8.py). On CPUs with neither VNNI nor AVX2 `linear_int8` runs the reference.
"""
import numba
import numpy as np
from numba import njit, prange

from minislm.kernels.activations import gelu32, gelu_reference
from minislm.kernels.checks import check_array, output_array
from minislm.kernels.simd import LANES, hmax16, hmin16, load16, max16, min16, splat16
from minislm.kernels.simd_int8 import (bcast4x8, bcast4x16, dpbusd16, load_i32x8, load_i32x16, madd_u8s8_8,
                                       store_i32x8, store_i32x16, zeros_i32x8, zeros_i32x16)
from minislm.numba_setup import has_feature

WEIGHT_MAX = 63     # weights in [-63, 63]: vpmaddubsw's int16 pairs cannot saturate (module doc)
ACT_MAX = 255       # activation codes in [0, 255]
K_GROUP = 4         # products summed per int32 lane
NR8 = 32            # output columns per panel, on both paths
MAX_K = (2 ** 31 - 1) // (ACT_MAX * WEIGHT_MAX)  # longest contraction whose int32 sums cannot overflow
MB8 = 64            # rows per parallel task
GROUP8 = 4          # panels per parallel task (128 columns) once M >= GROUP8_MIN_ROWS
GROUP8_MIN_ROWS = 256

PATH = "vnni" if has_feature("avx512vnni") else "avx2" if has_feature("avx2") else "numpy"
TILE_ROWS8 = 8 if PATH == "vnni" else 2
# No reassociation, contraction or reciprocals: the epilogue rounds exactly as the NumPy reference.
# (No NaN/inf: inputs must be finite; that lets the min/max loops vectorise.)
EXACT_FASTMATH = {"nnan", "ninf", "nsz"}

_NO_BIAS = np.zeros(0, dtype=np.float32)


class Int8Weight:
    """w [N, K] quantized per output channel: w ~ codes() * scales[:, None] (see the module doc).

    panels [ceil(N/32), K'/4, 128] int8, scales [N] float32, colsums [N] int32 (sum of each row's codes).
    """

    def __init__(self, codes, scales):
        self.n, self.k = codes.shape
        n_panels, k_groups = -(-self.n // NR8), -(-self.k // K_GROUP)
        padded = np.zeros((n_panels * NR8, k_groups * K_GROUP), dtype=np.int8)
        padded[:self.n, :self.k] = codes
        self.panels = np.ascontiguousarray(
            padded.reshape(n_panels, NR8, k_groups, K_GROUP).transpose(0, 2, 1, 3).reshape(n_panels, k_groups,
                                                                                           NR8 * K_GROUP))
        self.scales = np.ascontiguousarray(scales, dtype=np.float32)
        self.colsums = codes.astype(np.int32).sum(axis=1, dtype=np.int32)

    @property
    def shape(self):
        """(N, K), the shape of the weight it quantizes."""
        return (self.n, self.k)

    def codes(self):
        """-> wq [N, K] int8, unpacked from the panels."""
        n_panels, k_groups = self.panels.shape[:2]
        wide = self.panels.reshape(n_panels, k_groups, NR8, K_GROUP).transpose(0, 2, 1, 3)
        return np.ascontiguousarray(wide.reshape(n_panels * NR8, k_groups * K_GROUP)[:self.n, :self.k])

    def dequantize(self):
        """-> [N, K] float32: codes x scales, the weight the int8 kernel effectively multiplies by."""
        return self.codes().astype(np.float32) * self.scales[:, None]


def quantize_weight(w):
    """w [N, K] float32 (torch Linear layout) -> Int8Weight: symmetric int8 per output channel, |codes| <= 63."""
    check_array("quantize_weight", "w", w, ndim=2)
    peak = np.abs(w).max(axis=1, initial=0.0)
    scales = np.where(peak > 0, peak / np.float32(WEIGHT_MAX), np.float32(1.0)).astype(np.float32)
    codes = np.clip(np.rint(w / scales[:, None]), -WEIGHT_MAX, WEIGHT_MAX).astype(np.int8)
    return Int8Weight(codes, scales)


def quantize_rows_reference(x):
    """x [M, K] float32 -> (xq [M, K] uint8, z [M] int32, sx [M] float32): x ~ sx (xq - z), per row."""
    lo = np.minimum(x.min(axis=1, initial=0.0), np.float32(0.0))
    hi = np.maximum(x.max(axis=1, initial=0.0), np.float32(0.0))
    scale = (hi - lo) / np.float32(ACT_MAX)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    zero = np.rint(-lo / scale)
    xq = np.clip(np.rint(x / scale[:, None]) + zero[:, None], 0, ACT_MAX).astype(np.uint8)
    return xq, zero.astype(np.int32), scale


def int8_accumulators_reference(xq, zero, w8):
    """xq [M, K] uint8, z [M] int32, Int8Weight [N, K] -> acc [M, N] int32 = xq @ wq.T - z colsum (exact)."""
    acc = xq.astype(np.int64) @ w8.codes().astype(np.int64).T - zero.astype(np.int64)[:, None] * w8.colsums
    return acc.astype(np.int32)


def linear_int8_reference(x, w8, b=None, gelu=False):
    """x [M, K] float32, Int8Weight [N, K] (+ b [N]) -> [M, N] float32. Plain NumPy, the kernel's arithmetic."""
    xq, zero, sx = quantize_rows_reference(x)
    acc = int8_accumulators_reference(xq, zero, w8)
    y = acc.astype(np.float32) * (sx[:, None] * w8.scales[None, :])
    if b is not None:
        y = y + b
    return gelu_reference(y) if gelu else y


@njit(cache=True, fastmath=EXACT_FASTMATH, parallel=True)
def _quantize_rows_kernel(x, xq, zero, scale):
    # x [M, K] float32 -> xq [M, K'] uint8 (zero past K), zero [M] int32, scale [M]: quantize_rows_reference
    M, K = x.shape
    for i in prange(M):
        row, codes = x[i], xq[i]
        lo, hi = _row_range(row)
        s = (hi - lo) / np.float32(ACT_MAX)
        if not s > 0:
            s = np.float32(1.0)
        z = np.rint(-lo / s)
        for k in range(K):
            codes[k] = np.uint8(min(max(np.rint(row[k] / s) + z, np.float32(0.0)), np.float32(ACT_MAX)))
        for k in range(K, codes.shape[0]):
            codes[k] = 0
        zero[i] = np.int32(z)
        scale[i] = s


@njit(cache=True, inline="always")
def _row_range(row):
    # row [K] -> (min(0, min row), max(0, max row)), 16 lanes at a time: LLVM leaves min/max loops scalar
    K16 = row.shape[0] // LANES * LANES
    low = high = splat16(np.float32(0.0))
    for k in range(0, K16, LANES):
        v = load16(row, k)
        low, high = min16(low, v), max16(high, v)
    lo, hi = hmin16(low), hmax16(high)
    for k in range(K16, row.shape[0]):
        lo, hi = min(lo, row[k]), max(hi, row[k])
    return lo, hi


@njit(cache=True, inline="always")
def _tile_vnni_8x32(xq, panel, acc, i, r0, c0):
    # xq [M, K'] uint8, panel [K'/4, 128] int8 -> acc[r0:r0+8, c0:c0+32] = xq[i:i+8] @ codes (int32)
    x0, x1, x2, x3, x4, x5, x6, x7 = xq[i], xq[i + 1], xq[i + 2], xq[i + 3], xq[i + 4], xq[i + 5], xq[i + 6], xq[i + 7]
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = zeros_i32x16()  # c{r}{h}: row r, columns 16h .. 16h+15
    c40 = c41 = c50 = c51 = c60 = c61 = c70 = c71 = zeros_i32x16()
    for g in range(panel.shape[0]):
        b0 = load_i32x16(panel[g], 0)
        b1 = load_i32x16(panel[g], 64)
        a = bcast4x16(x0, 4 * g)
        c00, c01 = dpbusd16(c00, a, b0), dpbusd16(c01, a, b1)
        a = bcast4x16(x1, 4 * g)
        c10, c11 = dpbusd16(c10, a, b0), dpbusd16(c11, a, b1)
        a = bcast4x16(x2, 4 * g)
        c20, c21 = dpbusd16(c20, a, b0), dpbusd16(c21, a, b1)
        a = bcast4x16(x3, 4 * g)
        c30, c31 = dpbusd16(c30, a, b0), dpbusd16(c31, a, b1)
        a = bcast4x16(x4, 4 * g)
        c40, c41 = dpbusd16(c40, a, b0), dpbusd16(c41, a, b1)
        a = bcast4x16(x5, 4 * g)
        c50, c51 = dpbusd16(c50, a, b0), dpbusd16(c51, a, b1)
        a = bcast4x16(x6, 4 * g)
        c60, c61 = dpbusd16(c60, a, b0), dpbusd16(c61, a, b1)
        a = bcast4x16(x7, 4 * g)
        c70, c71 = dpbusd16(c70, a, b0), dpbusd16(c71, a, b1)
    _store_vnni(acc[r0], c0, c00, c01)
    _store_vnni(acc[r0 + 1], c0, c10, c11)
    _store_vnni(acc[r0 + 2], c0, c20, c21)
    _store_vnni(acc[r0 + 3], c0, c30, c31)
    _store_vnni(acc[r0 + 4], c0, c40, c41)
    _store_vnni(acc[r0 + 5], c0, c50, c51)
    _store_vnni(acc[r0 + 6], c0, c60, c61)
    _store_vnni(acc[r0 + 7], c0, c70, c71)


@njit(cache=True, inline="always")
def _tile_vnni_1x32(xq, panel, acc, i, r0, c0):
    # one row of _tile_vnni_8x32
    x0 = xq[i]
    c0_ = c1_ = zeros_i32x16()
    for g in range(panel.shape[0]):
        a = bcast4x16(x0, 4 * g)
        c0_, c1_ = dpbusd16(c0_, a, load_i32x16(panel[g], 0)), dpbusd16(c1_, a, load_i32x16(panel[g], 64))
    _store_vnni(acc[r0], c0, c0_, c1_)


@njit(cache=True, inline="always")
def _store_vnni(row, c0, low, high):
    store_i32x16(row, c0, low)
    store_i32x16(row, c0 + 16, high)


@njit(cache=True, inline="always")
def _tile_avx2_2x32(xq, panel, acc, i, r0, c0):
    # xq [M, K'] uint8, panel [K'/4, 128] int8 -> acc[r0:r0+2, c0:c0+32] (int32), 8-lane AVX2 vectors
    x0, x1 = xq[i], xq[i + 1]
    c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = zeros_i32x8()  # c{r}{q}: row r, columns 8q .. 8q+7
    for g in range(panel.shape[0]):
        b0, b1 = load_i32x8(panel[g], 0), load_i32x8(panel[g], 32)
        b2, b3 = load_i32x8(panel[g], 64), load_i32x8(panel[g], 96)
        a = bcast4x8(x0, 4 * g)
        c00, c01 = madd_u8s8_8(c00, a, b0), madd_u8s8_8(c01, a, b1)
        c02, c03 = madd_u8s8_8(c02, a, b2), madd_u8s8_8(c03, a, b3)
        a = bcast4x8(x1, 4 * g)
        c10, c11 = madd_u8s8_8(c10, a, b0), madd_u8s8_8(c11, a, b1)
        c12, c13 = madd_u8s8_8(c12, a, b2), madd_u8s8_8(c13, a, b3)
    _store_avx2(acc[r0], c0, c00, c01, c02, c03)
    _store_avx2(acc[r0 + 1], c0, c10, c11, c12, c13)


@njit(cache=True, inline="always")
def _tile_avx2_1x32(xq, panel, acc, i, r0, c0):
    # one row of _tile_avx2_2x32
    x0 = xq[i]
    c0_ = c1_ = c2_ = c3_ = zeros_i32x8()
    for g in range(panel.shape[0]):
        a = bcast4x8(x0, 4 * g)
        c0_, c1_ = madd_u8s8_8(c0_, a, load_i32x8(panel[g], 0)), madd_u8s8_8(c1_, a, load_i32x8(panel[g], 32))
        c2_, c3_ = madd_u8s8_8(c2_, a, load_i32x8(panel[g], 64)), madd_u8s8_8(c3_, a, load_i32x8(panel[g], 96))
    _store_avx2(acc[r0], c0, c0_, c1_, c2_, c3_)


@njit(cache=True, inline="always")
def _store_avx2(row, c0, v0, v1, v2, v3):
    store_i32x8(row, c0, v0)
    store_i32x8(row, c0 + 8, v1)
    store_i32x8(row, c0 + 16, v2)
    store_i32x8(row, c0 + 24, v3)


# The tiles of this CPU, chosen here so that only their x86 instructions are ever compiled.
if PATH == "vnni":
    _tile, _tile_1row = _tile_vnni_8x32, _tile_vnni_1x32
else:
    _tile, _tile_1row = _tile_avx2_2x32, _tile_avx2_1x32


@njit(cache=True, fastmath=EXACT_FASTMATH, parallel=True)
def _linear_int8_kernel(xq, zero, sx, panels, colsums, sw, b, gelu, acc_scratch, out):
    # xq [M, K'] uint8, zero [M], sx [M], panels [P, K'/4, 128], colsums [n], sw [n] (+ b [n] when
    # non-empty) -> out [M, n]; acc_scratch [threads, MB8, GROUP8 * 32] int32, one block per thread
    M, n = out.shape
    P = panels.shape[0]
    group = GROUP8 if M >= GROUP8_MIN_ROWS else 1  # small M: one panel per task, so both cores get work
    n_groups = (P + group - 1) // group
    n_row_blocks = (M + MB8 - 1) // MB8
    has_bias = b.shape[0] > 0
    for task in prange(n_groups * n_row_blocks):
        p0 = (task // n_row_blocks) * group
        p1 = min(P, p0 + group)
        i0 = (task % n_row_blocks) * MB8
        i1 = min(M, i0 + MB8)
        acc = acc_scratch[numba.get_thread_id()]
        i_tiles = i0 + (i1 - i0) // TILE_ROWS8 * TILE_ROWS8
        for p in range(p0, p1):
            for i in range(i0, i_tiles, TILE_ROWS8):
                _tile(xq, panels[p], acc, i, i - i0, (p - p0) * NR8)
            for i in range(i_tiles, i1):
                _tile_1row(xq, panels[p], acc, i, i - i0, (p - p0) * NR8)
        j0, j1 = p0 * NR8, min(n, p1 * NR8)  # the epilogue, on real columns only
        for i in range(i0, i1):
            block, dst, z, s = acc[i - i0], out[i], zero[i], sx[i]
            for j in range(j0, j1):
                y = np.float32(block[j - j0] - z * colsums[j]) * (s * sw[j])
                if has_bias:
                    y += b[j]
                dst[j] = gelu32(y) if gelu else y


def linear_int8(x, w8, b=None, gelu=False, out=None):
    """[M, K] x Int8Weight [N, K] (+ [N]) -> [M, N]: linear(x, w, b, gelu) in int8 (see the module doc).

    x, b and out float32 and C-contiguous, x finite; `out` [M, N] is written in place when given (it must
    not overlap x). Same calling convention as matmul.linear, with w quantized once by `quantize_weight`.
    """
    check_array("linear_int8", "x", x, ndim=2)
    if not isinstance(w8, Int8Weight):
        raise ValueError(f"linear_int8: w8 must be an Int8Weight, got {type(w8).__name__}; "
                         f"make one with quantize_weight(w)")
    M, K = x.shape
    N, w_k = w8.shape
    if w_k != K:
        raise ValueError(f"linear_int8: w8 has shape {w8.shape} but x has K={K} columns; w must be [N, K]")
    if K > MAX_K:
        raise ValueError(f"linear_int8: K={K} > MAX_K={MAX_K}: the int32 sums could overflow")
    if b is None:
        b = _NO_BIAS
    else:
        check_array("linear_int8", "b", b, shape=(N,))
    out = output_array("linear_int8", out, (M, N))
    if np.may_share_memory(out, x):
        raise ValueError("linear_int8: out overlaps x; pass a separate output array")
    if M == 0 or N == 0:
        return out
    if PATH == "numpy":
        out[:] = linear_int8_reference(x, w8, b if b.shape[0] else None, gelu)
        return out
    xq = np.empty((M, w8.panels.shape[1] * K_GROUP), dtype=np.uint8)
    zero, sx = np.empty(M, dtype=np.int32), np.empty(M, dtype=np.float32)
    _quantize_rows_kernel(x, xq, zero, sx)
    acc = np.empty((numba.config.NUMBA_NUM_THREADS, MB8, GROUP8 * NR8), dtype=np.int32)
    _linear_int8_kernel(xq, zero, sx, w8.panels, w8.colsums, w8.scales, b, bool(gelu), acc, out)
    return out
