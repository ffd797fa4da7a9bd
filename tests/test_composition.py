"""Validation-driven composition on synthetic evidence: the team never serves worse than its best member,
useless tiers are skipped, and cross-fitting never scores a row with a model that saw it."""
import numpy as np
import pytest

from minislm.team import composition
from minislm.team.composition import Evidence, compose, crossfit_stack

EXPERTS = ["lexical", "small", "big"]


def probs_with_accuracy(y, acc, C, rng, sharp=4.0):
    """[N, C] probabilities whose argmax is right on a share `acc` of the rows, confident when right."""
    N = len(y)
    pred = np.where(rng.random(N) < acc, y, (y + rng.integers(1, C, N)) % C)
    logits = rng.normal(0, 0.3, (N, C))
    logits[np.arange(N), pred] += sharp * rng.random(N)
    e = np.exp(logits - logits.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def evidence(accs, fused_accs, N=600, C=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, N)
    members = {e: probs_with_accuracy(y, a, C, rng) for e, a in zip(EXPERTS, accs)}
    fused = {k: probs_with_accuracy(y, a, C, rng) for k, a in fused_accs.items()}
    enc = {"small": np.full(N, 1e8), "big": np.full(N, 1e10)}
    heads = {"single:small": 1e4, "single:big": 1e4, "fused:1": 2e4, "fused:2": 2e4}
    return Evidence(EXPERTS, y, members, fused, enc, np.full(N, 500.0), heads, folds=5, seed=0)


def accuracy(p, y):
    return float((p.argmax(1) == y).mean())


def test_served_setting_is_never_worse_than_the_best_member():
    ev = evidence([0.6, 0.7, 0.92], {1: 0.72, 2: 0.85})   # the fused heads are worse than 'big' alone
    comp, rec = compose(ev, tolerance=0.0)
    best_member = max(accuracy(p, ev.y) for p in ev.members.values())
    assert rec["accuracy"] >= best_member
    assert comp.answers[comp.active[-1]].name in ("single:big", "stack")


def test_every_tier_reads_its_own_encoder():
    ev = evidence([0.93, 0.6, 0.7], {1: 0.6, 2: 0.7})      # the lexical member beats both encoders
    comp, rec = compose(ev, tolerance=0.0)
    for k in comp.active[1:]:
        a = comp.answers[k]
        assert a.kind == "fused" or EXPERTS[k] in a.experts, (k, a)
    assert rec["accuracy"] >= max(accuracy(p, ev.y) for p in ev.members.values())


def test_a_tier_that_never_helps_is_skipped():
    ev = evidence([0.6, 0.34, 0.9], {1: 0.5, 2: 0.88})     # 'small' is no better than chance
    comp, rec = compose(ev, tolerance=0.002)
    assert 1 not in comp.active and comp.active[-1] == 2
    assert "small" not in sum((a.experts for a in comp.answers.values()), [])


def test_cheap_setting_within_tolerance_is_preferred():
    ev = evidence([0.9, 0.9, 0.91], {1: 0.9, 2: 0.91})      # the lexical member is nearly as good as any
    comp, rec = compose(ev, tolerance=0.03)
    assert rec["gflops_per_sample"] < 1.0                   # big (10 GFLOPs) runs on few rows, if any
    assert rec["accuracy"] >= rec["best_accuracy"] - 0.03


def test_crossfit_stack_never_scores_a_row_with_a_stack_that_saw_it(monkeypatch):
    rng = np.random.default_rng(1)
    N, E, C = 50, 2, 3
    P = rng.dirichlet(np.ones(C), size=(N, E)).astype(np.float32)
    P[:, 0, 0] = np.arange(N) / 1000 + 0.001               # a row id hidden in the features
    y = rng.integers(0, C, N)
    seen = []
    real_fit = composition.ensembles.stacking_fit

    def spy(P_tr, y_tr, seed=0):
        seen.append(set(np.round(P_tr[:, 0, 0] * 1000 - 1).astype(int).tolist()))
        return real_fit(P_tr, y_tr, seed=seed, epochs=5)

    predicted = []
    real_predict = composition.ensembles.stacking_predict

    def spy_predict(params, P_ho):
        predicted.append(set(np.round(P_ho[:, 0, 0] * 1000 - 1).astype(int).tolist()))
        return real_predict(params, P_ho)

    monkeypatch.setattr(composition.ensembles, "stacking_fit", spy)
    monkeypatch.setattr(composition.ensembles, "stacking_predict", spy_predict)
    out = crossfit_stack(P, y, folds=5, seed=0)
    assert out.shape == (N, C) and len(seen) == 5
    for trained, scored in zip(seen, predicted):
        assert trained.isdisjoint(scored)
    assert set().union(*predicted) == set(range(N))


def test_the_estimate_is_cross_fitted_and_recorded():
    ev = evidence([0.7, 0.8, 0.9], {1: 0.82, 2: 0.93})
    comp, rec = compose(ev)
    assert set(rec) >= {"rule", "estimate", "single_accuracy", "active", "answers", "accuracy"}
    assert 0.5 < rec["estimate"]["accuracy"] <= 1.0 and "cross-fitting" in rec["estimate"]["how"]
    assert rec["answers"] == {str(k): a.name for k, a in comp.answers.items()}


@pytest.mark.parametrize("N", [3, 7])
def test_fewer_rows_than_folds_still_composes(N):
    ev = evidence([0.7, 0.8, 0.9], {1: 0.8, 2: 0.9}, N=N)
    comp, rec = compose(ev)
    assert comp.active[0] == 0 and rec["rows"] == N
