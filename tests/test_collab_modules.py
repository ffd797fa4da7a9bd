"""Every collaboration module's hand-written backward vs torch.autograd (float64) and finite differences."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minislm.collab import ensembles, fusion, gate, heads, layermix, losses, optim
from tests.gradcheck import numeric_grad
from tests.tolerances import FD_ATOL, FD_RTOL, GRAD_ATOL, GRAD_RTOL

B, E, D, C, G = 5, 3, 4, 3, 6


def rng():
    return np.random.default_rng(0)


def close(a, b, what=""):
    np.testing.assert_allclose(a, b, atol=GRAD_ATOL, rtol=GRAD_RTOL, err_msg=what)


def fd_check(loss_of, x, analytic, what=""):
    np.testing.assert_allclose(analytic, numeric_grad(loss_of, x), atol=FD_ATOL, rtol=FD_RTOL, err_msg=what)


def T(a):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=True)


def randomize(params, r, scale=0.5):
    """Nonzero random values for every leaf (zero inits would hide bugs)."""
    for name, p in optim.leaves(params):
        p[...] = r.standard_normal(p.shape) * scale
    return params


def test_layermix():
    r = rng()
    X = r.standard_normal((B, 7, D))
    p = randomize(layermix.init(r, 7, np.float64), r)
    y, cache = layermix.forward(p, X)
    dy = r.standard_normal(y.shape)
    _, g = layermix.backward(p, cache, dy)
    logits, scale = T(p["logits"]), T(p["scale"])
    ty = scale * torch.einsum("l,blk->bk", torch.softmax(logits, 0), torch.from_numpy(X))
    (ty * torch.from_numpy(dy)).sum().backward()
    close(y, ty.detach().numpy())
    close(g["logits"], logits.grad.numpy())
    close(g["scale"], scale.grad.numpy())
    fd_check(lambda l: float((layermix.forward(dict(p, logits=l), X)[0] * dy).sum()), p["logits"], g["logits"])


@pytest.mark.parametrize("hidden", [0, 7])
def test_heads_with_dropout(hidden):
    r = rng()
    z = r.standard_normal((B, D))
    p = randomize(heads.init(r, D, C, hidden, np.float64), r)
    drop_rng = np.random.default_rng(5)
    logits, cache = heads.forward(p, z, dropout=0.3, rng=drop_rng)
    dl = r.standard_normal(logits.shape)
    dz, g = heads.backward(p, cache, dl)
    tz = T(z)
    if hidden:
        w1, b1, w2, b2 = T(p["hid"]["w"]), T(p["hid"]["b"]), T(p["out"]["w"]), T(p["out"]["b"])
        keep = torch.from_numpy(cache["drop"])
        tl = (F.gelu(tz @ w1.T + b1) * keep) @ w2.T + b2
    else:
        w2, b2 = T(p["out"]["w"]), T(p["out"]["b"])
        tl = tz @ w2.T + b2
    (tl * torch.from_numpy(dl)).sum().backward()
    close(logits, tl.detach().numpy())
    close(dz, tz.grad.numpy())
    close(g["out"]["w"], w2.grad.numpy())
    if hidden:
        close(g["hid"]["w"], w1.grad.numpy())
        close(g["hid"]["b"], b1.grad.numpy())
    fixed = _Fixed(cache["drop"]) if hidden else None
    fd_check(lambda z_: float((heads.forward(p, z_, dropout=0.3, rng=fixed)[0] * dl).sum()), z, dz)


class _Fixed:
    """An rng stand-in that reproduces a given dropout mask."""
    def __init__(self, keep):
        self.keep = keep

    def random(self, shape):
        return np.where(self.keep > 0, 1.0, 0.0)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy(smoothing):
    r = rng()
    logits, labels = r.standard_normal((B, C)) * 3, r.integers(0, C, B)
    loss, d = losses.cross_entropy(logits, labels, smoothing)
    tl = T(logits)
    ref = F.cross_entropy(tl, torch.from_numpy(labels), label_smoothing=smoothing)
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-12)
    close(d, tl.grad.numpy())
    fd_check(lambda l: losses.cross_entropy(l, labels, smoothing)[0], logits, d, f"smoothing {smoothing}")


def test_distillation():
    r = rng()
    s, t, temp = r.standard_normal((B, C)), r.standard_normal((B, C)), 2.5
    teacher = losses.softmax(t, temp)
    loss, d = losses.distillation(s, teacher, temp)
    ts = T(s)
    ref = F.kl_div(F.log_softmax(ts / temp, -1), torch.from_numpy(teacher), reduction="batchmean") * temp ** 2
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-10)
    close(d, ts.grad.numpy())
    fd_check(lambda s_: losses.distillation(s_, teacher, temp)[0], s, d)


def test_softmax_gate_and_switch_loss():
    r = rng()
    x = r.standard_normal((B, G))
    p = randomize(gate.init(r, G, E, dtype=np.float64), r)
    g, cache = gate.softmax_forward(p, x)
    dg_out = r.standard_normal(g.shape)
    sw, dsw = gate.switch_loss(g)
    dx, grads = gate.softmax_backward(p, cache, dg_out + dsw)
    tx, w, b = T(x), T(p["gate"]["w"]), T(p["gate"]["b"])
    tg = torch.softmax(tx @ w.T + b, -1)
    f = torch.bincount(tg.argmax(1), minlength=E).double() / B
    tsw = E * (f * tg.mean(0)).sum()
    ((tg * torch.from_numpy(dg_out)).sum() + tsw).backward()
    assert sw == pytest.approx(tsw.item())
    close(dx, tx.grad.numpy())
    close(grads["gate"]["w"], w.grad.numpy())
    close(grads["gate"]["b"], b.grad.numpy())
    assert np.allclose(g.sum(1), 1.0)

    def total(params, x_):  # the argmax shares f are piecewise constant: a small step never moves them
        g_ = gate.softmax_forward(params, x_)[0]
        return float((g_ * dg_out).sum()) + gate.switch_loss(g_)[0]
    fd_check(lambda x_: total(p, x_), x, dx, "dx")
    fd_check(lambda w_: total({"gate": dict(p["gate"], w=w_)}, x), p["gate"]["w"], grads["gate"]["w"], "w")
    fd_check(lambda b_: total({"gate": dict(p["gate"], b=b_)}, x), p["gate"]["b"], grads["gate"]["b"], "b")


def _torch_noisy_topk(x, wg, bg, wn, bn, eps, k):
    clean = x @ wg.T + bg
    std = F.softplus(x @ wn.T + bn) + 1e-2
    h = clean + eps * std
    top = torch.topk(h, k + 1, dim=1)
    kept_mask = torch.zeros_like(h, dtype=torch.bool).scatter(1, top.indices[:, :k], True)
    gates = torch.softmax(h.masked_fill(~kept_mask, -math.inf), -1)
    thr_in, thr_out = top.values[:, k:k + 1], top.values[:, k - 1:k]
    normal = torch.distributions.Normal(0.0, 1.0)
    P = torch.where(kept_mask, normal.cdf((clean - thr_in) / std), normal.cdf((clean - thr_out) / std))
    load = P.sum(0)
    importance = gates.sum(0)
    cv2 = lambda v: v.var() / (v.mean() ** 2 + 1e-10)  # noqa: E731
    return gates, cv2(importance), cv2(load)


@pytest.mark.parametrize("k", [1, 2])
def test_noisy_topk_gate_with_its_losses(k):
    r = rng()
    x = r.standard_normal((8, G))
    p = randomize(gate.init(r, G, E, noisy=True, dtype=np.float64), r)
    eps = r.standard_normal((8, E))
    g, cache = gate.noisy_topk_forward(p, x, k, eps)
    dg_out = r.standard_normal(g.shape)
    imp, dimp = gate.importance_loss(g)
    load, dh_extra = gate.load_loss(cache)
    dx, grads = gate.noisy_topk_backward(p, cache, dg_out + dimp, dh_extra)
    tx, wg, bg, wn, bn = T(x), T(p["gate"]["w"]), T(p["gate"]["b"]), T(p["noise"]["w"]), T(p["noise"]["b"])
    tg, timp, tload = _torch_noisy_topk(tx, wg, bg, wn, bn, torch.from_numpy(eps), k)
    ((tg * torch.from_numpy(dg_out)).sum() + timp + tload).backward()
    close(g, tg.detach().numpy())
    assert imp == pytest.approx(timp.item()) and load == pytest.approx(tload.item())
    close(dx, tx.grad.numpy(), "dx")
    close(grads["gate"]["w"], wg.grad.numpy(), "gate w")
    close(grads["noise"]["w"], wn.grad.numpy(), "noise w")
    close(grads["noise"]["b"], bn.grad.numpy(), "noise b")
    close(grads["gate"]["b"], bg.grad.numpy(), "gate b")
    assert ((g > 0).sum(1) == k).all()

    def total(params, x_):  # fixed noise eps; top-k choice and thresholds do not move under a small step
        g_, c_ = gate.noisy_topk_forward(params, x_, k, eps)
        return float((g_ * dg_out).sum()) + gate.importance_loss(g_)[0] + gate.load_loss(c_)[0]

    def with_leaf(part, leaf, v):
        return dict(p, **{part: dict(p[part], **{leaf: v})})
    fd_check(lambda x_: total(p, x_), x, dx, "dx")
    for part, leaf in (("gate", "w"), ("gate", "b"), ("noise", "w"), ("noise", "b")):
        fd_check(lambda v, part=part, leaf=leaf: total(with_leaf(part, leaf, v), x), p[part][leaf],
                 grads[part][leaf], f"{part} {leaf}")


def test_balance_losses_alone():
    # each loss's own gradient, against torch and finite differences, on gates that are not from a gate
    r = rng()
    g = losses.softmax(r.standard_normal((8, E)) * 2)
    tg = T(g)
    cv2 = lambda v: v.var() / (v.mean() ** 2 + 1e-10)  # noqa: E731
    imp, dimp = gate.importance_loss(g)
    timp = cv2(tg.sum(0))
    timp.backward()
    assert imp == pytest.approx(timp.item(), rel=1e-12)
    close(dimp, tg.grad.numpy(), "importance")
    fd_check(lambda g_: gate.importance_loss(g_)[0], g, dimp, "importance")
    sw, dsw = gate.switch_loss(g)
    tg = T(g)
    f = torch.bincount(tg.argmax(1), minlength=E).double() / g.shape[0]
    tsw = E * (f * tg.mean(0)).sum()
    tsw.backward()
    assert sw == pytest.approx(tsw.item(), rel=1e-12)
    close(dsw, tg.grad.numpy(), "switch")
    fd_check(lambda g_: gate.switch_loss(g_)[0], g, dsw, "switch")


def test_gate_is_deterministic_at_eval():
    r = rng()
    p = randomize(gate.init(r, G, E, noisy=True, dtype=np.float64), r)
    x = r.standard_normal((B, G))
    a, _ = gate.noisy_topk_forward(p, x, 2, eps=None)
    b, _ = gate.noisy_topk_forward(p, x, 2, eps=None)
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="k=4 must lie in 1..3"):
        gate.noisy_topk_forward(p, x, 4)


def _torch_fusion(name, p, Z, g):
    if name == "concat":
        return Z.reshape(Z.shape[0], -1), {}
    if name == "mean":
        return Z.mean(1), {}
    if name == "static":
        lg = T(p["logits"])
        return torch.einsum("e,bed->bd", torch.softmax(lg, 0), Z), {"logits": lg}
    if name == "gated":
        return torch.einsum("be,bed->bd", g, Z), {}
    tp = {k: (T(v["w"]), T(v["b"])) for k, v in p.items()}
    ctx = Z.mean(1)
    q = ctx @ tp["q"][0].T + tp["q"][1]
    k = Z @ tp["k"][0].T + tp["k"][1]
    v = Z @ tp["v"][0].T + tp["v"][1]
    a = torch.softmax(torch.einsum("bd,bed->be", q, k) / math.sqrt(Z.shape[2]), -1)
    return torch.einsum("be,bed->bd", a, v), {f"{n}.w": tp[n][0] for n in "qkv"}


@pytest.mark.parametrize("name", list(fusion.FUSIONS))
def test_fusion(name):
    r = rng()
    mod = fusion.get(name)
    Z = r.standard_normal((B, E, D))
    g = gate.softmax_forward(randomize(gate.init(r, G, E, dtype=np.float64), r), r.standard_normal((B, G)))[0]
    p = randomize(mod.init(r, E, D, np.float64), r)
    y, cache = mod.forward(p, Z, g)
    assert y.shape == (B, mod.out_dim(E, D))
    dy = r.standard_normal(y.shape)
    dZ, dg, grads = mod.backward(p, cache, dy)
    tZ, tg = T(Z), T(g)
    ty, tparams = _torch_fusion(name, p, tZ, tg)
    (ty * torch.from_numpy(dy)).sum().backward()
    close(y, ty.detach().numpy(), name)
    close(dZ, tZ.grad.numpy(), f"{name} dZ")
    if mod.uses_gate:
        close(dg, tg.grad.numpy(), f"{name} dg")
    for key, t in tparams.items():
        ours = grads["logits"] if key == "logits" else grads[key[0]]["w"]
        close(ours, t.grad.numpy(), f"{name} {key}")
    fd_check(lambda z_: float((mod.forward(p, z_, g)[0] * dy).sum()), Z, dZ, name)
    if name == "attention":
        assert np.allclose(cache["weights"].sum(1), 1.0)


def test_unknown_fusion_and_missing_gate():
    with pytest.raises(ValueError, match="unknown fusion 'sum'; choose one of concat, mean"):
        fusion.get("sum")
    with pytest.raises(ValueError, match="needs gate weights"):
        fusion.get("gated").forward({}, np.zeros((2, 3, 4)))


def test_ensembles():
    r = rng()
    P = losses.softmax(r.standard_normal((B, E, C)))
    np.testing.assert_allclose(ensembles.average(P), P.mean(1))
    np.testing.assert_allclose(ensembles.average(P, [1, 0, 0]), P[:, 0])
    p = randomize(ensembles.stacking_init(r, E, C, np.float64), r)
    logits, cache = ensembles.stacking_forward(p, P)
    dl = r.standard_normal(logits.shape)
    _, g = ensembles.stacking_backward(p, cache, dl)
    w, b = T(p["w"]), T(p["b"])
    tl = torch.log(torch.from_numpy(P)).reshape(B, -1) @ w.T + b
    (tl * torch.from_numpy(dl)).sum().backward()
    close(logits, tl.detach().numpy())
    close(g["w"], w.grad.numpy())
    close(g["b"], b.grad.numpy())
    for leaf in ("w", "b"):
        fd_check(lambda v, leaf=leaf: float((ensembles.stacking_forward(dict(p, **{leaf: v}), P)[0] * dl).sum()),
                 p[leaf], g[leaf], f"stacking {leaf}")


def test_adamw_matches_torch():
    r = rng()
    w0, b0 = r.standard_normal((4, 3)), r.standard_normal(4)
    params = {"lin": {"w": w0.copy(), "b": b0.copy()}}
    opt = optim.AdamW(params, lr=0.01, weight_decay=0.1)
    tw, tb = T(w0), T(b0)
    topt = torch.optim.AdamW([{"params": [tw], "weight_decay": 0.1}, {"params": [tb], "weight_decay": 0.0}],
                             lr=0.01)
    for step in range(5):
        gw, gb = r.standard_normal((4, 3)), r.standard_normal(4)
        opt.step({"lin": {"w": gw, "b": gb}})
        tw.grad, tb.grad = torch.from_numpy(gw), torch.from_numpy(gb)
        topt.step()
    np.testing.assert_allclose(params["lin"]["w"], tw.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(params["lin"]["b"], tb.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_schedule_clipping_and_early_stopping():
    assert optim.warmup_cosine(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert optim.warmup_cosine(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert optim.warmup_cosine(55, 100, 1.0, 10) == pytest.approx(0.5)
    assert optim.warmup_cosine(100, 100, 1.0, 10) == pytest.approx(0.0)
    grads = {"a": np.full(4, 3.0), "b": {"c": np.full(9, 4.0)}}
    before = optim.clip_by_global_norm(grads, 1.0)
    assert before == pytest.approx(math.sqrt(4 * 9 + 9 * 16))
    assert optim.global_norm(grads) == pytest.approx(1.0)
    es = optim.EarlyStopping(patience=2)
    p = {"w": np.zeros(1)}
    assert not es.update(0.5, p, 0)
    p["w"][0] = 1.0
    assert not es.update(0.4, p, 1) and es.update(0.3, p, 2)
    assert es.best_epoch == 0 and es.best_params["w"][0] == 0.0
