"""Optimisation: AdamW, a warm-up + cosine learning-rate schedule, global-norm clipping, early stopping.

Parameters and gradients are nested dicts of arrays (as the modules return them); `leaves` walks them in a
fixed order, so a run with the same seed is bit-for-bit the same on one machine.
"""
import copy
import math

import numpy as np

from minislm.kernels.adamw import adamw_update, adamw_update_reference


def leaves(tree, prefix=""):
    """Nested dict -> list of (dotted name, array), sorted by name."""
    out = []
    for key in sorted(tree):
        v = tree[key]
        name = f"{prefix}{key}"
        if isinstance(v, dict):
            out += leaves(v, name + ".")
        else:
            out.append((name, v))
    return out


def global_norm(grads):
    return math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for _, g in leaves(grads)))


def clip_by_global_norm(grads, max_norm):
    """Scale every gradient by min(1, max_norm / ||g||) in place; returns the norm before clipping."""
    norm = global_norm(grads)
    if max_norm and norm > max_norm:
        s = max_norm / (norm + 1e-12)
        for _, g in leaves(grads):
            g *= s
    return norm


def warmup_cosine(step, total, peak, warmup, floor=0.0):
    """Linear warm-up to `peak` over `warmup` steps, then cosine decay to `floor` at `total`."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * t))


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019), torch.optim.AdamW's update rule.

    decay(name) says which parameters decay (default: matrices, not biases, scales or mixing logits).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, decay=None):
        self.params = params
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.decay = decay or (lambda name, p: p.ndim >= 2)
        self.m = {n: np.zeros_like(p) for n, p in leaves(params)}
        self.v = {n: np.zeros_like(p) for n, p in leaves(params)}
        self.t = 0

    def step(self, grads, lr=None):
        lr = self.lr if lr is None else lr
        self.t += 1
        b1, b2 = self.betas
        g_by_name = dict(leaves(grads))
        for name, p in leaves(self.params):
            if name not in g_by_name:
                continue
            g = g_by_name[name]
            wd = self.wd if self.wd and self.decay(name, p) else 0.0
            if p.dtype == np.float32 and p.flags.c_contiguous and g.dtype == np.float32 and g.flags.c_contiguous:
                adamw_update(p, g, self.m[name], self.v[name], lr, b1, b2, self.eps, wd, self.t)  # one fused pass
            else:
                adamw_update_reference(p, g, self.m[name], self.v[name], lr, b1, b2, self.eps, wd, self.t)


class EarlyStopping:
    """Keep the parameters of the best validation score; stop after `patience` epochs without improvement."""

    def __init__(self, patience=5):
        self.patience, self.best, self.best_params, self.best_epoch, self.bad = patience, -np.inf, None, -1, 0

    def update(self, score, params, epoch):
        """-> True when training should stop."""
        if score > self.best:
            self.best, self.best_params, self.best_epoch, self.bad = score, copy.deepcopy(params), epoch, 0
        else:
            self.bad += 1
        return self.bad >= self.patience
