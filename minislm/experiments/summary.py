"""The validation-chosen rows of every protocol in one Markdown table (the README's results table).

    python -m minislm.experiments.summary    ->  notebooks/results/summary.md (and printed)

Per protocol: the best single expert and the best team as `selected` names them (chosen on validation rows,
before any test row was scored), the checkpoint's own cascade, and TF-IDF + logistic regression, each with
its test accuracy (mean ± sd over seeds) and cost; then the paired test difference team - single with
McNemar's p. Every number is read from notebooks/results/<protocol>.json.
"""
import sys

from minislm.atomic import write_text
from minislm.experiments.guide import RESULTS, load_results


def cell(row, seeds=None):
    """test accuracy % (mean ± sd over seeds) @ GFLOPs per text, and the row's seeds when fewer than the file's"""
    note = f" ({row['seeds']} seed)" if seeds and row.get("seeds", seeds) < seeds else ""
    return f"{100 * row['accuracy']:.2f} ± {100 * row['accuracy_sd']:.2f} @ {row['gflops_per_sample']:.3g}{note}"


def table(results_dir=RESULTS):
    lines = ["Test accuracy % (mean ± sd over seeds) @ GFLOPs per text; every pick made on validation rows.", "",
             "| protocol | seeds | best single (validation-chosen) | test % | best team (validation-chosen) | test % "
             "| team - single (McNemar p) | checkpoint's cascade test % | tfidf-lr test % |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p, r in load_results(results_dir).items():
        sel, rows = r["selected"], {x["name"]: x for x in r["rows"]}
        single, team = rows[sel["best_single"]], rows[sel["best_team"]]
        ck = sel.get("checkpoint")
        n = len(r["seeds"])
        ck_cell = cell(rows[ck["name"]], n) if ck else "-"
        tfidf = cell(rows["tfidf-lr"], n) if "tfidf-lr" in rows else "-"
        lines.append(f"| {p} | {n} | {single['name']} | {cell(single, n)} | {team['name']} | {cell(team, n)} "
                     f"| {sel['difference_points']:+.2f} ({sel['mcnemar_p']:.2g}) | {ck_cell} | {tfidf} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    md = table()
    write_text(RESULTS / "summary.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
