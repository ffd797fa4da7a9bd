"""Gated expert selection: which experts to trust (or run) for each input, and losses that keep the load even.

    softmax gate       g = softmax(x Wg^T + bg)                                      x [B, G] -> g [B, E]
    noisy top-k gate   h = x Wg^T + eps * softplus(x Wn^T), keep the k largest h, softmax over them, 0 elsewhere
                       (Shazeer et al. 2017); eps ~ N(0, 1) is drawn by the caller at train time, None at eval
    importance loss    CV(sum_b g)^2
    load loss          CV(sum_b P(expert i kept for row b))^2, P from the normal CDF (smooth, so it trains)
    switch loss        E * sum_e f_e * P_e, f_e the share of rows whose top expert is e (no gradient),
                       P_e the mean gate probability (Fedus et al. 2021)
"""
import math

import numpy as np

from minislm.collab import linear
from minislm.kernels.activations import softmax_np as _softmax

_erf = np.vectorize(math.erf, otypes=[np.float64])


def init(rng, g, n_experts, noisy=False, dtype=np.float32):
    # start from an even split: zero weights give every expert the same probability
    p = {"gate": {"w": np.zeros((n_experts, g), dtype=dtype), "b": np.zeros(n_experts, dtype=dtype)}}
    if noisy:
        p["noise"] = {"w": np.zeros((n_experts, g), dtype=dtype), "b": np.zeros(n_experts, dtype=dtype)}
    return p


def softmax_forward(params, x):
    logits, lin = linear.forward(params["gate"], x)
    g = _softmax(logits)
    return g, {"lin": lin, "g": g}


def softmax_backward(params, cache, dg):
    g = cache["g"]
    dlogits = g * (dg - (dg * g).sum(axis=-1, keepdims=True))
    dx, grads = linear.backward(params["gate"], cache["lin"], dlogits)
    return dx, {"gate": grads}


def _softplus(z):
    return np.logaddexp(0.0, z).astype(z.dtype)


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _phi(z):
    return np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _Phi(z):
    return (0.5 * (1.0 + _erf(z / math.sqrt(2.0)))).astype(z.dtype)


def noisy_topk_forward(params, x, k, eps=None):
    """x [B, G], eps [B, E] or None -> gates [B, E] (k nonzero per row), cache (for losses and backward)."""
    clean, lin_g = linear.forward(params["gate"], x)                    # [B, E]
    E = clean.shape[1]
    if not 1 <= k <= E:
        raise ValueError(f"top-k gate: k={k} must lie in 1..{E} (the number of experts)")
    cache = {"lin_g": lin_g, "clean": clean, "k": k, "eps": eps}
    if eps is not None:
        nz, lin_n = linear.forward(params["noise"], x)
        std = _softplus(nz) + 1e-2                                       # keep the noise scale positive
        h = clean + eps * std
        cache.update(lin_n=lin_n, nz=nz, std=std)
    else:
        h = clean
    order = np.argsort(-h, axis=1, kind="stable")
    kept = np.zeros_like(h, dtype=bool)
    np.put_along_axis(kept, order[:, :k], True, axis=1)
    z = np.where(kept, h, -np.inf)
    g = _softmax(z)
    cache.update(h=h, kept=kept, order=order, g=g)
    return g, cache


def noisy_topk_backward(params, cache, dg, dh_extra=None):
    """dgates [B, E] (+ an extra gradient on h from the load loss) -> dx, grads."""
    g, kept = cache["g"], cache["kept"]
    dh = np.where(kept, g * (dg - (dg * g).sum(axis=-1, keepdims=True)), 0.0).astype(g.dtype)
    dclean = dh.copy()
    dstd = None
    if dh_extra is not None:
        dclean += dh_extra["clean"]
        dh = dh + dh_extra["h"]
        dclean += dh_extra["h"]
        dstd = dh_extra.get("std")
    else:
        dclean = dh
    dx, gg = linear.backward(params["gate"], cache["lin_g"], dclean)
    grads = {"gate": gg}
    if cache["eps"] is not None:
        dstd_total = dh * cache["eps"] + (0.0 if dstd is None else dstd)
        dnz = dstd_total * _sigmoid(cache["nz"])
        dxn, gn = linear.backward(params["noise"], cache["lin_n"], dnz)
        dx = dx + dxn
        grads["noise"] = gn
    elif "noise" in params:
        grads["noise"] = {"w": np.zeros_like(params["noise"]["w"]), "b": np.zeros_like(params["noise"]["b"])}
    return dx, grads


def cv_squared(v, eps=1e-10):
    """CV(v)^2 = var(v) / mean(v)^2 (unbiased variance, as in the paper's code) -> (value, dv)."""
    n = v.shape[0]
    if n < 2:
        return 0.0, np.zeros_like(v)
    m = v.mean()
    var = ((v - m) ** 2).sum() / (n - 1)
    value = var / (m * m + eps)
    dvar = 2 * (v - m) / (n - 1)
    dm = -2 * m * var / (m * m + eps) ** 2
    return float(value), (dvar / (m * m + eps) + dm / n).astype(v.dtype)


def importance_loss(g):
    """gates [B, E] -> (CV(sum_b g)^2, dg [B, E])."""
    value, dimp = cv_squared(g.sum(axis=0))
    return value, np.broadcast_to(dimp, g.shape).copy()


def load_loss(cache):
    """Smooth load: P(b, i) = Phi((clean_bi - threshold_bi) / std_bi), threshold = the k-th largest noisy h of
    the other experts. -> (CV(sum_b P)^2, dh_extra for noisy_topk_backward). Needs the noisy (train) cache."""
    if cache["eps"] is None:
        raise ValueError("load_loss needs the noisy gate's train-time cache (pass eps to noisy_topk_forward)")
    h, clean, std, k, order = cache["h"], cache["clean"], cache["std"], cache["k"], cache["order"]
    B, E = h.shape
    if k == E:  # every expert is always kept: the load is even by construction
        zero = np.zeros_like(h)
        return 0.0, {"clean": zero, "h": zero, "std": zero}
    rows = np.arange(B)
    kth_in, kth_out = order[:, k], order[:, k - 1]                 # (k+1)-th and k-th largest, by index
    thr_idx = np.where(cache["kept"], kth_in[:, None], kth_out[:, None])  # [B, E] which h sets the threshold
    thr = h[rows[:, None], thr_idx]
    z = (clean - thr) / std
    P = _Phi(z)
    value, dload = cv_squared(P.sum(axis=0))
    dP = np.broadcast_to(dload, P.shape)
    dz = dP * _phi(z).astype(h.dtype)
    dclean = dz / std
    dstd = -dz * z / std
    dh = np.zeros_like(h)
    np.add.at(dh, (np.repeat(rows, E), thr_idx.reshape(-1)), (-dz / std).reshape(-1))
    return value, {"clean": dclean, "h": dh, "std": dstd}


def switch_loss(probs):
    """Router probabilities [B, E] -> (E * sum_e f_e P_e, dprobs). f (argmax shares) carries no gradient."""
    B, E = probs.shape
    f = np.bincount(probs.argmax(axis=1), minlength=E) / B
    P = probs.mean(axis=0)
    return float(E * (f * P).sum()), np.broadcast_to(E * f / B, probs.shape).astype(probs.dtype).copy()
