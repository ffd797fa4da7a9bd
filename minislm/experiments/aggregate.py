"""Seeds -> one results file: every row's mean and spread, the validation-chosen best single and best team,
the ablations' paired statistics, a Markdown table and a plot.

Choices read validation accuracy only (the mean over seeds); test accuracy is reported, never used to choose.
The paired tests (McNemar, bootstrap) compare the two rows' test predictions of the first seed: the same test
rows answered by two models of the same training run.
"""
import numpy as np

from minislm.experiments import stats

TEAM_KINDS = ("fusion", "cascade")
SINGLE_KINDS = ("single", "adapted")


def combine(seed_results):
    """[per-seed dicts from seed_run.run_seed] -> rows with mean / sd over seeds (preds of the first seed kept
    apart for the statistics)."""
    first = seed_results[0]
    names = [r["name"] for r in first["rows"]]
    by = [{r["name"]: r for r in s["rows"]} for s in seed_results]
    rows, preds = [], {}
    for name in names:
        runs = [b[name] for b in by if name in b]
        acc = [r["accuracy"] for r in runs]
        row = {k: v for k, v in runs[0].items() if k != "preds"}
        row.update(accuracy=float(np.mean(acc)), accuracy_sd=float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0,
                   accuracy_by_seed=acc, val_accuracy=float(np.nanmean([r["val_accuracy"] for r in runs])),
                   macro_f1=float(np.mean([r["macro_f1"] for r in runs])),
                   gflops_per_sample=float(np.mean([r["gflops_per_sample"] for r in runs])),
                   train_seconds=float(np.mean([r["train_seconds"] for r in runs])), seeds=len(runs))
        rows.append(row)
        preds[name] = np.asarray(runs[0]["preds"])
    return rows, preds


def paired(preds, y, a, b, seed=0):
    """Test-accuracy difference a - b in points, with McNemar's p and a bootstrap 95 % interval."""
    ca, cb = preds[a] == y, preds[b] == y
    _, _, p = stats.mcnemar_exact(ca, cb)
    return {"difference_points": float(100 * (ca.mean() - cb.mean())), "mcnemar_p": p,
            "bootstrap_ci95": stats.bootstrap_ci(ca, cb, seed=seed)}


def select(rows, preds, y):
    """The validation-chosen best single expert and best team, and their paired test comparison."""
    ok = [r for r in rows if r.get("selectable", True) and np.isfinite(r["val_accuracy"])]
    singles = [r for r in ok if r["kind"] in SINGLE_KINDS]
    teams = [r for r in ok if r["kind"] in TEAM_KINDS]
    best_single = max(singles, key=lambda r: (r["val_accuracy"], -r["gflops_per_sample"]))
    best_team = max(teams, key=lambda r: (r["val_accuracy"], -r["gflops_per_sample"]))
    out = {"best_single": best_single["name"], "best_team": best_team["name"],
           "rule": "highest mean validation accuracy over seeds (ties: fewer GFLOPs): singles among rows of kind "
                   "single/adapted, teams among fusion/cascade rows; p and interval compare the two rows' test "
                   "predictions of the first seed (team - single, points)",
           "validation": best_single.get("val_basis", "the validation split carved from the training rows")
                         + ("; rows whose validation cannot be on that footing are not candidates: "
                            + ", ".join(r["name"] for r in rows if not r.get("selectable", True)
                                        and r["kind"] in TEAM_KINDS + SINGLE_KINDS)
                            if any(not r.get("selectable", True) for r in rows) else "")}
    out.update(paired(preds, y, best_team["name"], best_single["name"]))
    checkpoint = next((r for r in rows if r.get("checkpoint")), None)
    if checkpoint is not None:
        out["checkpoint"] = {"name": checkpoint["name"], **paired(preds, y, checkpoint["name"], best_single["name"]),
                             "gflops_vs_best_single": checkpoint["gflops_per_sample"] / best_single["gflops_per_sample"]}
    return out


def ablation_pairs(rows):
    """(row, the row it is compared with, what it isolates) for every ablation the table holds."""
    names = {r["name"] for r in rows}
    pairs = [(r["name"], r["pair"], r["name"].split("/")[1]) for r in rows if r["kind"] == "ablation" and r.get("pair")]
    pairs += [(r["name"], r["expert"], "adapted vs frozen") for r in rows
              if r["kind"] == "adapted" and r.get("expert") in names]
    for name in sorted(names):  # over every member: concat without the lexical expert, mean without the gate
        fusion, _, members = name.partition("/")
        if not members.startswith("lexical+"):
            continue
        if fusion == "concat" and f"concat/{members[len('lexical+'):]}" in names:
            pairs.append((f"concat/{members[len('lexical+'):]}", name, "without the lexical expert"))
        if fusion == "mean" and f"gated/{members}" in names:
            pairs.append((name, f"gated/{members}", "plain mean vs gated fusion"))
    return pairs


