"""The fusion selection guide (thesis 4-2-5), derived only from the measured results files.

    python -m minislm.experiments.guide     ->  notebooks/results/fusion_guide.{json,md}

For every protocol with results, each combination strategy over the same frozen members (lexical +
encoders) is read with its validation accuracy (what a user can see before testing), its test accuracy (mean ± sd over
seeds), its gap to the validation-chosen best single expert, and its cost. The "when" column states only what
these rows show: on which protocols the strategy was the validation-best team strategy, and how far from the
best test accuracy it stayed. Nothing is claimed that the rows do not show.
"""
import json
import sys
from pathlib import Path

import numpy as np

from minislm.atomic import write_json, write_text

RESULTS = Path(__file__).resolve().parent.parent.parent / "notebooks" / "results"
PROTOCOLS = ("ag_news", "imdb", "dbpedia_14", "ag_news-1k", "imdb-1k")
STRATEGIES = ("concat", "mean", "static", "gated", "attention", "prob-average", "stacking", "cascade/checkpoint")
WHAT = {"concat": "one head over all members' mixed features side by side",
        "mean": "the members' projected features averaged",
        "static": "learned fixed weights per member",
        "gated": "a gate weighs members per input (MoE style, load-balancing loss)",
        "attention": "attention over the members' projected features",
        "prob-average": "the members' class probabilities averaged (no training)",
        "stacking": "logistic regression over the members' probabilities",
        "cascade/checkpoint": "cheap member first, escalate when unsure (the checkpoint's composition)"}


def load_results(results_dir=RESULTS):
    """-> {protocol: its results file, parsed} for every protocol that has one, in PROTOCOLS order."""
    return {p: json.loads((results_dir / f"{p}.json").read_text(encoding="utf-8"))
            for p in PROTOCOLS if (results_dir / f"{p}.json").exists()}


def team_rows(result):
    """-> {strategy: row} over the widest member set (every expert) of one results file."""
    rows = {r["name"]: r for r in result["rows"]}
    widest = max((n.split("/", 1)[1] for n in rows if n.startswith("concat/") and rows[n]["kind"] == "fusion"
                  and "adapted" not in rows[n].get("run", "") and not any(m.startswith(("top", "lora-", "full-"))
                                                                         for m in n.split("/", 1)[1].split("+"))),
                 key=lambda t: t.count("+"), default=None)
    out = {}
    for s in STRATEGIES:
        name = s if s.startswith("cascade/") else f"{s}/{widest}"
        if name in rows:
            out[s] = rows[name]
    return out


def protocol_summary(result):
    # frozen members only, on both sides (adapted runs are not repeated for every strategy and protocol)
    frozen = [r for r in result["rows"] if r["kind"] == "single" and r.get("selectable", True)]
    single = max(frozen, key=lambda r: (r["val_accuracy"], -r["gflops_per_sample"]))
    teams = team_rows(result)
    by_val = max(teams, key=lambda s: (teams[s]["val_accuracy"], -teams[s]["gflops_per_sample"]))
    best_test = max(r["accuracy"] for r in teams.values())
    return {
        "seeds": len(result["seeds"]), "n_train": result["protocol"].get("n_train"),
        "best_single": {"name": single["name"], "accuracy": single["accuracy"], "val_accuracy": single["val_accuracy"],
                        "gflops_per_sample": single["gflops_per_sample"]},
        "validation_best_strategy": by_val,
        "strategies": {s: {"row": r["name"], "val_accuracy": r["val_accuracy"], "accuracy": r["accuracy"],
                           "accuracy_sd": r["accuracy_sd"], "vs_best_single_points": 100 * (r["accuracy"] - single["accuracy"]),
                           "below_best_team_points": 100 * (best_test - r["accuracy"]),
                           "gflops_per_sample": r["gflops_per_sample"], "params": r["params"]}
                       for s, r in teams.items()},
    }


def build(results_dir=RESULTS):
    found = load_results(results_dir)
    per = {p: protocol_summary(r) for p, r in found.items() if "selected" in r}
    guide = []
    for s in STRATEGIES:
        seen = {p: d["strategies"][s] for p, d in per.items() if s in d["strategies"]}
        if not seen:
            continue
        guide.append({
            "strategy": s, "what": WHAT[s],
            "validation_best_on": [p for p, d in per.items() if d["validation_best_strategy"] == s],
            "mean_vs_best_single_points": float(np.mean([v["vs_best_single_points"] for v in seen.values()])),
            "worst_vs_best_single_points": float(min(v["vs_best_single_points"] for v in seen.values())),
            "mean_below_best_team_points": float(np.mean([v["below_best_team_points"] for v in seen.values()])),
            "gflops_per_sample": {p: v["gflops_per_sample"] for p, v in seen.items()},
            "protocols": list(seen),
        })
    return {"how": "from notebooks/results/<protocol>.json (python -m minislm.experiments <protocol>): each "
                   "strategy over every member; test accuracy means over seeds; 'validation best' uses validation "
                   "accuracy only", "protocols": per, "guide": guide}


def markdown(g):
    protos = list(g["protocols"])
    head = "| strategy | what it does | " + " | ".join(f"{p} test % (vs best single)" for p in protos) + \
           " | validation-best on | GFLOPs / text |"
    lines = ["# Fusion selection guide", "", g["how"] + ".", "", head, "|" + "---|" * (len(protos) + 4)]
    for s in g["guide"]:
        cells = []
        for p in protos:
            v = g["protocols"][p]["strategies"].get(s["strategy"])
            cells.append("-" if v is None else f"{100 * v['accuracy']:.2f} ({v['vs_best_single_points']:+.2f})")
        costs = [c for c in s["gflops_per_sample"].values()]
        cost = f"{min(costs):.3g}-{max(costs):.3g}" if len(costs) > 1 else f"{costs[0]:.3g}"
        lines.append(f"| {s['strategy']} | {s['what']} | " + " | ".join(cells) +
                     f" | {', '.join(s['validation_best_on']) or '-'} | {cost} |")
    lines += ["", "Best frozen single expert per protocol (chosen on validation): " + "; ".join(
        f"{p}: {d['best_single']['name']} {100 * d['best_single']['accuracy']:.2f} % "
        f"({d['seeds']} seeds, {d['n_train']} training rows)" for p, d in g["protocols"].items()) + "."]
    return "\n".join(lines) + "\n"


def write(results_dir=RESULTS):
    """Rebuild fusion_guide.{json,md} in results_dir from the results files there -> the Markdown."""
    g = build(results_dir)
    write_json(results_dir / "fusion_guide.json", g)
    write_text(results_dir / "fusion_guide.md", markdown(g))
    return markdown(g)


def main(argv=None):
    print(write())
    return 0


if __name__ == "__main__":
    sys.exit(main())
