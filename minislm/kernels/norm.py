"""Layer norm with the residual add fused in: y = LN(x + residual) * gamma + beta.

Two passes over each row (mean, then the mean squared deviation) instead of E[h^2] - E[h]^2, which cancels
catastrophically when |mean| >> std. Both sums, and the centring, are done in float64 registers: a float32
sum of H values near 1e4 would already be off by ~1e-4 in the mean, more than the kernel's whole tolerance.
The backward recomputes mean and rstd the same way, in float64.
"""
import numpy as np
from numba import njit, prange

from minislm.kernels.checks import check_array, output_array


def layer_norm_reference(x, gamma, beta, eps, residual=None):
    """[M, H] (+ [M, H]) -> [M, H]."""
    h = x if residual is None else x + residual
    mu = h.mean(axis=-1, keepdims=True)
    var = ((h - mu) ** 2).mean(axis=-1, keepdims=True)
    return ((h - mu) / np.sqrt(var + eps) * gamma + beta).astype(np.float32)


@njit(cache=True, fastmath=True, parallel=True)
def _layer_norm_kernel(x, residual, has_residual, gamma, beta, eps, out):
    # [M, H] (+ [M, H]) -> out [M, H], one row per task; out may alias x or residual
    M, H = x.shape
    for r in prange(M):
        row = out[r]
        s = 0.0
        for c in range(H):
            v = x[r, c] + residual[r, c] if has_residual else x[r, c]
            row[c] = v
            s += np.float64(v)
        mu = s / H
        ss = 0.0
        for c in range(H):
            d = np.float64(row[c]) - mu
            ss += d * d
        rstd = 1.0 / np.sqrt(ss / H + eps)
        for c in range(H):
            # centre in float64 too: mu rounded to float32 is off by up to half an ulp of |mu|
            row[c] = np.float32((np.float64(row[c]) - mu) * rstd) * gamma[c] + beta[c]


def layer_norm(x, gamma, beta, eps, residual=None, out=None):
    """[M, H] (+ [M, H]) -> [M, H]: LN(x + residual) * gamma + beta with gamma, beta [H], all float32.

    `out` [M, H] is written in place when given; it may be x or residual itself.
    """
    check_array("layer_norm", "x", x, ndim=2)
    M, H = x.shape
    if H == 0:
        raise ValueError("layer_norm: x has no columns (H = 0); layer norm needs at least one feature")
    check_array("layer_norm", "gamma", gamma, shape=(H,))
    check_array("layer_norm", "beta", beta, shape=(H,))
    if residual is not None:
        check_array("layer_norm", "residual", residual, shape=(M, H))
    if not eps > 0:
        raise ValueError(f"layer_norm: eps must be a positive float, got {eps!r}")
    out = output_array("layer_norm", out, (M, H))
    _layer_norm_kernel(x, x if residual is None else residual, residual is not None, gamma, beta,
                       float(eps), out)
    return out


def layer_norm_backward_reference(x, gamma, eps, dy, residual=None):
    """x (+ residual) [M, H], gamma [H], dy [M, H] -> (dh [M, H], dgamma [H], dbeta [H]). Plain NumPy in the
    inputs' dtype (float64 for gradient checks).

    With h = x + residual, xhat = (h - mean) rstd and g = dy gamma:
        dh = rstd (g - mean(g) - xhat mean(g xhat)),  dgamma = sum over rows of dy xhat,  dbeta = sum of dy.
    dh is the gradient of both x and residual.
    """
    h = x if residual is None else x + residual
    mu = h.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((h - mu) ** 2).mean(axis=-1, keepdims=True) + eps)
    xhat = (h - mu) * rstd
    g = dy * gamma
    dh = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return dh, (dy * xhat).sum(axis=0), dy.sum(axis=0)


_LN_CHUNK = 32  # rows per parallel task of the backward: each task sums its own partial dgamma and dbeta


