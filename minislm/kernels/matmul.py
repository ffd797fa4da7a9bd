"""Matmul with bias: y = x @ w.T + b, optionally followed by GELU (fused epilogue).

The weight w [N, K] (torch's Linear layout) is packed once into panels of W = PANEL output columns,
panels [N/W, K, W] (`pack_weight`), so that the GEMM's inner step reads W consecutive weights. W is 32
on AVX-512 CPUs and 16 on AVX2 ones (tiles.py): a PackedWeight is made for the CPU it runs on.
A register tile (tiles.py) computes an 8 x 32 block of the output: for each k it broadcasts
x[i..i+7, k], loads the panel's 32 weights at k into two 16-wide registers, and does 16 fused
multiply-adds into 16 accumulator registers (6 x 16 tiles with 12 accumulators on CPUs without AVX-512,
which have half the registers, each half as wide). Those 16 FMAs per 10 loads keep the FMA units busy,
which the caches allow because the work is cut into parallel tasks of MB rows x GROUP panels: the
group's panels (K x 128 floats) stay in L2 while row tiles stream past, and with K cut into chunks of
1024 a tile's rows of x stay in L1 while it visits the group's panels. Bias and GELU are applied to each
task's block right after it is computed, while it is still in cache. Small products (under SERIAL_MAX_FLOP,
e.g. one short text's) skip the parallel split and run the same tiles on one thread. `linear_reference` is
the plain NumPy definition every path is tested against.

Backends: "numba" (the default) is this kernel. "blas" hands the product to numpy's BLAS (np.matmul) and
applies bias and GELU in a Numba epilogue; "auto" uses BLAS for large products (M >= BLAS_MIN_ROWS) and the
kernel for small ones. Inside the encoder the BLAS's own thread pool and Numba's fight over the cores
(measured by `python -m minislm.bench`), so the default stays on the kernel.
MINISLM_MATMUL=numba|blas|auto chooses; every path is tested against the same references.
"""
import os

import numpy as np
from numba import njit, prange

from minislm.kernels.activations import GELU_FLOPS_PER_ELEM, gelu32, gelu_reference
from minislm.kernels.checks import check_array, output_array
from minislm.kernels.layout import transpose
from minislm.kernels.tiles import PANEL as NR  # output columns per panel and per register tile
from minislm.kernels.tiles import TILE_ROWS, rows_times_panels, whole_panels

MB = 8 * TILE_ROWS   # rows of x per parallel task: whole tiles (64 with 8-row tiles, 48 with 6-row ones)
GROUP = 128 // NR    # panels per parallel task (128 output columns)
GROUP_MIN_ROWS = 256  # below this many rows a task takes one panel, so small products still split
# Products (and attentions) under this many FLOPs run on one thread (_linear_kernel_serial); MINISLM_SERIAL_MAX_FLOP
# sets it, e.g. higher on a machine whose cores are busy with other work.
SERIAL_MAX_FLOP = int(float(os.environ.get("MINISLM_SERIAL_MAX_FLOP", 1e6)))

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


