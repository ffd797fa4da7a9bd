"""Validation-driven composition: which tiers a team runs, what each tier answers, and where rows stop.

A team must never serve something that validates worse than one of its own members. So every choice below
is made on held-apart rows (the validation split, or for small data out-of-fold predictions over the whole
training set, see training.py), never on rows a model was fitted on:

    candidates at tier k, given the set A of experts run so far (lexical always; an encoder only if its tier
    is active):
        single:e   member e's own model (stage 1), e in A
        stack      a logistic regression over the members' probabilities (collab/ensembles.py), its score
                   cross-fitted (k folds over the held-apart rows: no row is scored by a stack that saw it)
        fused      the tier's trained collaboration (stages 2-3), when every expert it reads is in A
    a tier serves its best-scoring candidate (ties go to the cheaper one);
    the active tiers: any subset of tiers 1..L (tier 0, the lexical expert, always runs first), so a tier
    that never pays for itself is skipped and its encoder never runs;
    thresholds: for every subset, the grid of confidence thresholds (cascade.py); the setting served is the
    cheapest (mean FLOPs) whose accuracy is within `tolerance` of the best accuracy any setting reaches.

The whole procedure is also cross-fitted (chosen on k - 1 folds of the held-apart rows, scored on the
remaining fold, for every fold), which gives an honest estimate of the accuracy and cost the chosen
setting will have on new rows; both estimate and choice are recorded in the checkpoint.
"""
import itertools
from dataclasses import asdict, dataclass, field

import numpy as np

from minislm import data as data_lib
from minislm.collab import ensembles
from minislm.team import cascade

LEXICAL = "lexical"
GRID = np.concatenate([[0.0], cascade.CANDIDATES])  # 0 = every row stops here


@dataclass
class Answer:
    kind: str                 # "single", "stack" or "fused"
    experts: list             # the members it reads (one for "single")

    @property
    def name(self):
        return f"single:{self.experts[0]}" if self.kind == "single" else self.kind


@dataclass
class Composition:
    active: list                                  # tier indices that run, ascending, starting with 0
    answers: dict                                 # tier index -> Answer
    thresholds: list                              # confidence to stop at each active tier but the last
    stacks: dict = field(default_factory=dict)    # tier index -> stacking params (kind "stack")
    record: dict = field(default_factory=dict)    # what was compared and why this was chosen (JSON)

    def to_dict(self):
        return {"active": self.active, "answers": {str(k): asdict(a) for k, a in self.answers.items()},
                "thresholds": [float(t) for t in self.thresholds], "record": self.record}

    @classmethod
    def from_dict(cls, d, stacks):
        answers = {int(k): Answer(**a) for k, a in d["answers"].items()}
        return cls([int(k) for k in d["active"]], answers, [float(t) for t in d["thresholds"]],
                   {int(k): v for k, v in stacks.items()}, d.get("record", {}))

    @classmethod
    def every_tier_fused(cls, n_tiers, thresholds):
        """The classic cascade: every tier runs and answers with its fused head (tier 0: the lexical expert)."""
        answers = {0: Answer("single", [LEXICAL])}
        answers.update({k: Answer("fused", []) for k in range(1, n_tiers)})
        return cls(list(range(n_tiers)), answers, list(thresholds))


def crossfit_stack(P, y, folds, seed):
    """P [B, E, C] member probabilities, y [B] -> stacking probabilities [B, C], each row predicted by a
    stack fitted on the other folds."""
    out = np.zeros((P.shape[0], P.shape[2]), dtype=np.float32)
    for tr, ho in data_lib.kfold(y, min(folds, len(y)), seed):
        params = ensembles.stacking_fit(P[tr], y[tr], seed=seed)
        out[ho] = ensembles.stacking_predict(params, P[ho])
    return out


def stack_flops(n_members, n_classes):
    """FLOPs per row of the stacking regression: log of E*C inputs, [E*C] x [E*C, C] + bias, the softmax."""
    return n_members * n_classes + 2 * n_members * n_classes * n_classes + n_classes + 5 * n_classes


@dataclass
class Evidence:
    """Everything the choice reads, on N held-apart rows."""
    experts: list             # tier order, experts[0] = lexical
    y: np.ndarray             # [N] labels
    members: dict             # expert -> its single model's probabilities [N, C]
    fused: dict               # tier k >= 1 -> the fused tier model's probabilities [N, C]
    encoder_flops: dict       # encoder -> FLOPs per row [N] of running it (pooling included)
    lexical_flops: np.ndarray  # [N]
    head_flops: dict          # "single:e" / "fused:k" -> FLOPs per row of that head
    folds: int = 5
    seed: int = 0
    _stacks: dict = field(default_factory=dict)

    def stack_probs(self, members):
        """Cross-fitted stacking probabilities over `members` [N, C] (computed once per member set)."""
        key = tuple(members)
        if key not in self._stacks:
            P = np.stack([self.members[e] for e in members], axis=1)
            self._stacks[key] = crossfit_stack(P, self.y, self.folds, self.seed)
        return self._stacks[key]

    def candidates(self, k, available):
        """-> list of (Answer, probs [N, C], head FLOPs) a tier k can serve with experts `available`. A tier
        k >= 1 serves only answers that read its own encoder: one that ignored it would pay for running it for
        nothing (the setting without that tier says the same, cheaper)."""
        C = next(iter(self.members.values())).shape[1]
        out = []
        for e in available:
            if k > 0 and e != self.experts[k]:
                continue
            out.append((Answer("single", [e]), self.members[e], 0.0 if e == LEXICAL else self.head_flops[f"single:{e}"]))
        if len(available) >= 2:
            enc_heads = sum(self.head_flops[f"single:{e}"] for e in available if e != LEXICAL)
            out.append((Answer("stack", list(available)), self.stack_probs(available),
                        enc_heads + stack_flops(len(available), C)))
        if k in self.fused and set(self.experts[:k + 1]) <= set(available):
            out.append((Answer("fused", []), self.fused[k], self.head_flops[f"fused:{k}"]))
        return out