@njit(cache=True, fastmath=True, parallel=True)
def _layer_norm_backward_kernel(x, residual, has_residual, gamma, eps, dy, out, dgamma, dbeta, accumulate):
    # [M, H] (+ [M, H]), dy [M, H] -> out [M, H], dgamma, dbeta [H] (+= when accumulate); out may alias any input
    # row: its last pass reads each element just before writing it
    M, H = x.shape
    n_chunks = (M + _LN_CHUNK - 1) // _LN_CHUNK
    # one row of partial sums per chunk, not per thread: the result does not depend on the scheduling
    partial = np.zeros((n_chunks, 2, H), dtype=np.float64)
    for chunk in prange(n_chunks):
        dg, db = partial[chunk, 0], partial[chunk, 1]
        for r in range(chunk * _LN_CHUNK, min(M, (chunk + 1) * _LN_CHUNK)):
            # mean and rstd recomputed exactly as the forward does: two float64 passes
            s = 0.0
            for c in range(H):
                s += np.float64(x[r, c] + residual[r, c] if has_residual else x[r, c])
            mu = s / H
            ss = 0.0
            for c in range(H):
                d = np.float64(x[r, c] + residual[r, c] if has_residual else x[r, c]) - mu
                ss += d * d
            rstd = 1.0 / np.sqrt(ss / H + eps)
            sum_g = 0.0
            sum_gx = 0.0
            for c in range(H):
                xhat = (np.float64(x[r, c] + residual[r, c] if has_residual else x[r, c]) - mu) * rstd
                g = np.float64(dy[r, c]) * gamma[c]
                sum_g += g
                sum_gx += g * xhat
                dg[c] += dy[r, c] * xhat
                db[c] += dy[r, c]
            mean_g = sum_g / H
            mean_gx = sum_gx / H
            for c in range(H):
                xhat = (np.float64(x[r, c] + residual[r, c] if has_residual else x[r, c]) - mu) * rstd
                out[r, c] = np.float32(rstd * (np.float64(dy[r, c]) * gamma[c] - mean_g - xhat * mean_gx))
    for c in range(H):
        tg = 0.0
        tb = 0.0
        for chunk in range(n_chunks):
            tg += partial[chunk, 0, c]
            tb += partial[chunk, 1, c]
        if accumulate:
            dgamma[c] += tg
            dbeta[c] += tb
        else:
            dgamma[c] = tg
            dbeta[c] = tb


def layer_norm_backward(x, gamma, eps, dy, residual=None, out=None, dgamma=None, dbeta=None, accumulate=False):
    """Backward of `layer_norm`: x (+ residual) [M, H], gamma [H], dy [M, H] -> (dh [M, H], dgamma [H], dbeta [H]).

    dh = rstd (g - mean(g) - xhat mean(g xhat)) with g = dy gamma (see layer_norm_backward_reference); it is
    the gradient of x and of residual alike. Mean and rstd are recomputed from x + residual rather than saved:
    two passes over a row, which is then read once more anyway. All float32; `out` [M, H] may be dy, x or
    residual itself. dgamma, dbeta [H] are written when given, or added to with accumulate=True (e.g. over
    micro-batches).
    """
    check_array("layer_norm_backward", "x", x, ndim=2)
    M, H = x.shape
    if H == 0:
        raise ValueError("layer_norm_backward: x has no columns (H = 0)")
    check_array("layer_norm_backward", "gamma", gamma, shape=(H,))
    check_array("layer_norm_backward", "dy", dy, shape=(M, H))
    if residual is not None:
        check_array("layer_norm_backward", "residual", residual, shape=(M, H))
    if not eps > 0:
        raise ValueError(f"layer_norm_backward: eps must be a positive float, got {eps!r}")
    if accumulate and (dgamma is None or dbeta is None):
        raise ValueError("layer_norm_backward: accumulate=True needs the dgamma and dbeta to add to")
    out = output_array("layer_norm_backward", out, (M, H))
    dgamma = output_array("layer_norm_backward", dgamma, (H,))
    dbeta = output_array("layer_norm_backward", dbeta, (H,))
    _layer_norm_backward_kernel(x, x if residual is None else residual, residual is not None, gamma, float(eps),
                                dy, out, dgamma, dbeta, bool(accumulate))
    return out, dgamma, dbeta


LAYER_NORM_FLOPS_PER_ELEM = 8  # mean (add), centre (sub), square, variance (add), rsqrt-scale (mul), gamma, beta


def layer_norm_flops(M, H, residual=True):
    """FLOPs of layer_norm on [M, H] (the residual add, when fused, is one more per element)."""
    return LAYER_NORM_FLOPS_PER_ELEM * M * H + (M * H if residual else 0)
