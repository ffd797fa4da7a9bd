"""The results' statistics against values computed by hand."""
import numpy as np
import pytest

from minislm.experiments import stats


def test_macro_f1_by_hand():
    y = np.array([0, 0, 1, 1, 2])
    p = np.array([0, 1, 1, 1, 0])
    # class 0: TP 1, FP 1, FN 1 -> 2/4; class 1: TP 2, FP 1, FN 0 -> 4/5; class 2: TP 0 -> 0
    assert stats.macro_f1(y, p, 3) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_mcnemar_by_hand():
    a = np.array([1, 1, 1, 0, 1, 0], bool)
    b = np.array([0, 0, 1, 0, 1, 1], bool)
    # b = 2 (only A right), c = 1 (only B right); n = 3, P(X <= 1) = (1 + 3) / 8 = 0.5 -> p = 1.0
    assert stats.mcnemar_exact(a, b) == (2, 1, 1.0)
    a = np.ones(10, bool)
    b = np.zeros(10, bool)
    # b = 10, c = 0: p = 2 * (1/2)^10
    assert stats.mcnemar_exact(a, b)[2] == pytest.approx(2 / 1024)
    assert stats.mcnemar_exact(a, a) == (0, 0, 1.0)


def test_bootstrap_ci_brackets_the_difference():
    rng = np.random.default_rng(0)
    a = rng.random(2000) < 0.9
    b = rng.random(2000) < 0.8
    lo, hi = stats.bootstrap_ci(a, b, seed=1)
    diff = 100 * (a.mean() - b.mean())
    assert lo < diff < hi and hi - lo < 6
    assert stats.bootstrap_ci(a, a) == [0.0, 0.0]
    assert stats.bootstrap_ci(a, b, seed=1) == [lo, hi]     # seeded


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.04 (m = 3): 0.03, max(0.03, 0.04) = 0.04, max(0.04, 0.04) = 0.04
    assert stats.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
