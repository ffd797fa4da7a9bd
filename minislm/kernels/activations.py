"""Element-wise activations: exact GELU (erf form) and a numerically stable softmax."""
import math

import numpy as np

_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu_reference(x):
    """[...] -> [...]: x * Phi(x) with the exact erf form, as BERT/MPNet checkpoints use."""
    x64 = x.astype(np.float64)
    return (0.5 * x64 * (1.0 + _erf(x64 / math.sqrt(2.0)))).astype(np.float32)


def gelu(x):
    return gelu_reference(x)


def softmax_reference(x):
    """[..., K] -> [..., K] along the last axis, max-subtracted for stability."""
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def softmax(x):
    return softmax_reference(x)
