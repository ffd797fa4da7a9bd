"""Layered integration: a learned softmax mix of an expert's L+1 pooled layers, times a scale (ELMo-style).

    X [B, L+1, K] (every layer's pooled features) -> y = scale * sum_l softmax(logits)_l X[:, l]  [B, K]
"""
import numpy as np

from minislm.kernels.activations import softmax_np


def init(rng, n_layers_plus_1, dtype=np.float32):
    # uniform mix to start: every layer weighs the same, the scale is 1
    return {"logits": np.zeros(n_layers_plus_1, dtype=dtype), "scale": np.ones((), dtype=dtype)}


def weights(params):
    """[L+1] softmax of the mixing logits."""
    return softmax_np(params["logits"])


def forward(params, X):
    w = weights(params)
    mix = np.einsum("l,blk->bk", w, X)                      # [B, K]
    return params["scale"] * mix, {"X": X, "w": w, "mix": mix}


def backward(params, cache, dy):
    X, w, mix = cache["X"], cache["w"], cache["mix"]
    dscale = np.sum(dy * mix)
    dw = params["scale"] * np.einsum("bk,blk->l", dy, X)     # [L+1]
    dlogits = w * (dw - np.dot(w, dw))                       # softmax Jacobian
    return None, {"logits": dlogits.astype(X.dtype), "scale": np.asarray(dscale, dtype=X.dtype)}
