"""`python -m minislm.experiments {ag_news,imdb,dbpedia_14,ag_news-1k,imdb-1k,all}`: the results tables.

Each protocol (minislm.data.PROTOCOLS) runs every row over --seeds (default 0 1 2) and writes
notebooks/results/<protocol>.json, a Markdown table and a PNG beside it. Every finished seed is kept in
cache/experiments/<protocol>/seed-<s>.json, so an interrupted run resumes at the first unfinished seed
(--fresh starts over). --quick trains every head for 3 epochs on one seed: a smoke run, not for results.
--int8 adds the rows of kind "int8" (each encoder's single row and the checkpoint's cascade on int8 encoders);
its seeds resume from their own folder, cache/experiments/<protocol>-int8/, as a finished seed keeps no team
to score again.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from minislm import data
from minislm.atomic import write_json, write_text
from minislm.experiments import aggregate, seed_run

REPO = Path(__file__).resolve().parent.parent.parent
PROTOCOLS = ("ag_news", "imdb", "dbpedia_14", "ag_news-1k", "imdb-1k")


def seed_file(protocol, seed, quick, experts=None, int8=False):
    tag = ("" if not experts else "-" + "-".join(Path(e).name for e in experts)) + ("-int8" if int8 else "")
    return REPO / "cache" / "experiments" / f"{protocol}{'-quick' if quick else ''}{tag}" / f"seed-{seed}.json"


def run_protocol(protocol, seeds, out_dir, data_dir=None, quick=False, fresh=False, save_model=None,
                 search_trials=6, experts=None, log=print, int8=False):
    t0 = time.time()
    train, test = data.protocol_splits(protocol, data_dir)
    results = []
    for i, seed in enumerate(seeds):
        f = seed_file(protocol, seed, quick, experts, int8)
        if f.exists() and not fresh and not (save_model and i == 0):
            log(f"{protocol} seed {seed}: done before ({f})")
            results.append(json.loads(f.read_text(encoding="utf-8")))
            continue
        log(f"{protocol} seed {seed}")
        res, team = seed_run.run_seed(protocol, train, test, seed, quick=quick, log=log,
                                      search_trials=search_trials if i == 0 and not quick else 0, int8=int8,
                                      **({"experts": list(experts)} if experts else {}))
        if save_model and i == 0:
            team.save(save_model, command=f"python -m minislm.experiments {protocol} --save-model {save_model}")
            log(f"saved {save_model}")
        write_json(f, res)
        results.append(res)
        write_results(protocol, train, test, results, out_dir, quick, t0, experts, int8)  # partial results land too
    return write_results(protocol, train, test, results, out_dir, quick, t0, experts, int8)


def write_results(protocol, train, test, results, out_dir, quick, t0, experts=None, int8=False):
    """Aggregate the seeds done so far into notebooks/results/<protocol>.{json,md,png}."""
    rows, preds = aggregate.combine(results)
    y = np.asarray(test.labels)
    result = {
        "protocol": dict(train.protocol), "seeds": [r["seed"] for r in results],
        "command": f"python -m minislm.experiments {protocol}" + (" --quick" if quick else "")
                   + (f" --experts {' '.join(experts)}" if experts else "") + (" --int8" if int8 else ""),
        "seeds_planned_note": "seeds listed are those finished; a run resumes at the next one",
        "rows": rows, "selected": aggregate.select(rows, preds, y), "ablations": aggregate.ablations(rows, preds, y),
        "composition_by_seed": [r["composition"] for r in results], "search": results[0].get("search", []),
        "validation_by_seed": [r["validation"] for r in results],
        "seconds": round(sum(r["seconds"] for r in results), 1), "wall_seconds_this_call": round(time.time() - t0, 1),
    }
    stem = out_dir / (protocol + ("-quick" if quick else "") + ("-int8" if int8 else ""))
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
    ap.add_argument("--int8", action="store_true", help="also the rows of kind int8: the single encoders and the "
                                                        "checkpoint's cascade on int8 encoders")
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return 2 if e.code else 0
    if args.quick:
        args.seeds = args.seeds[:1]
    protocols = PROTOCOLS if args.protocol == "all" else (args.protocol,)
    t0 = time.time()
    for p in protocols:
        result = run_protocol(p, args.seeds, Path(args.out_dir), args.data_dir, args.quick, args.fresh,
                              args.save_model if len(protocols) == 1 else None, args.search_trials, args.experts,
                              int8=args.int8)
        sel = result["selected"]
        print(f"{p}: best single {sel['best_single']}, best team {sel['best_team']} "
              f"({sel['difference_points']:+.2f} points, McNemar p = {sel['mcnemar_p']:.3g})")
    print(f"all done in {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
