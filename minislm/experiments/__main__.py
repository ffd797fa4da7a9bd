"""`python -m minislm.experiments {ag_news,imdb,dbpedia_14,ag_news-1k,imdb-1k,all}`: the results tables.

Each protocol (minislm.data.PROTOCOLS) runs every row over --seeds (default 0 1 2) and writes
notebooks/results/<protocol>.json, a Markdown table and a PNG beside it. Each finished unit of a seed (every
adaptation of an expert, then the seed's team training and rows; see units.py) is a file in
cache/experiments/<run>/, so a rerun of the same command skips the finished units, one log line each, and
rebuilds the results files from the seed units (--fresh starts over). --quick trains every head for 3 epochs
on one seed: a smoke run, not for results.
--int8 adds the rows of kind "int8" (each encoder's single row and the checkpoint's cascade on int8 encoders);
its seeds resume from their own folder, cache/experiments/<protocol>-int8/, as a finished seed keeps no team
to score again.
"""
import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np

from minislm import data
from minislm.atomic import write_json, write_text
from minislm.experiments import aggregate, guide, seed_run, summary, units
from minislm.team.adaptation import AdaptSettings

REPO = Path(__file__).resolve().parent.parent.parent
PROTOCOLS = ("ag_news", "imdb", "dbpedia_14", "ag_news-1k", "imdb-1k")


def run_dir(protocol, quick, experts=None, adapt=None, int8=False, crossfit_below=None):
    """cache/experiments/<protocol>[-quick][-<experts>][-crossfit-below-N][-adapt-<label>...][-int8]: one run's
    finished seeds."""
    tag = "" if not experts else "-" + "-".join(Path(e).name for e in experts)
    tag += f"-crossfit-below-{crossfit_below}" if crossfit_below is not None else ""
    if adapt:
        tag += "-adapt-" + "-".join(f"{units.adapt_tag(s)}-{Path(e).name}" for e, s in adapt.items())
    tag += "-int8" if int8 else ""
    return REPO / "cache" / "experiments" / f"{protocol}{'-quick' if quick else ''}{tag}"


def seed_file(protocol, seed, quick, experts=None, adapt=None, int8=False, crossfit_below=None):
    return units.seed_unit(run_dir(protocol, quick, experts, adapt, int8, crossfit_below), seed)


def finished_seeds(folder):
    """Every seed unit (the team and its rows) in a run's folder, by seed."""
    files = [f for f in folder.glob("seed-*.json") if re.fullmatch(r"seed-\d+", f.stem)] if folder.is_dir() else []
    files.sort(key=lambda f: int(f.stem.split("-")[1]))
    return [r for r in map(units.read_seed, files) if r is not None]


def run_protocol(protocol, seeds, out_dir, data_dir=None, quick=False, fresh=False, save_model=None,
                 search_trials=6, experts=None, log=print, adapt=None, int8=False, crossfit_below=None):
    t0 = time.time()
    train, test = data.protocol_splits(protocol, data_dir)
    config = {**({"experts": list(experts)} if experts else {}), **({"adapt": adapt} if adapt else {}),
              **({"crossfit_below": crossfit_below} if crossfit_below is not None else {})}
    folder = run_dir(protocol, quick, experts, adapt, int8, crossfit_below)
    for i, seed in enumerate(seeds):
        f = seed_file(protocol, seed, quick, experts, adapt, int8, crossfit_below)
        if not fresh and not (save_model and i == 0) and units.read_seed(f, log) is not None:
            for u in [*units.finished_adapt_units(folder, seed), f]:
                log(units.skipped(u))
            continue
        log(f"{protocol} seed {seed}")
        res, team = seed_run.run_seed(protocol, train, test, seed, quick=quick, log=log,
                                      search_trials=search_trials if i == 0 and not quick and not adapt and not int8
                                      else 0, int8=int8, units_dir=folder, fresh=fresh, **config)
        if save_model and i == 0:
            team.save(save_model, command=f"python -m minislm.experiments {protocol} --save-model {save_model}")
            log(f"saved {save_model}")
        res["command"] = command(protocol, quick, experts, adapt, int8, crossfit_below)
        write_json(f, res)
        write_results(protocol, train, test, out_dir, quick, t0, experts, crossfit_below)  # partial results land too
    return write_results(protocol, train, test, out_dir, quick, t0, experts, crossfit_below)


