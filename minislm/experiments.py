"""`python -m minislm.experiments ag_news`: every expert, fusion, baseline and cascade on the same test rows.

Trains the team once (stages 1-3, minislm.team), then, reusing its features: every fusion strategy over the
encoders alone and with the lexical expert, logit-level ensembles, the baselines users reach for first
(each encoder's last-layer mean embedding + logistic regression, TF-IDF word 1-2 grams + logistic regression;
scikit-learn, from the `bench` extra), and the cascade at settings chosen on the validation split.
Writes notebooks/results/<dataset>.json, a Markdown table beside it, and a PNG of accuracy vs FLOPs when
matplotlib is installed. Accuracy is on the protocol's test rows, which nothing is tuned on.
"""
import argparse
import math
import sys
import time

import numpy as np

from minislm import data
from minislm.team import cascade
from minislm.atomic import write_json, write_text
from minislm.collab import ensembles, losses, trainer
from minislm.collab.trainer import TrainConfig
from minislm.team import Team, TeamConfig
from minislm.team.costs import head_flops
from minislm.team.team import LEXICAL, short
from minislm.team.training import fit, train_fusion

FUSIONS = ("concat", "mean", "static", "gated", "attention")


def macro_f1(labels, preds, n_classes):
    f1 = []
    for c in range(n_classes):
        tp = np.sum((preds == c) & (labels == c))
        fp, fn = np.sum((preds == c) & (labels != c)), np.sum((preds != c) & (labels == c))
        f1.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1))


def mcnemar_exact(correct_a, correct_b):
    """Exact two-sided McNemar test on paired correctness [B] bools -> (b, c, p-value)."""
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


def row(name, kind, labels, preds, gflops, n_classes, **extra):
    return {"name": name, "kind": kind, "accuracy": float((preds == labels).mean()),
            "macro_f1": macro_f1(labels, preds, n_classes), "gflops_per_sample": float(gflops), **extra}


