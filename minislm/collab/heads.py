"""Classifier heads: linear, or one hidden layer (GELU, dropout) before the linear output.

    z [B, D] -> logits [B, C]
"""
import numpy as np

from minislm.collab import activations, linear
from minislm.kernels.matmul import linear_flops


def init(rng, d, n_classes, hidden=0, dtype=np.float32):
    """hidden = 0: a linear head; hidden > 0: D -> hidden (GELU, dropout) -> C."""
    if hidden == 0:
        return {"out": linear.init(rng, d, n_classes, dtype)}
    return {"hid": linear.init(rng, d, hidden, dtype), "out": linear.init(rng, hidden, n_classes, dtype)}


def forward(params, z, dropout=0.0, rng=None):
    """rng None = evaluation (no dropout)."""
    cache = {}
    if "hid" in params:
        h, cache["hid"] = linear.forward(params["hid"], z)
        h, cache["gelu"] = activations.gelu_forward(h)
        h, cache["drop"] = activations.dropout_forward(h, dropout, rng)
        z = h
    logits, cache["out"] = linear.forward(params["out"], z)
    return logits, cache


def backward(params, cache, dlogits, need_dz=True):
    grads = {}
    dz, grads["out"] = linear.backward(params["out"], cache["out"], dlogits, need_dx=need_dz or "hid" in params)
    if "hid" in params:
        dz = activations.dropout_backward(cache["drop"], dz)
        dz = activations.gelu_backward(cache["gelu"], dz)
        dz, grads["hid"] = linear.backward(params["hid"], cache["hid"], dz, need_dx=need_dz)
    return dz, grads


def flops(widths, activation=True):
    """FLOPs per row of a chain of linear layers widths[0] -> widths[1] -> ... with bias (a GELU after every
    layer but the last when activation)."""
    total = 0
    for i, (k, n) in enumerate(zip(widths[:-1], widths[1:])):
        part = linear_flops(1, k, n, gelu=activation and i < len(widths) - 2)
        total += part["matmul"] + part["other"]
    return total
