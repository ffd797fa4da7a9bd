"""The composed collaboration (layer mix -> projection -> gate + fusion -> head, + balance loss): its whole
backward against finite differences, for every fusion and both gates."""
import numpy as np
import pytest

from minislm.collab import losses, model, optim
from tests.gradcheck import numeric_grad
from tests.tolerances import FD_ATOL, FD_RTOL

B, C = 6, 3
SHAPES = {"lexical": (1, 3), "a": (3, 5), "b": (4, 7)}


def setup(fusion, gate="softmax", balance=0.0, gate_input=""):
    rng = np.random.default_rng(0)
    cfg = model.CollabConfig(experts=list(SHAPES), in_layers=[s[0] for s in SHAPES.values()],
                             in_dims=[s[1] for s in SHAPES.values()], n_classes=C, fusion=fusion, proj_dim=4,
                             head_hidden=5, dropout=0.0, gate=gate, top_k=2, balance=balance, gate_input=gate_input)
    params = model.init(cfg, rng, np.float64)
    for _, p in optim.leaves(params):
        p[...] = rng.standard_normal(p.shape) * 0.5
    feats = {n: rng.standard_normal((B,) + s) for n, s in SHAPES.items()}
    return cfg, params, feats, rng.integers(0, C, B)


def total_loss(cfg, params, feats, y):
    logits, cache = model.forward(cfg, params, feats, np.random.default_rng(7))  # same noise every call
    loss, dlogits = losses.cross_entropy(logits, y, 0.1)
    bal, dg, dh = model.balance_loss(cfg, cache)
    return loss + bal, cache, dlogits, dg, dh


@pytest.mark.parametrize("fusion,gate,balance,gate_input", [
    ("concat", "softmax", 0.0, ""), ("mean", "softmax", 0.0, ""), ("static", "softmax", 0.0, ""),
    ("attention", "softmax", 0.0, ""), ("gated", "softmax", 0.3, ""), ("gated", "noisy_topk", 0.3, ""),
    ("gated", "noisy_topk", 0.3, "lexical"), ("concat", "softmax", 0.2, "a")])
def test_whole_model_backward(fusion, gate, balance, gate_input):
    cfg, params, feats, y = setup(fusion, gate, balance, gate_input)
    _, cache, dlogits, dg, dh = total_loss(cfg, params, feats, y)
    grads = dict(optim.leaves(model.backward(cfg, params, cache, dlogits, dg, dh)))
    for name, p in optim.leaves(params):
        def f(v, p=p):
            old = p.copy()
            p[...] = v
            out = total_loss(cfg, params, feats, y)[0]
            p[...] = old
            return out
        np.testing.assert_allclose(grads[name], numeric_grad(f, p.copy()), atol=FD_ATOL, rtol=FD_RTOL,
                                   err_msg=f"{fusion}/{gate}: {name}")


def test_gate_only_matches_the_forward_gate():
    cfg, params, feats, _ = setup("gated", "noisy_topk", 0.1, "lexical")
    _, cache = model.forward(cfg, params, feats)
    np.testing.assert_allclose(model.gate_only(cfg, params, {"lexical": feats["lexical"]}), cache["g"])