def run(dataset, out, data_dir=None, quick=False, save_model=None, log=print):
    t_start = time.time()
    train, test = data.protocol_splits(dataset, data_dir)
    C = len(train.label_names)
    tc = TrainConfig(epochs=3) if quick else TrainConfig()
    cfg = TeamConfig(dataset=dataset, label_names=train.label_names, train=tc)
    team = fit(Team(cfg), train, log=log)
    F = team.training              # what training saw: the fit / validation rows and their features
    y_test = test.labels

    log("test features")
    p_lex_test = team.lexical.predict_proba(test.texts)
    feats_test = {LEXICAL: team.lexical_features(test.texts, p_lex_test)}
    for name in cfg.encoders:
        feats_test[name] = team.standardized(name, team.encoder_features(name, test.texts, split=test.split))
    tier_flops = team.tier_flops(test.texts)          # cumulative per tier, [B] each
    enc_flops = {name: tier_flops[k] - tier_flops[k - 1] for k, name in enumerate(cfg.experts) if k > 0}
    lex_flops = tier_flops[0]
    all_three = float(np.mean(sum(enc_flops.values())))  # always running the three encoders

    rows, probs_single = [], {}
    rows.append(row(LEXICAL, "single", y_test, p_lex_test.argmax(1), lex_flops.mean() / 1e9, C))
    probs_single[LEXICAL] = p_lex_test
    for name in cfg.encoders:
        c, p = team.singles[name]
        pr = losses.softmax(trainer.logits_of(c, p, {name: feats_test[name]}))
        probs_single[name] = pr
        rows.append(row(name, "single", y_test, pr.argmax(1), (enc_flops[name].mean() + head_flops(c)) / 1e9, C))

    fusion_probs = {}
    for experts in (list(cfg.encoders), list(cfg.experts)):
        tag = "+".join(short(e) for e in experts)
        cost = sum(enc_flops[e].mean() for e in experts if e != LEXICAL) + (lex_flops.mean() if LEXICAL in experts else 0)
        for fusion in FUSIONS:
            if fusion == cfg.fusion and experts == list(cfg.experts):
                c, p = team.tiers[-1]
            else:
                c, p = train_fusion(team, experts, F, fusion=fusion, log=log)
            pr = losses.softmax(trainer.logits_of(c, p, {e: feats_test[e] for e in experts}))
            name = f"{fusion}/{tag}"
            fusion_probs[name] = pr
            rows.append(row(name, "fusion", y_test, pr.argmax(1), (cost + head_flops(c)) / 1e9, C))
        P = np.stack([probs_single[e] for e in experts], axis=1)
        pr = ensembles.average(P)
        fusion_probs[f"prob-average/{tag}"] = pr
        rows.append(row(f"prob-average/{tag}", "fusion", y_test, pr.argmax(1), cost / 1e9, C))
        # stacking: a logistic regression over the experts' log-probabilities, trained on the validation rows
        # (the experts' own training rows would make them look too reliable)
        P_val = np.stack([F.lexical_val if e == LEXICAL else
                          losses.softmax(trainer.logits_of(*team.singles[e], {e: F.feats_val[e]}))
                          for e in experts], axis=1)
        st = ensembles.stacking_fit(P_val, F.y_val, seed=cfg.seed)
        pr = ensembles.stacking_predict(st, P)
        fusion_probs[f"stacking/{tag}"] = pr
        rows.append(row(f"stacking/{tag}", "fusion", y_test, pr.argmax(1), cost / 1e9, C))

    rows += baselines(team, test, enc_flops, log)

    log("cascade")
    tier_probs = team.tier_probs(feats_test, p_lex_test)
    val_flops = team.tier_flops(F.texts_val)
    val_points = cascade.curve(team.tier_probs(F.feats_val, F.lexical_val), F.y_val, val_flops)
    val_all_three = float(np.mean(sum(val_flops[k] - val_flops[k - 1] for k in range(1, len(cfg.experts)))))
    best_single_val = max(team.metrics["val_single"][e] for e in cfg.encoders)
    settings = {
        "cascade/val-chosen (checkpoint)": {"thresholds": team.thresholds},
        "cascade/target=full-0.2pt": cascade.choose(val_points, target_accuracy=team.metrics["val_tiers"][-1] - 0.002),
        "cascade/target=best-single": cascade.choose(val_points, target_accuracy=best_single_val),
        "cascade/budget=10%": cascade.choose(val_points, flop_budget=0.10 * val_all_three),
        "cascade/budget=15%": cascade.choose(val_points, flop_budget=0.15 * val_all_three),
        "cascade/budget=20%": cascade.choose(val_points, flop_budget=0.20 * val_all_three),
    }
    for name, s in settings.items():
        tiers, preds, cost = cascade.simulate(tier_probs, s["thresholds"], tier_flops)
        share = (np.bincount(tiers, minlength=len(tier_probs)) / len(tiers)).tolist()
        rows.append(row(name, "cascade", y_test, preds, cost.mean() / 1e9, C, thresholds=s["thresholds"],
                        exit_share=share, flops_vs_all_three=float(cost.mean() / all_three)))
    if team.router is not None:  # gated mode: the lexical-fed router picks which encoders run
        from minislm.collab import model as collab
        c, p = team.router
        pr = losses.softmax(trainer.logits_of(c, p, feats_test))  # = predict_gated: unchosen experts weigh 0
        chosen = collab.gate_only(c, p, {LEXICAL: feats_test[LEXICAL]}) > 0
        cost = team.router_flops(chosen, test.texts)
        rows.append(row(f"router/top-{c.top_k} chosen by the lexical expert", "cascade", y_test, pr.argmax(1),
                        cost.mean() / 1e9, C, run_share=dict(zip([short(e) for e in c.experts],
                                                                 chosen.mean(axis=0).tolist())),
                        flops_vs_all_three=float(cost.mean() / all_three)))
    curve = cascade.pareto(cascade.curve(tier_probs, y_test, tier_flops))

    chosen = next(r for r in rows if r["name"] == "cascade/val-chosen (checkpoint)")
    team.metrics["test"] = {"accuracy": chosen["accuracy"], "rows": len(y_test),
                            "gflops_per_sample": chosen["gflops_per_sample"], "exit_share": chosen["exit_share"]}
    singles = [r for r in rows if r["kind"] == "single"]
    fusions = [r for r in rows if r["kind"] == "fusion"]
    best_single = max(singles, key=lambda r: r["accuracy"])
    best_fusion = max(fusions, key=lambda r: r["accuracy"])
    correct = lambda name: ((fusion_probs[name] if name in fusion_probs else probs_single[name]).argmax(1)  # noqa: E731
                            == y_test)
    b, c, p = mcnemar_exact(correct(best_fusion["name"]), correct(best_single["name"]))
    result = {
        "protocol": dict(train.protocol, val_fraction=cfg.val_fraction, max_len=cfg.max_len, seed=cfg.seed),
        "command": f"python -m minislm.experiments {dataset}" + (" --quick" if quick else "")
                   + (f" --save-model {save_model}" if save_model else ""),
        "rows": rows,
        "mcnemar": {"fusion": best_fusion["name"], "single": best_single["name"], "p_value": p,
                    "fusion_only_correct": b, "single_only_correct": c, "test": "exact binomial, two-sided"},
        "all_three_encoders_gflops_per_sample": all_three / 1e9,
        "cascade_tiers": [short(e) for e in cfg.experts],
        "cascade_curve_test": [dict(pt, gflops=pt["flops"] / 1e9, flops_vs_all_three=pt["flops"] / all_three)
                               for pt in curve],
        "validation": team.metrics,
        "team_config": {k: v for k, v in cfg.__dict__.items()},
        "seconds": round(time.time() - t_start, 1),
    }
    write_json(out, result)
    write_text(str(out).rsplit(".", 1)[0] + ".md", markdown(result))
    plot(result, str(out).rsplit(".", 1)[0] + ".png")
    return result, team


