"""Register tiles of the GEMM: out[i:i+R, j0:j0+W] = x[i:i+R, :] @ panel, with panel [K, W].

Written as loops a tile is just

    for k in range(K):
        for r in range(R):
            for j in range(W):
                acc[r, j] += x[i + r, k] * panel[k, j]

but an `acc` array lives in memory, so every multiply-add would load and store it. Here the R x W
accumulators are vector variables (simd.float32x16 or float32x8), which LLVM keeps in registers for the
whole k loop. One step of k is then: W/lanes loads of the panel's weights, R broadcasts of x[i + r, k] and
R W/lanes fused multiply-adds, with no memory traffic for the accumulators. That is the micro-kernel of
every fast BLAS. Which tile runs is fixed at import by the CPU (PANEL and TILE_ROWS below):

    AVX-512 (32 registers of 16 floats): 8 x 32, 16 accumulators, panels of W = 32 columns
    AVX2    (16 registers of 8 floats):  6 x 16, 12 accumulators + 2 weight vectors + 1 broadcast,
                                         panels of W = 16 columns (BLIS's Haswell/Zen sgemm shape)

The 2 x 32 tile (8 accumulators) was the AVX2 tile before; it stays as the point of comparison. Compiled
for Haswell and timed on one core of an AVX-512 Xeon (a proxy: no AVX2-only CPU was at hand), over
480 x 384 @ 384 x 1536: 6 x 16 82 GFLOP/s, 4 x 24 82, 2 x 32 55-65, 8 x 16 37 (its 16 accumulators
spill). Rows left over go through 2 x 16 and 1 x 16 tiles on AVX2, 1 x 32 on AVX-512. Every tile is
tested against NumPy (tests/test_kernels.py, tests/test_kernels_avx2.py).

`rows_times_panels` runs the tiles over a block of rows and panels; the GEMM (matmul.py) and both
products of attention (attention.py) are built on it.
"""
import numpy as np
from numba import njit

from minislm.kernels.simd import add8, add16, fma8, fma16, load8, load16, splat8, splat16, store8, store16
from minislm.numba_setup import vector_width_bits

AVX512 = vector_width_bits() >= 512     # the tiles this process compiles: 8 x 32 or 6 x 16
PANEL = 32 if AVX512 else 16            # output columns per tile (one panel of weights)
TILE_ROWS = 8 if AVX512 else 6          # rows per tile on this CPU: tile_8x32 or tile_6x16
TILE = f"{TILE_ROWS}x{PANEL}"
K_CHUNK = 1024                          # contraction chunk (see rows_times_panels)


