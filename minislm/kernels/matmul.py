"""Matmul with bias: y = x @ w.T + b, optionally followed by GELU (fused epilogue)."""
import numpy as np

from minislm.kernels.activations import gelu_reference


def linear_reference(x, w, b=None, gelu=False):
    """[M, K] x [N, K] (+ [N]) -> [M, N]. Plain NumPy."""
    y = x @ w.T
    if b is not None:
        y = y + b
    return gelu_reference(y) if gelu else y.astype(np.float32)


def linear(x, w, b=None, gelu=False, out=None):
    """[M, K] x [N, K] (+ [N]) -> [M, N]; `out` [M, N] is written in place when given."""
    y = linear_reference(x, w, b, gelu)
    if out is None:
        return y
    out[...] = y
    return out
