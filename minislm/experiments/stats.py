"""Statistics of the results tables, each written out so a reader can check it by hand.

    macro_f1        the unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN)
    mcnemar_exact   paired correctness of two classifiers on the same rows: only the rows where they disagree
                    count (b: only A right, c: only B right); under "equally good" b ~ Binomial(b + c, 1/2);
                    two-sided exact p = min(1, 2 P(X <= min(b, c)))
    bootstrap_ci    paired bootstrap of the accuracy difference A - B: resample rows with replacement, take the
                    2.5 and 97.5 percentiles of the difference (seeded)
    holm            Holm's step-down correction of a family of p-values (controls the family-wise error rate)
"""
import math

import numpy as np


def macro_f1(labels, preds, n_classes):
    """labels [B], preds [B] ints -> macro-averaged F1 (a class never predicted nor present counts 0)."""
    f1 = []
    for c in range(n_classes):
        tp = np.sum((preds == c) & (labels == c))
        fp, fn = np.sum((preds == c) & (labels != c)), np.sum((preds != c) & (labels == c))
        f1.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1))


def mcnemar_exact(correct_a, correct_b):
    """Exact two-sided McNemar test on paired correctness [B] bools -> (b, c, p-value)."""
    correct_a, correct_b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    b = int(np.sum(correct_a & ~correct_b))
    c = int(np.sum(~correct_a & correct_b))
    n, k = b + c, min(b, c)
    if n == 0:
        return b, c, 1.0
    # P(X <= k) for X ~ Binomial(n, 1/2), summed in log space so large n stays exact enough
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    m = max(logs)
    tail = math.exp(m) * sum(math.exp(x - m) for x in logs)
    return b, c, float(min(1.0, 2 * tail))


def bootstrap_ci(correct_a, correct_b, n_resamples=2000, seed=0, level=0.95):
    """Paired bootstrap interval of accuracy(A) - accuracy(B) in points -> [lo, hi]."""
    d = np.asarray(correct_a, np.float64) - np.asarray(correct_b, np.float64)   # [B] in {-1, 0, 1}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_resamples, len(d)))
    means = d[idx].mean(axis=1) * 100
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))]


def holm(p_values):
    """[m] p-values -> [m] Holm-adjusted p-values, in the input's order."""
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()