def command(protocol, quick, experts, adapt=None, int8=False, crossfit_below=None):
    cmd = f"python -m minislm.experiments {protocol}" + (" --quick" if quick else "") + (" --int8" if int8 else "")
    cmd += f" --experts {' '.join(experts)}" if experts else ""
    cmd += f" --crossfit-below {crossfit_below}" if crossfit_below is not None else ""
    if adapt:  # the command line gives every adapted expert the same settings
        s = next(iter(adapt.values()))
        cmd += (f" --adapt {' '.join(adapt)} --adapt-method {s.method} --adapt-rank {s.rank} --adapt-top-k {s.top_k} "
                f"--adapt-lr {s.lr} --adapt-epochs {s.epochs} --adapt-max-len {s.max_len}")
    return cmd


def companion_runs(protocol, quick, experts, crossfit_below=None):
    """-> [(folder, seed results)] of every run of this protocol and team with adapted experts or --int8."""
    base = run_dir(protocol, quick, experts, crossfit_below=crossfit_below)
    folders = sorted([*base.parent.glob(base.name + "-adapt-*"), *base.parent.glob(base.name + "-int8")])
    runs = [(f, finished_seeds(f)) for f in folders]
    return [(f, seeds) for f, seeds in runs if seeds]


def write_results(protocol, train, test, out_dir, quick, t0, experts=None, crossfit_below=None):
    """Aggregate the finished seeds of the frozen run and of its companion runs (adapted experts, --int8) into
    notebooks/results/<protocol>.{json,md,png}. An adapted run adds its rows of kind `adapted` and every team
    row that reads an adapted member, an int8 run its rows of kind `int8` (their other rows repeat the frozen
    run's)."""
    results = finished_seeds(run_dir(protocol, quick, experts, crossfit_below=crossfit_below))
    rows, preds = aggregate.combine(results) if results else ([], {})
    runs, companions = [], companion_runs(protocol, quick, experts, crossfit_below)
    for folder, seeds in companions:
        a_rows, a_preds = aggregate.combine(seeds)
        labels = {r["name"].split("/", 1)[0] + "-" + seed_run.short(r["expert"]) for r in a_rows
                  if r["kind"] == "adapted"}
        new = [r for r in a_rows if r["kind"] in ("adapted", "int8") or any(lab in r["name"] for lab in labels)
               or not results]
        rows += new
        preds.update({r["name"]: a_preds[r["name"]] for r in new})
        runs.append({"run": folder.name, "seeds": [s["seed"] for s in seeds], "rows": [r["name"] for r in new],
                     "command": seeds[0].get("command"), "seconds": round(sum(s["seconds"] for s in seeds), 1)})
    if not results:  # only companion runs so far: the first one stands in for the run's own records
        results = companions[0][1]
    y = np.asarray(test.labels)
    result = {
        "protocol": dict(train.protocol), "seeds": [r["seed"] for r in results],
        "command": command(protocol, quick, experts, crossfit_below=crossfit_below),
        "seeds_planned_note": "seeds listed are those finished; a run resumes at the next one",
        "adapted_runs": runs,
        "rows": rows, "selected": aggregate.select(rows, preds, y), "ablations": aggregate.ablations(rows, preds, y),
        "composition_by_seed": [r["composition"] for r in results], "search": results[0].get("search", []),
        "validation_by_seed": [r["validation"] for r in results],
        "seconds": round(sum(r["seconds"] for r in results), 1), "wall_seconds_this_call": round(time.time() - t0, 1),
    }
    stem = out_dir / (protocol + ("-quick" if quick else ""))
    write_json(stem.with_suffix(".json"), result)
    write_text(stem.with_suffix(".md"), aggregate.markdown(result))
    aggregate.plot(result, stem.with_suffix(".png"))
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minislm.experiments", description=__doc__.splitlines()[0])
    ap.add_argument("protocol", choices=[*PROTOCOLS, "all"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out-dir", default=str(REPO / "notebooks" / "results"))
    ap.add_argument("--data-dir", help="folder holding <dataset>/{split}.parquet (default: $MINISLM_DATA_DIR, ...)")
    ap.add_argument("--quick", action="store_true", help="one seed, 3 epochs per head: a smoke run, not for results")
    ap.add_argument("--fresh", action="store_true", help="ignore finished seeds and start over")
    ap.add_argument("--search-trials", type=int, default=6, help="random-search trials on the first seed (0 = none)")
    ap.add_argument("--save-model", help="also save the first seed's team (a checkpoint folder) here")
    ap.add_argument("--experts", nargs="+", help="the team's tiers (default: lexical and the three encoders)")
    a = lambda f: getattr(AdaptSettings, f)  # noqa: E731  (defaults read from the config tree)
    ap.add_argument("--adapt", nargs="+", default=[], metavar="EXPERT",
                    help="encoders adapted to the task before fusion; their rows join the frozen run's")
    ap.add_argument("--adapt-method", default=a("method"), choices=["lora", "topk", "full"])
    ap.add_argument("--adapt-rank", type=int, default=a("rank"))
    ap.add_argument("--adapt-top-k", type=int, default=a("top_k"))
    ap.add_argument("--adapt-lr", type=float, default=a("lr"))
    ap.add_argument("--adapt-epochs", type=int, default=a("epochs"))
    ap.add_argument("--adapt-max-len", type=int, default=a("max_len"))
    ap.add_argument("--crossfit-below", type=int, help="cross-fit every choice below this many training rows "
                                                          "(default: the team config's, 4000)")
    ap.add_argument("--int8", action="store_true", help="a companion run adding rows of kind int8: the single "
                                                        "encoders and the checkpoint's cascade on int8 encoders")
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return 2 if e.code else 0
    if args.quick:
        args.seeds = args.seeds[:1]
    protocols = PROTOCOLS if args.protocol == "all" else (args.protocol,)
    try:
        adapt = {e: AdaptSettings(method=args.adapt_method, rank=args.adapt_rank, top_k=args.adapt_top_k,
                                  lr=args.adapt_lr, epochs=args.adapt_epochs, max_len=args.adapt_max_len)
                 for e in args.adapt}
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        print(f"error: --data-dir {args.data_dir} is not a folder; name the folder holding <dataset>/{{split}}.parquet "
              f"and labels.json, or leave it out to use $MINISLM_DATA_DIR, data/ or ../shared/data", file=sys.stderr)
        return 2
    t0 = time.time()
    for p in protocols:
        try:
            result = run_protocol(p, args.seeds, Path(args.out_dir), args.data_dir, args.quick, args.fresh,
                                  args.save_model if len(protocols) == 1 else None, args.search_trials, args.experts,
                                  adapt=adapt or None, int8=args.int8, crossfit_below=args.crossfit_below)
        except data.DataError as e:  # a dataset neither in --data-dir (or the usual places) nor on the hub
            print(f"error: {e}" if "; " in str(e) else f"error: {e}; check --data-dir", file=sys.stderr)
            return 2
        sel = result["selected"]
        print(f"{p}: best single {sel['best_single']}, best team {sel['best_team']} "
              f"({sel['difference_points']:+.2f} points, McNemar p = {sel['mcnemar_p']:.3g})")
    guide.write(Path(args.out_dir))  # the fusion guide and the summary read every protocol's file
    write_text(Path(args.out_dir) / "summary.md", summary.table(Path(args.out_dir)))
    print(f"all done in {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
