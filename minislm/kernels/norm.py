"""Layer norm with the residual add fused in: y = LN(x + residual) * gamma + beta.

Two passes over each row (mean, then the mean squared deviation) instead of E[h^2] - E[h]^2, which cancels
catastrophically when |mean| >> std. Both sums, and the centring, are done in float64 registers: a float32
sum of H values near 1e4 would already be off by ~1e-4 in the mean, more than the kernel's whole tolerance.
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


LAYER_NORM_FLOPS_PER_ELEM = 8  # mean (add), centre (sub), square, variance (add), rsqrt-scale (mul), gamma, beta


def layer_norm_flops(M, H, residual=True):
    """FLOPs of layer_norm on [M, H] (the residual add, when fused, is one more per element)."""
    return LAYER_NORM_FLOPS_PER_ELEM * M * H + (M * H if residual else 0)