def baselines(team, test, enc_flops, log):
    """lr-last-layer/<encoder> and tfidf-lr, with scikit-learn (the `bench` extra), on the team's own
    training rows: C picked on the team's validation split, then refit on every training row."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        log("baselines skipped: scikit-learn is not installed (pip install -e '.[bench]')")
        return []
    train, fit_idx, val_idx = team.training.dataset, team.training.fit_idx, team.training.val_idx
    C = len(train.label_names)
    out = []

    def tuned(Xtr, Xte, grid):
        best = max(grid, key=lambda c: LogisticRegression(C=c, max_iter=2000).fit(
            Xtr[fit_idx], train.labels[fit_idx]).score(Xtr[val_idx], train.labels[val_idx]))
        return LogisticRegression(C=best, max_iter=2000).fit(Xtr, train.labels).predict(Xte), best

    for name in team.cfg.encoders:
        H = team.expert(name).config.hidden
        Xtr = team.encoder_features(name, train.texts, split=train.split)[:, -1, :H]  # last layer, mean
        Xte = team.encoder_features(name, test.texts, split=test.split)[:, -1, :H]
        preds, c = tuned(Xtr, Xte, [0.1, 1.0, 10.0])
        out.append(row(f"lr-last-layer/{name}", "baseline", test.labels, preds,
                       (enc_flops[name].mean() + 2 * H * C) / 1e9, C, C_chosen=c))
        log(f"  lr-last-layer/{name}: {out[-1]['accuracy']:.4f}")
    t = time.time()
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    Xtr, Xte = vec.fit_transform(train.texts), vec.transform(test.texts)
    preds, c = tuned(Xtr, Xte, [1.0, 10.0, 100.0])
    nnz = Xte.getnnz(axis=1).mean()
    out.append(row("tfidf-lr", "baseline", test.labels, preds, (2 * nnz * C + 4 * nnz) / 1e9, C, C_chosen=c,
                   seconds=round(time.time() - t, 1)))
    log(f"  tfidf-lr: {out[-1]['accuracy']:.4f}")
    return out


def markdown(result):
    lines = [f"# {result['protocol'].get('dataset', '')}: test accuracy of every expert, fusion, baseline and "
             f"cascade", "", f"Command: `{result['command']}`", "", f"Protocol: {result['protocol'].get('note', '')}",
             "", "| kind | name | accuracy | macro F1 | GFLOPs / sample | bar |", "|---|---|---|---|---|---|"]
    top = max(r["accuracy"] for r in result["rows"])
    for r in sorted(result["rows"], key=lambda r: ("single fusion baseline cascade".split().index(r["kind"]),
                                                   -r["accuracy"])):
        bar = "#" * max(1, int(round(40 * (r["accuracy"] - 0.8) / max(1e-9, top - 0.8)))) if r["accuracy"] > 0.8 else ""
        lines.append(f"| {r['kind']} | {r['name']} | {100 * r['accuracy']:.2f} | {100 * r['macro_f1']:.2f} "
                     f"| {r['gflops_per_sample']:.4g} | `{bar}` |")
    m = result["mcnemar"]
    lines += ["", f"McNemar ({m['test']}): {m['fusion']} vs {m['single']}: p = {m['p_value']:.3g} "
              f"({m['fusion_only_correct']} rows only the fusion gets right, {m['single_only_correct']} only the single)",
              "", "Cascade rows: thresholds chosen on the validation split; exit shares per tier "
              f"({', '.join(result['cascade_tiers'])}):", ""]
    for r in result["rows"]:
        if r["kind"] == "cascade" and "run_share" in r:
            lines.append(f"- {r['name']}: {100 * r['accuracy']:.2f}% at {100 * r['flops_vs_all_three']:.1f}% of the "
                         f"FLOPs of running all three encoders; share of rows running each expert: "
                         + ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["run_share"].items()))
        elif r["kind"] == "cascade":
            lines.append(f"- {r['name']}: {100 * r['accuracy']:.2f}% at {100 * r['flops_vs_all_three']:.1f}% of the "
                         f"FLOPs of running all three encoders; exits {', '.join(f'{100 * s:.1f}%' for s in r['exit_share'])}")
    lines += ["", "The cascade's accuracy-vs-FLOPs curve on the test rows: every threshold setting of the grid that no "
              "other setting beats on both (a display of the trade-off; the rows above were chosen on validation):", "",
              "| thresholds (tiers 0..2) | accuracy | GFLOPs / sample | % of all three encoders | exits per tier |",
              "|---|---|---|---|---|"]
    for pt in result["cascade_curve_test"]:
        lines.append(f"| {', '.join(f'{t:.3g}' for t in pt['thresholds'])} | {100 * pt['accuracy']:.2f} "
                     f"| {pt['gflops']:.3f} | {100 * pt['flops_vs_all_three']:.1f} "
                     f"| {' / '.join(f'{100 * x:.0f}%' for x in pt['exit_share'])} |")
    return "\n".join(lines) + "\n"


def plot(result, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    curve = result["cascade_curve_test"]
    ax.plot([p["gflops"] for p in curve], [100 * p["accuracy"] for p in curve], "-", color="gray",
            label="cascade, every threshold setting (Pareto front)")
    marks = {"single": "o", "fusion": "s", "baseline": "^", "cascade": "*"}
    for kind, m in marks.items():
        rs = [r for r in result["rows"] if r["kind"] == kind and r["accuracy"] > 0.8]
        ax.scatter([max(r["gflops_per_sample"], 1e-6) for r in rs], [100 * r["accuracy"] for r in rs], marker=m,
                   label=kind, s=60 if kind == "cascade" else 30)
    ax.set_xscale("log")
    ax.set_xlabel("GFLOPs per sample (log)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    from minislm.atomic import atomic_path
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minislm.experiments", description=__doc__.splitlines()[0])
    ap.add_argument("dataset", choices=list(data.PROTOCOLS))
    ap.add_argument("--out", help="results JSON (default notebooks/results/<dataset>.json)")
    ap.add_argument("--data-dir", help="folder holding <dataset>/{split}.parquet (default: $MINISLM_DATA_DIR, ...)")
    ap.add_argument("--quick", action="store_true", help="3 epochs per model: a smoke run, not for results")
    ap.add_argument("--save-model", help="also save the trained team (checkpoint folder) here")
    args = ap.parse_args(argv)
    out = args.out or str(data.REPO / "notebooks" / "results" / f"{args.dataset}.json")
    result, team = run(args.dataset, out, args.data_dir, args.quick, args.save_model)
    print(markdown(result))
    if args.save_model:
        team.save(args.save_model, command=result["command"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
