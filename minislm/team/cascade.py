"""Hierarchical inference: cheap tiers answer confident rows, the rest escalate, so compute follows difficulty.

Tier k answers with the fused head over every expert run so far. A row stops at the first tier whose
confidence clears that tier's threshold; the last tier always answers. Confidence is the maximum probability
(or 1 - normalised entropy). Thresholds are chosen on a validation split, never on test rows: the cheapest
setting (mean FLOPs) that keeps validation accuracy at a target, or the most accurate one within a FLOP budget.
"""
import itertools

import numpy as np

CANDIDATES = np.concatenate([np.linspace(0.5, 0.9, 9), [0.925, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995, 1.01]])


def confidence(probs, kind="max_prob"):
    """probs [B, C] -> [B] in [0, 1]: the top probability, or 1 - entropy / log C."""
    if kind == "max_prob":
        return probs.max(axis=1)
    if kind == "entropy":
        C = probs.shape[1]
        h = -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=1)
        return 1.0 - h / np.log(C)
    raise ValueError(f"unknown confidence {kind!r}; use 'max_prob' or 'entropy'")


def simulate(tier_probs, thresholds, tier_flops=None, kind="max_prob"):
    """Where each row exits and what it answers, given every tier's probabilities [B, C] (a list).

    -> exit tier [B], predictions [B], FLOPs per row [B] (when tier_flops, cumulative per tier, is given).
    """
    B = tier_probs[0].shape[0]
    exit_tier = np.full(B, len(tier_probs) - 1)
    open_rows = np.ones(B, dtype=bool)
    for k, t in enumerate(thresholds):
        stop = open_rows & (confidence(tier_probs[k], kind) >= t)
        exit_tier[stop] = k
        open_rows &= ~stop
    preds = np.stack([p.argmax(axis=1) for p in tier_probs])[exit_tier, np.arange(B)]
    cost = None if tier_flops is None else np.stack(tier_flops)[exit_tier, np.arange(B)]
    return exit_tier, preds, cost


def curve(tier_probs, labels, tier_flops, kind="max_prob", candidates=CANDIDATES):
    """Every threshold setting on the grid -> list of {thresholds, accuracy, flops, exit shares}."""
    points = []
    for ts in itertools.product(candidates, repeat=len(tier_probs) - 1):
        tiers, preds, cost = simulate(tier_probs, ts, tier_flops, kind)
        points.append({"thresholds": [float(t) for t in ts], "accuracy": float((preds == labels).mean()),
                       "flops": float(cost.mean()),
                       "exit_share": np.bincount(tiers, minlength=len(tier_probs)).astype(float).tolist()})
    for p in points:
        p["exit_share"] = [s / len(labels) for s in p["exit_share"]]
    return points


def pareto(points):
    """The settings no other setting beats on both accuracy and FLOPs, cheapest first."""
    best, front = -1.0, []
    for p in sorted(points, key=lambda p: (p["flops"], -p["accuracy"])):
        if p["accuracy"] > best:
            front.append(p)
            best = p["accuracy"]
    return front


def choose(points, target_accuracy=None, flop_budget=None):
    """The cheapest point reaching target_accuracy, or the most accurate within flop_budget."""
    if target_accuracy is not None:
        ok = [p for p in points if p["accuracy"] >= target_accuracy]
        return min(ok, key=lambda p: (p["flops"], -p["accuracy"])) if ok else max(points, key=lambda p: p["accuracy"])
    ok = [p for p in points if p["flops"] <= flop_budget]
    return max(ok, key=lambda p: (p["accuracy"], -p["flops"])) if ok else min(points, key=lambda p: p["flops"])


def choose_thresholds(tier_probs, labels, tier_flops, tolerance=0.002, kind="max_prob"):
    """Thresholds for the checkpoint: the cheapest setting whose validation accuracy is within `tolerance`
    of the full model's (the last tier's). -> (thresholds, record of the choice)."""
    points = curve(tier_probs, labels, tier_flops, kind)
    full_acc = float((tier_probs[-1].argmax(axis=1) == labels).mean())
    pick = choose(points, target_accuracy=full_acc - tolerance)
    return pick["thresholds"], {"full_accuracy": full_acc, "tolerance": tolerance, "kind": kind, **pick}