def whole_panels(n):
    """n rounded up to a multiple of PANEL: the padded width of n columns, keys or head dims."""
    return -(-n // PANEL) * PANEL


@njit(cache=True)  # a real call, not inlined: compiled once for the GEMM and both products of attention
def rows_times_panels(x, panels, out, i0, i1, p0, p1):
    """out[i0:i1, W p:W p+W] = x[i0:i1] @ panels[p] for p in [p0, p1); x [M, K], panels [P, K, W], W = PANEL.

    K is cut into chunks of K_CHUNK so that a tile's rows of x (R x K_CHUNK floats) stay in L1 while the
    tile visits the panels; every chunk after the first adds to the output.
    """
    K = x.shape[1]
    i_tiles = i0 + (i1 - i0) // TILE_ROWS * TILE_ROWS
    for k0 in range(0, max(K, 1), K_CHUNK):
        k1 = min(K, k0 + K_CHUNK)
        xk = x[:, k0:k1]
        later = k0 > 0
        for i in range(i0, i_tiles, TILE_ROWS):
            for p in range(p0, p1):
                if AVX512:  # a compile-time constant: only one branch is compiled
                    tile_8x32(xk, panels[p, k0:k1], out, i, p * PANEL, later)
                else:
                    tile_6x16(xk, panels[p, k0:k1], out, i, p * PANEL, later)
        if AVX512:
            for i in range(i_tiles, i1):
                for p in range(p0, p1):
                    tile_1x32(xk, panels[p, k0:k1], out, i, p * PANEL, later)
        else:  # up to 5 rows left: pairs first, as one row alone is 2 dependent FMA chains (latency-bound)
            i_pairs = i_tiles + (i1 - i_tiles) // 2 * 2
            for i in range(i_tiles, i_pairs, 2):
                for p in range(p0, p1):
                    tile_2x16(xk, panels[p, k0:k1], out, i, p * PANEL, later)
            for i in range(i_pairs, i1):
                for p in range(p0, p1):
                    tile_1x16(xk, panels[p, k0:k1], out, i, p * PANEL, later)


@njit(cache=True, inline="always")
def tile_8x32(x, panel, out, i, j0, accumulate):
    # x [M, K], panel [K, 32] -> out[i:i+8, j0:j0+32] (+= when accumulate)
    x0, x1, x2, x3, x4, x5, x6, x7 = x[i], x[i + 1], x[i + 2], x[i + 3], x[i + 4], x[i + 5], x[i + 6], x[i + 7]
    zero = splat16(np.float32(0.0))
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = zero  # c{r}{h}: row r, columns 16h .. 16h+15
    c40 = c41 = c50 = c51 = c60 = c61 = c70 = c71 = zero
    for k in range(panel.shape[0]):
        b0 = load16(panel[k], 0)
        b1 = load16(panel[k], 16)
        a = splat16(x0[k])
        c00, c01 = fma16(a, b0, c00), fma16(a, b1, c01)
        a = splat16(x1[k])
        c10, c11 = fma16(a, b0, c10), fma16(a, b1, c11)
        a = splat16(x2[k])
        c20, c21 = fma16(a, b0, c20), fma16(a, b1, c21)
        a = splat16(x3[k])
        c30, c31 = fma16(a, b0, c30), fma16(a, b1, c31)
        a = splat16(x4[k])
        c40, c41 = fma16(a, b0, c40), fma16(a, b1, c41)
        a = splat16(x5[k])
        c50, c51 = fma16(a, b0, c50), fma16(a, b1, c51)
        a = splat16(x6[k])
        c60, c61 = fma16(a, b0, c60), fma16(a, b1, c61)
        a = splat16(x7[k])
        c70, c71 = fma16(a, b0, c70), fma16(a, b1, c71)
    _store_row(out[i], j0, c00, c01, accumulate)
    _store_row(out[i + 1], j0, c10, c11, accumulate)
    _store_row(out[i + 2], j0, c20, c21, accumulate)
    _store_row(out[i + 3], j0, c30, c31, accumulate)
    _store_row(out[i + 4], j0, c40, c41, accumulate)
    _store_row(out[i + 5], j0, c50, c51, accumulate)
    _store_row(out[i + 6], j0, c60, c61, accumulate)
    _store_row(out[i + 7], j0, c70, c71, accumulate)


@njit(cache=True, inline="always")
def tile_2x32(x, panel, out, i, j0, accumulate):
    # x [M, K], panel [K, 32] -> out[i:i+2, j0:j0+32] (+= when accumulate)
    x0, x1 = x[i], x[i + 1]
    c00 = c01 = c10 = c11 = splat16(np.float32(0.0))
    for k in range(panel.shape[0]):
        b0 = load16(panel[k], 0)
        b1 = load16(panel[k], 16)
        a = splat16(x0[k])
        c00, c01 = fma16(a, b0, c00), fma16(a, b1, c01)
        a = splat16(x1[k])
        c10, c11 = fma16(a, b0, c10), fma16(a, b1, c11)
    _store_row(out[i], j0, c00, c01, accumulate)
    _store_row(out[i + 1], j0, c10, c11, accumulate)


@njit(cache=True, inline="always")
def tile_1x32(x, panel, out, i, j0, accumulate):
    # x [M, K], panel [K, 32] -> out[i, j0:j0+32] (+= when accumulate)
    x0 = x[i]
    c0 = c1 = splat16(np.float32(0.0))
    for k in range(panel.shape[0]):
        a = splat16(x0[k])
        c0, c1 = fma16(a, load16(panel[k], 0), c0), fma16(a, load16(panel[k], 16), c1)
    _store_row(out[i], j0, c0, c1, accumulate)


@njit(cache=True, inline="always")
def _store_row(row, j0, low, high, accumulate):
    if accumulate:  # a later chunk of K: add to what the earlier chunks left
        low = add16(low, load16(row, j0))
        high = add16(high, load16(row, j0 + 16))
    store16(row, j0, low)
    store16(row, j0 + 16, high)


@njit(cache=True, inline="always")
def tile_6x16(x, panel, out, i, j0, accumulate):
    # x [M, K], panel [K, 16] -> out[i:i+6, j0:j0+16] (+= when accumulate); 8-lane vectors, for AVX2
    x0, x1, x2, x3, x4, x5 = x[i], x[i + 1], x[i + 2], x[i + 3], x[i + 4], x[i + 5]
    zero = splat8(np.float32(0.0))
    c00 = c01 = c10 = c11 = c20 = c21 = zero  # c{r}{h}: row r, columns 8h .. 8h+7
    c30 = c31 = c40 = c41 = c50 = c51 = zero
    for k in range(panel.shape[0]):
        b0 = load8(panel[k], 0)
        b1 = load8(panel[k], 8)
        a = splat8(x0[k])
        c00, c01 = fma8(a, b0, c00), fma8(a, b1, c01)
        a = splat8(x1[k])
        c10, c11 = fma8(a, b0, c10), fma8(a, b1, c11)
        a = splat8(x2[k])
        c20, c21 = fma8(a, b0, c20), fma8(a, b1, c21)
        a = splat8(x3[k])
        c30, c31 = fma8(a, b0, c30), fma8(a, b1, c31)
        a = splat8(x4[k])
        c40, c41 = fma8(a, b0, c40), fma8(a, b1, c41)
        a = splat8(x5[k])
        c50, c51 = fma8(a, b0, c50), fma8(a, b1, c51)
    _store_row8(out[i], j0, c00, c01, accumulate)
    _store_row8(out[i + 1], j0, c10, c11, accumulate)
    _store_row8(out[i + 2], j0, c20, c21, accumulate)
    _store_row8(out[i + 3], j0, c30, c31, accumulate)
    _store_row8(out[i + 4], j0, c40, c41, accumulate)
    _store_row8(out[i + 5], j0, c50, c51, accumulate)


@njit(cache=True, inline="always")
def tile_2x16(x, panel, out, i, j0, accumulate):
    # x [M, K], panel [K, 16] -> out[i:i+2, j0:j0+16] (+= when accumulate); 8-lane vectors, for AVX2
    x0, x1 = x[i], x[i + 1]
    c00 = c01 = c10 = c11 = splat8(np.float32(0.0))
    for k in range(panel.shape[0]):
        b0 = load8(panel[k], 0)
        b1 = load8(panel[k], 8)
        a = splat8(x0[k])
        c00, c01 = fma8(a, b0, c00), fma8(a, b1, c01)
        a = splat8(x1[k])
        c10, c11 = fma8(a, b0, c10), fma8(a, b1, c11)
    _store_row8(out[i], j0, c00, c01, accumulate)
    _store_row8(out[i + 1], j0, c10, c11, accumulate)


@njit(cache=True, inline="always")
def tile_1x16(x, panel, out, i, j0, accumulate):
    # x [M, K], panel [K, 16] -> out[i, j0:j0+16] (+= when accumulate); 8-lane vectors, for AVX2
    x0 = x[i]
    c0 = c1 = splat8(np.float32(0.0))
    for k in range(panel.shape[0]):
        a = splat8(x0[k])
        c0, c1 = fma8(a, load8(panel[k], 0), c0), fma8(a, load8(panel[k], 8), c1)
    _store_row8(out[i], j0, c0, c1, accumulate)


@njit(cache=True, inline="always")
def _store_row8(row, j0, low, high, accumulate):
    if accumulate:
        low = add8(low, load8(row, j0))
        high = add8(high, load8(row, j0 + 8))
    store8(row, j0, low)
    store8(row, j0 + 8, high)
