"""`python -m minislm.train`: staged training of a team on a dataset, saved as a checkpoint folder.

    python -m minislm.train --dataset ag_news --out weights/ag_news
    python -m minislm.train --file reviews.csv --text-column review --label-column stars --out runs/reviews

Stage 1 trains each expert's own head, stage 2 the gate + fusion + head over all experts, stage 3 distils
the fused model into the cheaper tiers of the cascade; cascade thresholds are chosen on a validation split
carved from the training rows. With --dataset the protocol's test rows are scored at the end and the
accuracy is stored in the checkpoint. The checkpoint is swapped in only when complete.
"""
import argparse
import sys
import time

import numpy as np

from minislm import data
from minislm.collab.trainer import TrainConfig
from minislm.team import ENCODERS, LEXICAL, Team, TeamConfig


def team_config(args, dataset_name, label_names):
    tc = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=args.patience,
                     seed=args.seed)
    return TeamConfig(dataset=dataset_name, label_names=list(label_names), experts=list(args.experts),
                      fusion=args.fusion, max_len=args.max_len, proj_dim=args.proj_dim, head_hidden=args.head_hidden,
                      gate=args.gate, balance=args.balance, train=tc.to_dict(), seed=args.seed)


def train(args, log=print):
    if args.dataset:
        train_ds, test_ds = data.protocol_splits(args.dataset, args.data_dir)
    else:
        train_ds = data.load_file(args.file, args.text_column, args.label_column)
        train_ds.split = "train"
        test_ds = None
    log(f"{train_ds.name}: {len(train_ds)} training rows, {len(train_ds.label_names)} classes "
        f"({', '.join(train_ds.label_names)})")
    t0 = time.time()
    team = Team(team_config(args, train_ds.name, train_ds.label_names)).fit(train_ds, log=log)
    team.metrics["train_seconds"] = round(time.time() - t0, 1)
    if test_ds is not None:
        log(f"scoring the {len(test_ds)} test rows through the cascade")
        probs, info = team.predict_proba(test_ds.texts)
        acc = float((probs.argmax(1) == test_ds.labels).mean())
        team.metrics["test"] = {"accuracy": acc, "rows": len(test_ds),
                                "gflops_per_sample": float(info["flops"].mean() / 1e9),
                                "exit_share": (np.bincount(info["exit_tier"], minlength=len(team.cfg.experts))
                                               / len(test_ds)).tolist()}
        log(f"test accuracy {acc:.4f} at {team.metrics['test']['gflops_per_sample']:.3f} GFLOPs per sample")
    command = "python -m minislm.train " + " ".join(args.argv)
    team.save(args.out, command=command)
    log(f"saved {args.out}")
    return team


def parser():
    ap = argparse.ArgumentParser(prog="python -m minislm.train", description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", choices=list(data.PROTOCOLS), help="a known dataset, trained by its protocol")
    src.add_argument("--file", help="your own CSV / Parquet / JSONL file with a text and a label column")
    ap.add_argument("--text-column", default="text")
    ap.add_argument("--label-column", default="label")
    ap.add_argument("--data-dir", help="folder holding <dataset>/{split}.parquet (default: $MINISLM_DATA_DIR, ...)")
    ap.add_argument("--out", required=True, help="checkpoint folder to write")
    ap.add_argument("--experts", nargs="+", default=[LEXICAL, *ENCODERS],
                    help="tier order, cheapest first ('lexical' and expert names or model folders)")
    ap.add_argument("--fusion", default="concat", choices=["concat", "mean", "static", "gated", "attention"])
    ap.add_argument("--gate", default="softmax", choices=["softmax", "noisy_topk"])
    ap.add_argument("--balance", type=float, default=0.0, help="weight of the gate's load-balancing loss")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--proj-dim", type=int, default=256)
    ap.add_argument("--head-hidden", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--patience", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    args.argv = argv
    if args.experts[0] != LEXICAL:
        print("error: the first tier must be 'lexical' (the cascade's near-free tier 0)", file=sys.stderr)
        return 2
    try:
        train(args)
    except (data.DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the previous checkpoint (if any) is untouched", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
