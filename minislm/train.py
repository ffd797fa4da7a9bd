"""`python -m minislm.train`: staged training of a team on a dataset, saved as a checkpoint folder.

    python -m minislm.train --dataset ag_news --out runs/ag_news
    python -m minislm.train --file reviews.csv --text-column review --label-column stars --out runs/reviews

Stage 1 trains each expert's own head, stage 2 the gate + fusion + head over all experts, stage 3 distils
the fused model into the cheaper tiers of the cascade; cascade thresholds are chosen on a validation split
carved from the training rows (minislm.team.training). With --dataset the protocol's test rows are scored
at the end and the accuracy is stored in the checkpoint.

Nothing is lost: every setting and the destination are checked before any work (--out must be new, empty or
a minislm checkpoint, and writable), the destination is locked for the whole run (a second training into the
same --out is refused at once), and the checkpoint is swapped in only when complete. The log on standard output
is only a log: a closed pipe (`| head -1`), a full disk (`> /dev/full`) or a closed stdout stops the log, never
the training; the checkpoint is still saved, and stderr says so.
Exit codes: 0 ok, 2 bad input (one line on stderr), 1 an unexpected failure, 130 interrupted.
"""
import dataclasses
import os
import sys
import time

import numpy as np

from minislm import data
from minislm.cli import Log, Parser, error, reserve_standard_fds, say
from minislm.collab.fusion import FUSIONS
from minislm.collab.trainer import TrainConfig
from minislm.experts import registry
from minislm.experts.load import check_config_values
from minislm.team import checkpoint
from minislm.team.adaptation import AdaptSettings
from minislm.team.config import GATES, TeamConfig
from minislm.team.team import Team
from minislm.team.training import fit


def _default(cls, name):
    f = {x.name: x for x in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def team_config(args, dataset_name, label_names):
    """The parsed flags -> TeamConfig (which checks every value's range)."""
    tc = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=args.patience,
                     seed=args.seed)
    return TeamConfig(dataset=dataset_name, label_names=list(label_names), experts=list(args.experts),
                      fusion=args.fusion, max_len=args.max_len, proj_dim=args.proj_dim, head_hidden=args.head_hidden,
                      gate=args.gate, balance=args.balance, val_fraction=args.val_fraction, train=tc, seed=args.seed,
                      adapt={name: AdaptSettings(method=args.adapt_method, rank=args.adapt_rank, top_k=args.adapt_top_k,
                                                 epochs=args.adapt_epochs, lr=args.adapt_lr,
                                                 max_len=args.adapt_max_len, head_tail=args.head_tail, seed=args.seed)
                             for name in args.adapt})


def check_settings(args):
    """Every flag checked (by TeamConfig and TrainConfig) before data is read or anything trains -> TeamConfig.
    A complaint about a field is worded with the flag that sets it ("epochs ..." -> "--epochs ...")."""
    try:
        return team_config(args, "check", ["a", "b"])
    except (ValueError, TypeError) as e:
        field, _, rest = str(e).partition(" ")
        what = f"--{field.replace('_', '-')} {rest}" if field in vars(args) and field != "argv" else str(e)
        raise ValueError(what if "; " in what else f"{what}; see `python -m minislm.train --help`") from e


def run(args, log=print):
    checkpoint.check_destination(args.out)
    with checkpoint.locked(args.out):
        return _run(args, log)


def _run(args, log):
    cfg = check_settings(args)
    empty = [e for e in args.experts if not str(e).strip()]
    if empty:
        raise ValueError(f"--experts holds an empty name ({args.experts}); name each expert or model folder")
    for name in [*cfg.encoders, registry.LEXICAL_TOKENIZER]:
        if name in registry.EXPERTS:
            registry.expert_dir(name)  # prepared and intact, or an error naming the fetch command
        else:
            check_config_values(name)  # a folder's config.json numbers, named by file and field
    if args.dataset:
        train_ds, test_ds = data.protocol_splits(args.dataset, args.data_dir)
    else:
        train_ds = data.load_file(args.file, args.text_column, args.label_column)
        train_ds.split = "train"
        test_ds = None
    log(f"{train_ds.name}: {len(train_ds)} training rows, {len(train_ds.label_names)} classes "
        f"({', '.join(train_ds.label_names)})")
    t0 = time.time()
    team = fit(Team(team_config(args, train_ds.name, train_ds.label_names)), train_ds, log=log)
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
    try:
        team.save(args.out, command="python -m minislm.train " + " ".join(args.argv))
    except OSError as e:  # a full disk, say: the swap never happened, so the old checkpoint (if any) is intact
        raise checkpoint.CheckpointError(f"--out {args.out}: the checkpoint could not be written ({e.strerror or e}); "
                                         f"free some space or choose another folder (nothing was replaced)") from e
    log(f"saved {args.out}")
    return team