def _settings(ev, rows):
    """Every (active tiers, answers) setting with per-tier probabilities and cumulative FLOPs, answers chosen
    on `rows` -> list of dicts."""
    n = len(ev.experts)
    out = []
    for r in range(n):
        for middle in itertools.combinations(range(1, n), r):
            active = [0, *middle]
            answers, probs, costs = {}, [], []
            cost = ev.lexical_flops.astype(np.float64)
            for k in active:
                available = [ev.experts[j] for j in active if j <= k]
                if k > 0:
                    cost = cost + ev.encoder_flops[ev.experts[k]]
                cands = ev.candidates(k, available)
                acc = [float((p[rows].argmax(1) == ev.y[rows]).mean()) for _, p, _ in cands]
                best = max(range(len(cands)), key=lambda i: (acc[i], -cands[i][2]))
                ans, p, head = cands[best]
                answers[k] = ans
                probs.append(p)
                cost = cost + head  # every tier on the way answers, to decide whether the row stops
                costs.append(cost)
            out.append({"active": active, "answers": answers, "probs": probs, "flops": costs})
    return out


def _points(setting, rows, y):
    """Every threshold setting of the grid for one active-tier setting, on `rows`."""
    probs = [p[rows] for p in setting["probs"]]
    flops = [f[rows] for f in setting["flops"]]
    conf = [cascade.confidence(p) for p in probs]
    right = [p.argmax(1) == y[rows] for p in probs]
    out = []
    for ts in itertools.product(GRID, repeat=len(probs) - 1):
        open_rows = np.ones(len(rows), dtype=bool)
        correct = np.zeros(len(rows), dtype=bool)
        cost = np.zeros(len(rows))
        for k, t in enumerate(ts):
            stop = open_rows & (conf[k] >= t)
            correct[stop], cost[stop] = right[k][stop], flops[k][stop]
            open_rows &= ~stop
        correct[open_rows], cost[open_rows] = right[-1][open_rows], flops[-1][open_rows]
        out.append((float(correct.mean()), float(cost.mean()), [float(t) for t in ts]))
    return out


def _choose(ev, rows, tolerance):
    """The procedure on `rows`: -> (setting, thresholds, its accuracy and FLOPs on rows, best accuracy)."""
    settings = _settings(ev, rows)
    scored = [(s, _points(s, rows, ev.y)) for s in settings]
    best = max(acc for _, pts in scored for acc, _, _ in pts)
    ok = [(cost, -acc, i, ts) for i, (s, pts) in enumerate(scored) for acc, cost, ts in pts
          if acc >= best - tolerance]
    cost, neg_acc, i, ts = min(ok, key=lambda x: (x[0], x[1]))
    return scored[i][0], ts, -neg_acc, cost, best


def compose(ev, tolerance=0.002):
    """-> (Composition, record): the setting the checkpoint serves, chosen on every held-apart row, with a
    cross-fitted estimate of its accuracy and cost."""
    N = len(ev.y)
    rows = np.arange(N)
    setting, ts, acc, cost, best = _choose(ev, rows, tolerance)
    est_correct, est_cost = np.zeros(N), np.zeros(N)
    k = min(ev.folds, N // 2)  # every fold chooses on at least half as many rows as it scores
    if k >= 2:
        for tr, ho in data_lib.kfold(ev.y, k, ev.seed + 1):
            s, t, _, _, _ = _choose(ev, tr, tolerance)
            probs = [p[ho] for p in s["probs"]]
            flops = [f[ho] for f in s["flops"]]
            _, preds, c = cascade.simulate(probs, t, flops)
            est_correct[ho], est_cost[ho] = preds == ev.y[ho], c
        how = f"{k}-fold cross-fitting of the whole choice over the held-apart rows"
    else:  # too few rows to hold any apart from the choice: the estimate is the choice's own score, said so
        est_correct[:] = acc
        est_cost[:] = cost
        how = f"in-sample: {N} held-apart rows are too few to cross-fit the choice"
    singles = {e: float((p.argmax(1) == ev.y).mean()) for e, p in ev.members.items()}
    record = {
        "rule": f"every choice on {N} held-apart rows: each tier serves its best candidate; the setting served is "
                f"the cheapest whose accuracy is within {tolerance} of the best any setting reaches",
        "rows": N, "tolerance": tolerance, "best_accuracy": best, "accuracy": acc, "gflops_per_sample": cost / 1e9,
        "estimate": {"accuracy": float(est_correct.mean()), "gflops_per_sample": float(est_cost.mean() / 1e9),
                     "how": how},
        "single_accuracy": singles,
        "active": setting["active"],
        "answers": {str(k): a.name for k, a in setting["answers"].items()},
    }
    comp = Composition(setting["active"], setting["answers"], ts, record=record)
    return comp, record


def fit_stacks(comp, ev):
    """Fit the stacking regressions the composition serves, on every held-apart row."""
    for k, a in comp.answers.items():
        if a.kind == "stack":
            P = np.stack([ev.members[e] for e in a.experts], axis=1)
            comp.stacks[k] = ensembles.stacking_fit(P, ev.y, seed=ev.seed)
    return comp
