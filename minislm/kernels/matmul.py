"""Matmul with bias: y = x @ w.T + b, optionally followed by GELU (fused epilogue).

x [M, K] and w [N, K] (torch's Linear layout) are both read along K, so every output element is a dot
product over contiguous memory. The kernel computes the output in register tiles of MR x NR elements:
MR rows of x and NR rows of w are streamed once along K while MR*NR scalar accumulators collect the dot
products. With `fastmath` LLVM vectorises that k loop (each accumulator becomes one AVX-512 register of
16 partial sums), so one pass over a K chunk does MR*NR FMAs per MR+NR loads. Tiles are grouped in
MB x NB blocks (one parallel task each) whose x and w rows stay in L2 while the block is computed; K is
cut into chunks of KC so the MR+NR rows of a tile stay in L1. Bias and GELU are applied to each block
right after its last K chunk, while it is still in cache.

Backends: "numba" (the default) is this kernel. "blas" hands the product to numpy's BLAS (np.matmul) and
applies bias and GELU in a Numba epilogue; "auto" uses BLAS for large products (M >= BLAS_MIN_ROWS) and the
kernel for small ones. A tuned BLAS alone beats the kernel on large products, but inside the encoder the
BLAS's own thread pool and Numba's fight over the cores (measured by `python -m minislm.bench`), so the
default stays on the kernel. MINISLM_MATMUL=numba|blas|auto chooses; every path is tested against the same
references.
"""
import os

import numpy as np
from numba import njit, prange

from minislm.kernels.activations import gelu32, gelu_reference
from minislm.kernels.checks import check_array, output_array

MR = 4    # rows of x per register tile
NR = 4    # rows of w (output columns) per register tile
MB = 64   # rows per parallel block
NB = 64   # output columns per parallel block
KC = 768  # contraction chunk: a tile's MR+NR rows of KC floats stay in L1

_NO_BIAS = np.zeros(0, dtype=np.float32)
BACKENDS = ("numba", "blas", "auto")
BACKEND = os.environ.get("MINISLM_MATMUL", "numba")
BLAS_MIN_ROWS = 256  # "auto": rows of x from which numpy's BLAS is used


def resolve_backend(M, backend=None):
    """The backend a [M, K] x [K, N] product runs on."""
    choice = backend or BACKEND
    if choice not in BACKENDS:
        raise ValueError(f"matmul backend {choice!r} is unknown; use one of {', '.join(BACKENDS)} "
                         f"(MINISLM_MATMUL)")
    if choice == "auto":
        return "blas" if M >= BLAS_MIN_ROWS else "numba"
    return choice


def linear_reference(x, w, b=None, gelu=False):
    """[M, K] x [N, K] (+ [N]) -> [M, N]. Plain NumPy."""
    y = x @ w.T
    if b is not None:
        y = y + b
    return gelu_reference(y) if gelu else y.astype(np.float32)


@njit(cache=True, fastmath=True, parallel=False, inline="always")
def _tile(x, w, out, i, j, k0, k1, first):
    # out[i:i+4, j:j+4] (+)= x[i:i+4, k0:k1] @ w[j:j+4, k0:k1].T with 16 scalar accumulators.
    # Slicing first makes the loop index start at 0, so LLVM drops negative-index handling and
    # emits plain vector loads instead of gathers.
    x0 = x[i, k0:k1]
    x1 = x[i + 1, k0:k1]
    x2 = x[i + 2, k0:k1]
    x3 = x[i + 3, k0:k1]
    w0 = w[j, k0:k1]
    w1 = w[j + 1, k0:k1]
    w2 = w[j + 2, k0:k1]
    w3 = w[j + 3, k0:k1]
    c00 = c01 = c02 = c03 = np.float32(0.0)
    c10 = c11 = c12 = c13 = np.float32(0.0)
    c20 = c21 = c22 = c23 = np.float32(0.0)
    c30 = c31 = c32 = c33 = np.float32(0.0)
    for k in range(k1 - k0):
        a0 = x0[k]
        a1 = x1[k]
        a2 = x2[k]
        a3 = x3[k]
        b0 = w0[k]
        b1 = w1[k]
        b2 = w2[k]
        b3 = w3[k]
        c00 += a0 * b0
        c01 += a0 * b1
        c02 += a0 * b2
        c03 += a0 * b3
        c10 += a1 * b0
        c11 += a1 * b1
        c12 += a1 * b2
        c13 += a1 * b3
        c20 += a2 * b0
        c21 += a2 * b1
        c22 += a2 * b2
        c23 += a2 * b3
        c30 += a3 * b0
        c31 += a3 * b1
        c32 += a3 * b2
        c33 += a3 * b3
    if not first:
        c00 += out[i, j]
        c01 += out[i, j + 1]
        c02 += out[i, j + 2]
        c03 += out[i, j + 3]
        c10 += out[i + 1, j]
        c11 += out[i + 1, j + 1]
        c12 += out[i + 1, j + 2]
        c13 += out[i + 1, j + 3]
        c20 += out[i + 2, j]
        c21 += out[i + 2, j + 1]
        c22 += out[i + 2, j + 2]
        c23 += out[i + 2, j + 3]
        c30 += out[i + 3, j]
        c31 += out[i + 3, j + 1]
        c32 += out[i + 3, j + 2]
        c33 += out[i + 3, j + 3]
    out[i, j] = c00
    out[i, j + 1] = c01
    out[i, j + 2] = c02
    out[i, j + 3] = c03
    out[i + 1, j] = c10
    out[i + 1, j + 1] = c11
    out[i + 1, j + 2] = c12
    out[i + 1, j + 3] = c13
    out[i + 2, j] = c20
    out[i + 2, j + 1] = c21
    out[i + 2, j + 2] = c22
    out[i + 2, j + 3] = c23
    out[i + 3, j] = c30
    out[i + 3, j + 1] = c31
    out[i + 3, j + 2] = c32
    out[i + 3, j + 3] = c33


