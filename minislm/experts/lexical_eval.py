"""The lexical expert against the baseline it is held to, tfidf-lr, in one run on each dataset's protocol splits.

    python -m minislm.experts.lexical_eval [--datasets ag_news imdb] [--out notebooks/results/lexical_eval.json]

tfidf-lr is scikit-learn's TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1) fitted on every
training text, and LogisticRegression(max_iter=2000) with C from {1, 10, 100} picked on the same stratified 15 %
hold-out the lexical expert picks its own penalty on, then refitted on every training row. Both read the
whole text. Seconds are wall-clock on whatever machine runs this (the load average is recorded beside them).
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from minislm import data
from minislm.atomic import write_json
from minislm.encoder.tokenizer import Tokenizer
from minislm.experts import registry
from minislm.experts.lexical import LexicalModel, holdout_split

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "notebooks" / "results" / "lexical_eval.json"


def tfidf_lr(train, test, fit_rows, val_rows):
    """-> (test predictions [B_test], chosen C, seconds) of the scikit-learn baseline."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    t = time.time()
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    Xtr, Xte = vec.fit_transform(train.texts), vec.transform(test.texts)
    y = train.labels
    best = max([1.0, 10.0, 100.0], key=lambda c: LogisticRegression(C=c, max_iter=2000).fit(
        Xtr[fit_rows], y[fit_rows]).score(Xtr[val_rows], y[val_rows]))
    preds = LogisticRegression(C=best, max_iter=2000).fit(Xtr, y).predict(Xte)
    return preds, best, time.time() - t, float(Xte.getnnz(axis=1).mean())


def evaluate(name, tokenizer, log=print):
    """One dataset -> its record: accuracies of both, fit seconds, FLOPs per text, size on disk."""
    train, test = data.protocol_splits(name)
    C = len(train.label_names)
    t = time.time()
    model = LexicalModel.create(tokenizer, C, train.label_names).fit(train.texts, train.labels, progress=log)
    fit_seconds = time.time() - t
    t = time.time()
    probs = model.predict_proba(test.texts)
    predict_seconds = time.time() - t
    flops = model.flops(model.bags(test.texts)[0])
    with tempfile.TemporaryDirectory() as tmp:
        model.save(tmp)
        size_mb = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 1e6
    lexical_acc = float((probs.argmax(1) == test.labels).mean())
    log(f"{name}: lexical {lexical_acc:.4f} (fit {fit_seconds:.1f} s, c={model.info['c']:g})")
    fit_rows, val_rows = holdout_split(train.labels, model.cfg.val_fraction, 0)
    preds, c_best, sk_seconds, sk_nnz = tfidf_lr(train, test, fit_rows, val_rows)
    ref_acc = float((preds == test.labels).mean())
    log(f"{name}: tfidf-lr {ref_acc:.4f} (fit {sk_seconds:.1f} s, C={c_best:g})")
    return {
        "n_train": len(train), "n_test": len(test),
        "lexical": {"accuracy": round(lexical_acc, 4), "fit_seconds": round(fit_seconds, 1),
                    "predict_seconds": round(predict_seconds, 1), "c": model.info["c"],
                    "holdout_accuracy": {f"{k:g}": round(v, 4) for k, v in model.info["holdout_accuracy"].items()},
                    "newton_steps": model.info["newton_steps"], "cg_steps": model.info["cg_steps"],
                    "flops_per_text_mean": round(float(flops.mean()), 1),
                    "flops_per_text_max": int(flops.max()), "size_mb": round(size_mb, 2),
                    "config": model.state()[1]["config"]},
        "tfidf-lr": {"accuracy": round(ref_acc, 4), "fit_seconds": round(sk_seconds, 1), "C": c_best,
                     "nnz_per_test_text": round(sk_nnz, 1)},
        "lexical_minus_tfidf_lr": round(100 * (lexical_acc - ref_acc), 2),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["ag_news", "imdb"])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    folder = registry.expert_dir(registry.LEXICAL_TOKENIZER)
    tokenizer = Tokenizer.from_file(folder / "tokenizer.json", max_len=512, pad_id=0)
    given = sys.argv[1:] if argv is None else argv
    result = {"command": " ".join(["python -m minislm.experts.lexical_eval", *given]),
              "tokenizer": registry.LEXICAL_TOKENIZER, "cpus": os.cpu_count(),
              "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "datasets": {}}
    for name in args.datasets:
        result["datasets"][name] = evaluate(name, tokenizer)
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
