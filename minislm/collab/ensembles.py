"""Logit-level ensembles: combine the experts' own class probabilities instead of their features.

    average   p = sum_e w_e p_e with fixed weights w (uniform by default)       P [B, E, C] -> [B, C]
    stacking  logits = concat_e(log p_e) W^T + b, a logistic regression over the experts' log-probabilities,
              trained like any head (its backward is linear's)
"""
import numpy as np

from minislm.collab import linear, losses, optim


def average(P, weights=None):
    """P [B, E, C] probabilities -> [B, C]."""
    E = P.shape[1]
    w = np.full(E, 1.0 / E) if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
    return np.einsum("e,bec->bc", w, P).astype(P.dtype)


def stacking_features(P):
    """P [B, E, C] -> [B, E*C] log-probabilities (clipped, so a zero probability stays finite)."""
    B, E, C = P.shape
    return np.log(np.clip(P, 1e-7, 1.0)).reshape(B, E * C).astype(P.dtype)


def stacking_init(rng, E, C, dtype=np.float32):
    return linear.init(rng, E * C, C, dtype)


def stacking_forward(params, P):
    return linear.forward(params, stacking_features(P))


def stacking_backward(params, cache, dlogits):
    return linear.backward(params, cache, dlogits, need_dx=False)


def stacking_fit(P, y, seed=0, epochs=300, lr=0.05, weight_decay=0.01):
    """P [B, E, C] member probabilities (out-of-fold or held-out rows), y [B] -> stacking params, fitted by
    full-batch AdamW on the cross-entropy."""
    params = stacking_init(np.random.default_rng(seed), P.shape[1], P.shape[2])
    opt = optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        logits, cache = stacking_forward(params, P)
        _, d = losses.cross_entropy(logits, y)
        _, g = stacking_backward(params, cache, d)
        opt.step(g)
    return params


def stacking_predict(params, P):
    """P [B, E, C] -> [B, C] probabilities of the fitted stacking regression."""
    return losses.softmax(stacking_forward(params, P)[0])