def ablations(rows, preds, y):
    out = [{"row": a, "compared_with": b, "isolates": what, **paired(preds, y, a, b)}
           for a, b, what in ablation_pairs(rows)]
    for r, p in zip(out, stats.holm([r["mcnemar_p"] for r in out])):
        r["holm_p"] = p
    return out


def markdown(result):
    sel = result["selected"]
    lines = [f"# {result['protocol']['dataset']}: every row over {len(result['seeds'])} seeds", "",
             f"Command: `{result['command']}` ({result['seconds'] / 60:.0f} min)", "",
             f"Protocol: {result['protocol'].get('note', '')}", "",
             f"Chosen on validation: best single **{sel['best_single']}**, best team **{sel['best_team']}**: "
             f"{sel['difference_points']:+.2f} points on test (McNemar p = {sel['mcnemar_p']:.3g}, bootstrap 95 % "
             f"[{sel['bootstrap_ci95'][0]:+.2f}, {sel['bootstrap_ci95'][1]:+.2f}])", "",
             f"Validation accuracy, the only score choices read: {sel.get('validation', 'the validation split')}.", "",
             "| kind | name | test accuracy % (mean ± sd) | validation % | macro F1 % | GFLOPs / text | params (M) |",
             "|---|---|---|---|---|---|---|"]
    order = "single adapted fusion cascade int8 baseline ablation".split()
    for r in sorted(result["rows"], key=lambda r: (order.index(r["kind"]), -r["val_accuracy"])):
        mark = " (chosen)" if r["name"] in (sel["best_single"], sel["best_team"]) else ""
        mark += " (checkpoint)" if r.get("checkpoint") else ""
        lines.append(f"| {r['kind']} | {r['name']}{mark} | {100 * r['accuracy']:.2f} ± {100 * r['accuracy_sd']:.2f} "
                     f"| {100 * r['val_accuracy']:.2f} | {100 * r['macro_f1']:.2f} | {r['gflops_per_sample']:.4g} "
                     f"| {r['params'] / 1e6:.2f} |")
    lines += ["", "Ablations (test predictions of the first seed; Holm-corrected across the family):", "",
              "| row | compared with | isolates | difference (points) | McNemar p | Holm p | bootstrap 95 % |",
              "|---|---|---|---|---|---|---|"]
    for a in result["ablations"]:
        lines.append(f"| {a['row']} | {a['compared_with']} | {a['isolates']} | {a['difference_points']:+.2f} "
                     f"| {a['mcnemar_p']:.3g} | {a['holm_p']:.3g} | [{a['bootstrap_ci95'][0]:+.2f}, "
                     f"{a['bootstrap_ci95'][1]:+.2f}] |")
    comp = result["composition_by_seed"][0]
    lines += ["", f"The checkpoint's cascade (seed {result['seeds'][0]}): tiers {comp['active']} serving "
              f"{comp['answers']}; {comp['rule']}. Cross-fitted estimate: {100 * comp['estimate']['accuracy']:.2f} % "
              f"at {comp['estimate']['gflops_per_sample']:.3g} GFLOPs per text."]
    if result.get("search"):
        lines += ["", "Random search over the full fusion's head (validation accuracy, first seed):", ""]
        for t in result["search"]:
            lines.append(f"- {'default ' if t['default'] else ''}{t['settings']}: {100 * t['val_accuracy']:.2f}")
    return "\n".join(lines) + "\n"


def plot(result, path):
    """Accuracy vs GFLOPs per text, every row with its spread over seeds, the chosen rows marked."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from minislm.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    marks = {"single": "o", "adapted": "D", "fusion": "s", "cascade": "*", "int8": "P", "baseline": "^",
             "ablation": "x"}
    for kind, m in marks.items():
        rs = [r for r in result["rows"] if r["kind"] == kind]
        if rs:
            ax.errorbar([max(r["gflops_per_sample"], 1e-6) for r in rs], [100 * r["accuracy"] for r in rs],
                        yerr=[100 * r["accuracy_sd"] for r in rs], fmt=m, label=kind, ms=8 if kind == "cascade" else 5,
                        capsize=2, alpha=0.85)
    sel = result["selected"]
    for name in (sel["best_single"], sel["best_team"]):
        r = next(r for r in result["rows"] if r["name"] == name)
        ax.scatter([max(r["gflops_per_sample"], 1e-6)], [100 * r["accuracy"]], s=180, facecolors="none",
                   edgecolors="red", linewidths=1.5)
    ax.set_xscale("log")
    ax.set_xlabel("GFLOPs per text (log)")
    ax.set_ylabel(f"test accuracy % (mean ± sd over {len(result['seeds'])} seeds)")
    ax.set_title(f"{result['protocol']['dataset']}: red circles = chosen on validation")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return True
