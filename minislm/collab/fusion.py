"""Fusion strategies: E experts' projected vectors Z [B, E, D] -> one fused vector, behind one interface.

    concat     [B, E*D]  every expert side by side
    mean       [B, D]    plain average
    static     [B, D]    softmax(a) weighted sum, one learned weight per expert for all inputs
    gated      [B, D]    sum_e g_be Z_be with per-input weights g from a gate (gate.py)
    attention  [B, D]    AdapterFusion-style: a query from the experts' mean, keys and values per expert,
                         softmax attention over experts; the weights [B, E] are kept for explanations

Each strategy is a module with out_dim(E, D), init(rng, E, D), forward(params, Z, g=None) -> (fused, cache)
and backward(params, cache, dfused) -> (dZ, dg, grads); dg is None unless the strategy uses a gate.
Concat also takes a list of E vectors of differing widths (experts without a projection) and returns a list.
"""
import types

import numpy as np

from minislm.collab import linear
from minislm.kernels.activations import softmax_np as _softmax


def _module(**fns):
    return types.SimpleNamespace(**fns)


# concat ---------------------------------------------------------------------------------------------------
def _concat_forward(params, Z, g=None):
    """Z [B, E, D], or a list of E vectors [B, D_e] whose widths may differ (no projection)."""
    zs = list(Z.transpose(1, 0, 2)) if isinstance(Z, np.ndarray) else list(Z)
    return np.concatenate(zs, axis=1), {"widths": [z.shape[1] for z in zs], "stacked": isinstance(Z, np.ndarray)}


def _concat_backward(params, cache, dy):
    dzs = np.split(dy, np.cumsum(cache["widths"])[:-1], axis=1)
    return (np.stack(dzs, axis=1) if cache["stacked"] else dzs), None, {}


# mean -----------------------------------------------------------------------------------------------------
def _mean_forward(params, Z, g=None):
    return Z.mean(axis=1), {"shape": Z.shape}


def _mean_backward(params, cache, dy):
    B, E, D = cache["shape"]
    return np.broadcast_to(dy[:, None, :] / E, (B, E, D)).copy(), None, {}


# static ---------------------------------------------------------------------------------------------------
def _static_forward(params, Z, g=None):
    w = _softmax(params["logits"])                            # [E]
    return np.einsum("e,bed->bd", w, Z), {"Z": Z, "w": w}


def _static_backward(params, cache, dy):
    Z, w = cache["Z"], cache["w"]
    dw = np.einsum("bd,bed->e", dy, Z)
    return w[None, :, None] * dy[:, None, :], None, {"logits": w * (dw - np.dot(w, dw))}


# gated ----------------------------------------------------------------------------------------------------
def _gated_forward(params, Z, g=None):
    if g is None:
        raise ValueError("the gated fusion needs gate weights g [B, E]; run the gate first")
    return np.einsum("be,bed->bd", g, Z), {"Z": Z, "g": g}


def _gated_backward(params, cache, dy):
    Z, g = cache["Z"], cache["g"]
    return g[:, :, None] * dy[:, None, :], np.einsum("bd,bed->be", dy, Z), {}


# attention ------------------------------------------------------------------------------------------------
def _attention_init(rng, E, D, dtype=np.float32):
    return {"q": linear.init(rng, D, D, dtype), "k": linear.init(rng, D, D, dtype), "v": linear.init(rng, D, D, dtype)}


def _attention_forward(params, Z, g=None):
    B, E, D = Z.shape
    ctx = Z.mean(axis=1)                                        # [B, D] the query's context
    q, cq = linear.forward(params["q"], ctx)                    # [B, D]
    k, ck = linear.forward(params["k"], Z.reshape(B * E, D))    # [B*E, D]
    v, cv = linear.forward(params["v"], Z.reshape(B * E, D))
    k, v = k.reshape(B, E, D), v.reshape(B, E, D)
    scale = 1.0 / np.sqrt(D)
    a = _softmax(np.einsum("bd,bed->be", q, k) * scale)         # [B, E] attention over experts
    out = np.einsum("be,bed->bd", a, v)
    return out, {"Z": Z, "q": q, "k": k, "v": v, "a": a, "cq": cq, "ck": ck, "cv": cv, "scale": scale,
                 "weights": a}


def _attention_backward(params, cache, dy):
    Z, q, k, v, a, scale = cache["Z"], cache["q"], cache["k"], cache["v"], cache["a"], cache["scale"]
    B, E, D = Z.shape
    da = np.einsum("bd,bed->be", dy, v)
    dv = a[:, :, None] * dy[:, None, :]
    ds = a * (da - (da * a).sum(axis=1, keepdims=True)) * scale
    dq = np.einsum("be,bed->bd", ds, k)
    dk = ds[:, :, None] * q[:, None, :]
    dctx, gq = linear.backward(params["q"], cache["cq"], dq)
    dZk, gk = linear.backward(params["k"], cache["ck"], dk.reshape(B * E, D))
    dZv, gv = linear.backward(params["v"], cache["cv"], dv.reshape(B * E, D))
    dZ = (dZk + dZv).reshape(B, E, D) + dctx[:, None, :] / E
    return dZ, None, {"q": gq, "k": gk, "v": gv}


FUSIONS = {
    "concat": _module(out_dim=lambda E, D: E * D, init=lambda rng, E, D, dtype=np.float32: {},
                      forward=_concat_forward, backward=_concat_backward, uses_gate=False),
    "mean": _module(out_dim=lambda E, D: D, init=lambda rng, E, D, dtype=np.float32: {},
                    forward=_mean_forward, backward=_mean_backward, uses_gate=False),
    "static": _module(out_dim=lambda E, D: D,
                      init=lambda rng, E, D, dtype=np.float32: {"logits": np.zeros(E, dtype=dtype)},
                      forward=_static_forward, backward=_static_backward, uses_gate=False),
    "gated": _module(out_dim=lambda E, D: D, init=lambda rng, E, D, dtype=np.float32: {},
                     forward=_gated_forward, backward=_gated_backward, uses_gate=True),
    "attention": _module(out_dim=lambda E, D: D, init=_attention_init,
                         forward=_attention_forward, backward=_attention_backward, uses_gate=False),
}


def get(name):
    if name not in FUSIONS:
        raise ValueError(f"unknown fusion {name!r}; choose one of {', '.join(FUSIONS)}")
    return FUSIONS[name]
