"""A dense layer y = x W^T + b, the projection of each expert to a common width and the heads' building block.

    x [B, K] -> y [B, N];  W [N, K] (torch Linear layout), b [N]
"""
import numpy as np


def init(rng, k, n, dtype=np.float32):
    bound = 1.0 / np.sqrt(k)  # torch's default Linear init range
    return {"w": rng.uniform(-bound, bound, (n, k)).astype(dtype), "b": np.zeros(n, dtype=dtype)}


def forward(params, x):
    return x @ params["w"].T + params["b"], {"x": x}


def backward(params, cache, dy, need_dx=True):
    x = cache["x"]
    dx = dy @ params["w"] if need_dx else None
    return dx, {"w": dy.T @ x, "b": dy.sum(axis=0)}