def parser():
    d = lambda name: _default(TeamConfig, name)  # noqa: E731
    t = lambda name: _default(TrainConfig, name)  # noqa: E731
    ap = Parser(prog="python -m minislm.train", description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", choices=list(data.PROTOCOLS), help="a known dataset, trained by its protocol")
    src.add_argument("--file", help="your own CSV / Parquet / JSONL file with a text and a label column")
    ap.add_argument("--text-column", default="text")
    ap.add_argument("--label-column", default="label")
    ap.add_argument("--data-dir", help="folder holding <dataset>/{split}.parquet (default: $MINISLM_DATA_DIR, ...)")
    ap.add_argument("--out", required=True, help="checkpoint folder to write (new, empty, or a checkpoint)")
    ap.add_argument("--experts", nargs="+", default=d("experts"),
                    help="tier order, cheapest first: 'lexical', then expert names or model folders")
    ap.add_argument("--fusion", default=d("fusion"), choices=list(FUSIONS))
    ap.add_argument("--gate", default=d("gate"), choices=list(GATES))
    ap.add_argument("--balance", type=float, default=d("balance"), help="weight of the gate's load-balancing loss")
    ap.add_argument("--max-len", type=int, default=d("max_len"), help="tokens per text the encoders read (2-512)")
    ap.add_argument("--proj-dim", type=int, default=d("proj_dim"))
    ap.add_argument("--head-hidden", type=int, default=d("head_hidden"))
    ap.add_argument("--val-fraction", type=float, default=d("val_fraction"))
    ap.add_argument("--epochs", type=int, default=t("epochs"))
    ap.add_argument("--patience", type=int, default=t("patience"))
    ap.add_argument("--batch-size", type=int, default=t("batch_size"))
    ap.add_argument("--lr", type=float, default=t("lr"))
    ap.add_argument("--seed", type=int, default=d("seed"))
    a = lambda name: _default(AdaptSettings, name)  # noqa: E731
    ap.add_argument("--adapt", nargs="+", default=[], metavar="EXPERT",
                    help="encoders to train on the task before fusion (the rest stay frozen)")
    ap.add_argument("--adapt-method", default=a("method"), choices=["lora", "topk", "full"])
    ap.add_argument("--adapt-rank", type=int, default=a("rank"), help="LoRA rank")
    ap.add_argument("--adapt-top-k", type=int, default=a("top_k"), help="layers trained by --adapt-method topk")
    ap.add_argument("--adapt-epochs", type=int, default=a("epochs"))
    ap.add_argument("--adapt-lr", type=float, default=a("lr"))
    ap.add_argument("--adapt-max-len", type=int, default=a("max_len"), help="tokens per text while adapting")
    ap.add_argument("--head-tail", type=int, default=a("head_tail"),
                    help="keep a long text's first N and last (max-len - 2 - N) tokens while adapting")
    return ap


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:
        return 2 if e.code else 0
    args.argv = argv
    reserve_standard_fds()
    log = Log()
    try:
        run(args, log)
    except KeyboardInterrupt:
        say("interrupted: nothing was saved; the previous checkpoint at --out (if any) is untouched")
        return 130
    except (ValueError, TypeError, OSError) as e:  # DataError, CheckpointError and bad settings are ValueErrors
        if os.environ.get("MINISLM_DEBUG"):
            raise
        error(e)
        return 2
    except Exception as e:  # anything else: one line, no traceback (MINISLM_DEBUG=1 shows it)
        if os.environ.get("MINISLM_DEBUG"):
            raise
        error(f"{type(e).__name__}: {e}")
        return 1
    if log.lost:
        say(f"saved {args.out} (standard output {log.lost}, so the training log was not shown)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