class PackedWeight:
    """A Linear weight w [N, K] rearranged for the GEMM's register tiles: panels [ceil(N/W), K, W].

    W = PANEL (32 on AVX-512, 16 on AVX2). Panel p holds weight rows W p .. W p + W-1 side by side, so one
    step of k in a tile reads W consecutive floats (two registers); rows past N are zero. Packed once when
    an encoder is loaded, for the CPU of this process.
    """

    def __init__(self, w):
        check_array("pack_weight", "w", w, ndim=2)
        self.n, self.k = w.shape
        n_panels = whole_panels(self.n) // NR
        padded = np.zeros((n_panels * NR, self.k), dtype=np.float32)
        padded[:self.n] = w
        self.panels = np.ascontiguousarray(padded.reshape(n_panels, NR, self.k).transpose(0, 2, 1))
        self._unpacked = None
        self._transposed = None

    @property
    def shape(self):
        """(N, K), the shape of the weight it packs."""
        return (self.n, self.k)

    def unpack(self):
        """-> w [N, K] (a copy): the torch-layout weight, e.g. for a backward pass."""
        return np.ascontiguousarray(self.panels.transpose(0, 2, 1).reshape(-1, self.k)[:self.n])

    def transposed(self):
        """-> TransposedWeight of this weight (the panels of w^T, for dx = dy @ w), made on first use and kept:
        the weights are never changed in place (a trained weight is packed anew after every update)."""
        if self._transposed is None:
            out = np.empty((whole_panels(self.k) // NR, self.n, NR), dtype=np.float32)
            _transpose_panels(self.panels, self.n, out)
            self._transposed = TransposedWeight.of_panels(out, n=self.k, k=self.n)
        return self._transposed

    def torch_layout(self):
        """w [N, K], unpacked on first use and kept: the BLAS backend reads this layout on every call."""
        if self._unpacked is None:
            self._unpacked = self.unpack()
        return self._unpacked


def pack_weight(w):
    """w [N, K] (torch Linear layout) -> PackedWeight."""
    return w if isinstance(w, PackedWeight) else PackedWeight(w)


@njit(cache=True, fastmath=True, parallel=True)
def _linear_kernel(x, panels, n, b, gelu, out):
    # x [M, K] @ panels [P, K, W] (n real columns) (+ b [n] when non-empty) -> out [M, n]
    M = x.shape[0]
    P = panels.shape[0]
    full_panels = n // NR                      # panels whose W columns all exist
    group = GROUP if M >= GROUP_MIN_ROWS else 1  # small M: one panel per task, so both cores get work
    n_groups = (full_panels + group - 1) // group
    n_row_blocks = (M + MB - 1) // MB
    for task in prange(n_groups * n_row_blocks):
        # consecutive tasks share a group of panels: it stays in cache while the rows stream past
        p0 = (task // n_row_blocks) * group
        p1 = min(full_panels, p0 + group)
        i0 = (task % n_row_blocks) * MB
        i1 = min(M, i0 + MB)
        rows_times_panels(x, panels, out, i0, i1, p0, p1)
        _epilogue(out, b, gelu, i0, i1, p0 * NR, p1 * NR)
    if full_panels < P:  # the last n % W columns: a plain loop, only ever a few columns
        j0 = full_panels * NR
        last = panels[P - 1]
        for i in prange(M):
            _last_columns(x, last, j0, n, b, gelu, out, i)


@njit(cache=True, fastmath=True)  # serial on purpose: see SERIAL_MAX_FLOP
def _linear_kernel_serial(x, panels, n, b, gelu, out):
    # _linear_kernel on one thread, for small products: x [M, K] @ panels [P, K, W] (+ b) -> out [M, n].
    # Measured on a 2-core AVX-512 host: below ~0.5 MFLOP the parallel split costs more than it saves, and
    # when another process holds a core, a parallel call waits for its descheduled thread (milliseconds).
    # One panel at a time over all rows: the panel (K x W floats) is read once, the rows stay in cache.
    M = x.shape[0]
    full_panels = n // NR
    for p in range(full_panels):
        rows_times_panels(x, panels, out, 0, M, p, p + 1)
        _epilogue(out, b, gelu, 0, M, p * NR, p * NR + NR)
    if full_panels < panels.shape[0]:
        j0 = full_panels * NR
        last = panels[panels.shape[0] - 1]
        for i in range(M):
            _last_columns(x, last, j0, n, b, gelu, out, i)


@njit(cache=True, fastmath=True, inline="always")
def _last_columns(x, last, j0, n, b, gelu, out, i):
    # out[i, j0:n] from the last, partial panel last [K, W], then its epilogue
    for j in range(n - j0):
        acc = np.float32(0.0)
        for k in range(x.shape[1]):
            acc += x[i, k] * last[k, j]
        out[i, j0 + j] = acc
    _epilogue(out, b, gelu, i, i + 1, j0, n)


@njit(cache=True, fastmath=True, inline="always")  # inlined into the prange body, where it vectorises
def _epilogue(out, b, gelu, i0, i1, j0, j1):
    # out[i0:i1, j0:j1] += b[j0:j1] (when b is non-empty), then GELU: applied while the block is in cache
    has_bias = b.shape[0] > 0
    if not has_bias and not gelu:
        return
    bias = b[j0:j1] if has_bias else b  # sliced so indices start at 0: plain vector loads, no gathers
    for i in range(i0, i1):
        row = out[i, j0:j1]
        for j in range(j1 - j0):
            v = row[j] + bias[j] if has_bias else row[j]
            row[j] = gelu32(v) if gelu else v


@njit(cache=True, fastmath=True, parallel=True)
def _bias_gelu_kernel(out, b, gelu):
    # out [M, N] += b [N] (when non-empty), then GELU in place: the epilogue of the BLAS backend
    M, N = out.shape
    for i in prange(M):
        _epilogue(out, b, gelu, i, i + 1, 0, N)


def linear(x, w, b=None, gelu=False, out=None, backend=None):
    """[M, K] x [N, K] (+ [N]) -> [M, N]: y = x @ w.T + b, then exact-erf GELU if `gelu`.

    w is the torch-layout weight [N, K] or, faster, the same weight packed once with `pack_weight`.
    All arrays float32 and C-contiguous; `out` [M, N] is written in place when given (it must not overlap
    x or w). backend: "numba", "blas" or "auto" (default: MINISLM_MATMUL, else "numba"; see the module doc).
    On "numba", products under SERIAL_MAX_FLOP (2 M K N) run on one thread, larger ones on all of them.
    """
    check_array("linear", "x", x, ndim=2)
    if not isinstance(w, PackedWeight):
        check_array("linear", "w", w, ndim=2)
    M, K = x.shape
    N, w_k = w.shape
    if w_k != K:
        raise ValueError(f"linear: w has shape {w.shape} but x has K={K} columns; w must be [N, K] "
                         f"(torch Linear layout [out_features, in_features])")
    if b is None:
        b = _NO_BIAS
    else:
        check_array("linear", "b", b, shape=(N,))
    out = output_array("linear", out, (M, N))
    weight_arrays = (w.panels,) if isinstance(w, PackedWeight) else (w,)
    if np.may_share_memory(out, x) or any(np.may_share_memory(out, a) for a in weight_arrays):
        raise ValueError("linear: out overlaps x or w; pass a separate output array")
    if resolve_backend(M, backend) == "blas" and K > 0:
        np.matmul(x, (w.torch_layout() if isinstance(w, PackedWeight) else w).T, out=out)
        if b.shape[0] > 0 or gelu:
            _bias_gelu_kernel(out, b, bool(gelu))
    elif M and N:
        kernel = _linear_kernel_serial if matmul_flops(M, K, N) < SERIAL_MAX_FLOP else _linear_kernel
        kernel(x, pack_weight(w).panels, N, b, bool(gelu), out)
    return out


def matmul_flops(M, K, N):
    """[M, K] x [K, N]: 2 M K N (one multiply-add = 2 FLOPs)."""
    return 2 * M * K * N


def linear_flops(M, K, N, bias=True, gelu=False):
    """linear() on M rows -> {"matmul": 2 M K N, "other": the bias add and the GELU epilogue}."""
    other = (M * N if bias else 0) + (GELU_FLOPS_PER_ELEM * M * N if gelu else 0)
    return {"matmul": matmul_flops(M, K, N), "other": other}


# ---------------------------------------------------------------- backward
#
# y = x w^T + b  =>  dx = dy w [M, K],  dw = dy^T x [N, K],  db = the sum of dy's rows [N].
# Both products are `linear` again, on the GEMM's register tiles: dx = dy @ w is linear(dy, w^T), and the
# panels of w^T are simply w cut into blocks of 32 columns (TransposedWeight), so nothing is transposed;
# dw = dy^T @ x is linear(dy^T, x^T) likewise, after one [N, M] copy of dy^T (M N floats beside 2 M N K FLOPs).

def linear_backward_reference(x, w, dy):
    """x [M, K], w [N, K], dy [M, N] -> (dx [M, K], dw [N, K], db [N]) for y = x w^T + b. Plain NumPy in the
    inputs' dtype: dx = dy w, dw = dy^T x, db = sum_i dy[i]."""
    return dy @ w, dy.T @ x, dy.sum(axis=0)


class TransposedWeight(PackedWeight):
    """The panels of a^T for a [R, C]: what `linear` needs to compute y @ a for y [M, R].

    panels [ceil(C/W), R, W] with panels[p, r, j] = a[r, W p + j] (zero past C), i.e. a's columns in blocks
    of W: one parallel copy of a (`_pack_columns`), no transpose. Its shape is (C, R), that of the
    torch-layout weight a^T.
    """

    def __init__(self, a):
        check_array("transposed_weight", "a", a, ndim=2)
        R, C = a.shape
        panels = np.empty((whole_panels(C) // NR, R, NR), dtype=np.float32)
        _pack_columns(a, panels)
        self._set(panels, n=C, k=R)

    @classmethod
    def of_panels(cls, panels, n, k):
        """Ready panels [ceil(n/W), k, W] of an [n, k] torch-layout weight -> TransposedWeight (no copy)."""
        out = cls.__new__(cls)
        out._set(panels, n, k)
        return out

    def _set(self, panels, n, k):
        self.panels, self.n, self.k = panels, n, k
        self._unpacked = self._transposed = None


@njit(cache=True, parallel=True)
def _pack_columns(a, panels):
    # a [R, C] -> panels [ceil(C/W), R, W], panels[p, r, j] = a[r, W p + j], zero past C. Rows go to threads:
    # each reads one row of a once and writes W-float runs.
    R, C = a.shape
    P = panels.shape[0]
    for r in prange(R):
        for p in range(P):
            c0 = p * NR
            width = min(NR, C - c0)
            for j in range(width):
                panels[p, r, j] = a[r, c0 + j]
            for j in range(width, NR):
                panels[p, r, j] = 0.0


@njit(cache=True, parallel=True)
def _transpose_panels(panels, n, out):
    # panels [P, K, W] of w [n, K] -> out [ceil(K/W), n, W], out[q, r, j] = w[r, W q + j]: the panels of w^T,
    # by W x W blocks (read contiguous from panels, written as W-float runs of out)
    P, K, W = panels.shape
    Q = out.shape[0]
    for p in prange(P):
        rows = min(W, n - p * W)
        for q in range(Q):
            k0 = q * W
            width = min(W, K - k0)
            for c in range(rows):
                r = p * W + c
                for j in range(width):
                    out[q, r, j] = panels[p, k0 + j, c]
                for j in range(width, W):
                    out[q, r, j] = 0.0


def transposed_weight(w):
    """w [N, K] (array or PackedWeight) -> the TransposedWeight of w, i.e. the packed w^T, with which
    linear(dy, ...) computes dy @ w. A PackedWeight keeps it (`PackedWeight.transposed`): a frozen weight is
    re-packed once, not at every backward."""
    return w.transposed() if isinstance(w, PackedWeight) else TransposedWeight(w)


def linear_backward(x, w, dy, need_dx=True, dw=None, db=None, accumulate=False, backend=None):
    """Backward of `linear` (without GELU: apply `gelu_backward` to dy first):
    x [M, K], w [N, K] or PackedWeight, dy [M, N] -> (dx [M, K] or None, dw [N, K], db [N]), all float32.

    dx = dy w, dw = dy^T x, db = sum_i dy[i] (see the section comment). need_dx=False skips dx (a first layer).
    dw [N, K] and db [N] are written when given, or added to with accumulate=True (e.g. over micro-batches).
    backend as in `linear`; db is summed in float64, so its error does not grow with M.
    """
    check_array("linear_backward", "x", x, ndim=2)
    if not isinstance(w, PackedWeight):
        check_array("linear_backward", "w", w, ndim=2)
    M, K = x.shape
    N, w_k = w.shape
    if w_k != K:
        raise ValueError(f"linear_backward: w has shape {w.shape} but x has K={K} columns; w must be [N, K]")
    check_array("linear_backward", "dy", dy, shape=(M, N))
    if accumulate and (dw is None or db is None):
        raise ValueError("linear_backward: accumulate=True needs the dw and db to add to")
    if dw is not None:
        check_array("linear_backward", "dw", dw, shape=(N, K))
    if db is not None:
        check_array("linear_backward", "db", db, shape=(N,))
    dx = None
    if need_dx:
        dx = linear(dy, transposed_weight(w), backend=backend)
    dy_t = transpose(dy)  # [N, M], cache-blocked (layout.py)
    if accumulate:
        dw += linear(dy_t, TransposedWeight(x), backend=backend)
        db += dy.sum(axis=0, dtype=np.float64).astype(np.float32)
        return dx, dw, db
    dw = linear(dy_t, TransposedWeight(x), out=dw, backend=backend)
    db_sum = dy.sum(axis=0, dtype=np.float64)
    if db is None:
        db = db_sum.astype(np.float32)
    else:
        db[:] = db_sum
    return dx, dw, db


def linear_backward_flops(M, K, N, need_dx=True):
    """linear_backward on M rows -> {"matmul": 2 M K N per product (dw, and dx unless skipped), "other": db}."""
    return {"matmul": matmul_flops(M, K, N) * (2 if need_dx else 1), "other": M * N}