@njit(cache=True, fastmath=True, parallel=False, inline="always")
def _dot(x, w, out, i, j, k0, k1, first):
    # the 1 x 1 tile, for the rows and columns left over when M or N is not a multiple of 4
    xi = x[i, k0:k1]
    wj = w[j, k0:k1]
    c = np.float32(0.0)
    for k in range(k1 - k0):
        c += xi[k] * wj[k]
    out[i, j] = c if first else out[i, j] + c


@njit(cache=True, fastmath=True, parallel=True)
def _linear_kernel(x, w, b, gelu, out):
    # [M, K] x [N, K] (+ [N] when b is non-empty) -> out [M, N]
    M, K = x.shape
    N = w.shape[0]
    n_col_blocks = (N + NB - 1) // NB
    n_blocks = ((M + MB - 1) // MB) * n_col_blocks
    for blk in prange(n_blocks):
        i0 = (blk // n_col_blocks) * MB
        j0 = (blk % n_col_blocks) * NB
        i1 = min(M, i0 + MB)
        j1 = min(N, j0 + NB)
        i_tiles = i0 + (i1 - i0) // MR * MR  # rows [i0, i_tiles) are covered by full tiles
        j_tiles = j0 + (j1 - j0) // NR * NR
        for k0 in range(0, K, KC):
            k1 = min(K, k0 + KC)
            first = k0 == 0
            for i in range(i0, i_tiles, MR):
                for j in range(j0, j_tiles, NR):
                    _tile(x, w, out, i, j, k0, k1, first)
                for j in range(j_tiles, j1):
                    for r in range(i, i + MR):
                        _dot(x, w, out, r, j, k0, k1, first)
            for i in range(i_tiles, i1):
                for j in range(j0, j1):
                    _dot(x, w, out, i, j, k0, k1, first)
        if K == 0:
            out[i0:i1, j0:j1] = 0.0
        if b.shape[0] > 0 or gelu:
            for i in range(i0, i1):
                row = out[i, j0:j1]
                for j in range(j1 - j0):
                    v = row[j]
                    if b.shape[0] > 0:
                        v += b[j0 + j]
                    row[j] = gelu32(v) if gelu else v


@njit(cache=True, fastmath=True, parallel=True)
def _bias_gelu_kernel(out, b, gelu):
    # out [M, N] += b [N] (when non-empty), then GELU in place: the epilogue of the BLAS backend
    M, N = out.shape
    for i in prange(M):
        row = out[i]
        for j in range(N):
            v = row[j]
            if b.shape[0] > 0:
                v += b[j]
            row[j] = gelu32(v) if gelu else v


def linear(x, w, b=None, gelu=False, out=None, backend=None):
    """[M, K] x [N, K] (+ [N]) -> [M, N]: y = x @ w.T + b, then exact-erf GELU if `gelu`.

    All arrays float32 and C-contiguous; `out` [M, N] is written in place when given (it must not overlap
    x or w). backend: "numba", "blas" or "auto" (default: MINISLM_MATMUL, else "numba"; see the module doc).
    """
    check_array("linear", "x", x, ndim=2)
    check_array("linear", "w", w, ndim=2)
    M, K = x.shape
    N = w.shape[0]
    if w.shape[1] != K:
        raise ValueError(f"linear: w has shape {w.shape} but x has K={K} columns; w must be [N, K] "
                         f"(torch Linear layout [out_features, in_features])")
    if b is None:
        b = _NO_BIAS
    else:
        check_array("linear", "b", b, shape=(N,))
    out = output_array("linear", out, (M, N))
    if np.may_share_memory(out, x) or np.may_share_memory(out, w):
        raise ValueError("linear: out overlaps x or w; pass a separate output array")
    if resolve_backend(M, backend) == "blas" and K > 0:
        np.matmul(x, w.T, out=out)
        if b.shape[0] > 0 or gelu:
            _bias_gelu_kernel(out, b, bool(gelu))
    else:
        _linear_kernel(x, w, b, bool(gelu), out)
    return out
