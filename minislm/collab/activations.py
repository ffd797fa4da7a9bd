"""Elementwise activations with their derivatives: GELU (exact erf), tanh; and dropout."""
import math

import numpy as np

_erf = np.vectorize(math.erf, otypes=[np.float64])


def erf(x):
    """Exact erf elementwise (float64 inside, cast back)."""
    return _erf(x).astype(x.dtype)


def gelu_forward(x):
    cdf = 0.5 * (1.0 + erf(x / np.sqrt(2.0).astype(x.dtype)))
    return x * cdf, {"x": x, "cdf": cdf}


def gelu_backward(cache, dy):
    x, cdf = cache["x"], cache["cdf"]
    pdf = np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)
    return dy * (cdf + x * pdf.astype(x.dtype))


def dropout_forward(x, rate, rng):
    """Inverted dropout: at train time zero a share `rate` of entries and rescale the rest; rng None = eval."""
    if rng is None or rate == 0.0:
        return x, None
    keep = (rng.random(x.shape) >= rate).astype(x.dtype) / np.asarray(1.0 - rate, dtype=x.dtype)
    return x * keep, keep


def dropout_backward(keep, dy):
    return dy if keep is None else dy * keep
