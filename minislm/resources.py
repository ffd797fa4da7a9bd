"""`python -m minislm.resources`: what serving each row of a team costs, the inference-resource table.

Rows: each member alone (the lexical expert; each encoder with its own head, `Team.predict_alone`), the last
tier's fused head over every expert, and the checkpoint's cascade (`Team.predict_proba`). For each row:
    parameters     the lexical expert's, the encoders' and every head the row can run, each counted once
    FLOPs / text   the team's analytic count on each text's real tokens (the ledger of its answers), mean
    latency        one text per call through the Python API, p50 and p95 over --texts test texts, warm
    throughput     docs/s over --throughput-texts test texts in classify's batches, median of --repeats
    peak RSS       the peak resident memory of the row's own process, after loading and at the end
Every row runs in a fresh process, so memory and warm caches never mix between rows. The CPU, cores, Numba
threads, load average and library versions are recorded beside, and CPU time that other processes took
during the run, so a number taken on a shared machine says so. Writes resources.json and resources.md.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

from minislm import data
from minislm.atomic import write_json, write_text
from minislm.bench import cpu_info
from minislm.classify import DEFAULT_MODEL, TABULAR, InputError, load_team
from minislm.classify import parser as classify_parser
from minislm.cli import Parser
from minislm.collab.optim import leaves
from minislm.encoder.folder import expected_shapes
from minislm.team.composition import Answer
from minislm.team.team import LEXICAL, short

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "notebooks" / "results"
BATCH = classify_parser().get_default("batch_size")  # throughput runs in the batches classify runs
WARMUP = 5               # texts served one by one (and one full batch) before anything is timed
SHARED_CORES = 0.25      # other processes busy on this many cores on average: the numbers are from a shared machine
SHARED_LOAD = 0.5        # ... or a 1-minute load average of this much per usable core when the run starts
INT8 = "int8:"  # a row served with the encoders on int8 weights (Team.use_int8), the same heads


def row_names(team):
    """Every row this team can serve: its members alone, the fused head, the cascade, and the encoders alone
    and the cascade again on int8 encoders."""
    rows = [f"single:{e}" for e in team.cfg.experts if e == LEXICAL or e in team.singles]
    rows += (["fused"] if team.tiers[-1] is not None else []) + ["cascade"]
    return rows + [INT8 + r for r in rows if r == "cascade" or (r.startswith("single:") and r != f"single:{LEXICAL}")]


def base_row(row):
    """"int8:single:L6" -> ("single:L6", True): the row's float32 form and whether it runs on int8 encoders."""
    return (row[len(INT8):], True) if row.startswith(INT8) else (row, False)


def pick_rows(team, asked):
    """--rows as typed (a row's name, or a member's name or short name: "L6") -> row names, or an InputError."""
    alias = {}
    for r in row_names(team):
        base, int8 = base_row(r)
        member = base.split(":", 1)[-1]
        prefix = INT8 if int8 else ""
        alias.update({r: r, prefix + member: r, prefix + short(member): r})
    bad = [a for a in asked if a not in alias]
    if bad:
        raise InputError(f"this team has no row {', '.join(bad)}; its rows: {', '.join(row_names(team))}")
    return list(dict.fromkeys(alias[a] for a in asked))


def label(row):
    """A row's name in the table: "L6 alone", "fused head", "cascade", "L6 alone (int8)"."""
    row, int8 = base_row(row)
    if int8:
        return label(row) + " (int8)"
    if row.startswith("single:"):
        return f"{short(row.split(':', 1)[1])} alone"
    return {"fused": "fused head"}.get(row, row)


def experts_of(team, row):
    """Experts a row can run, in tier order."""
    row, _ = base_row(row)
    if row == "cascade":
        return [team.cfg.experts[k] for k in team.composition.active]
    return team.alone_experts(row)


def serve(team, row):
    """-> texts [B] -> (probabilities [B, C], info): the row as a user serves it through the Python API."""
    row, int8 = base_row(row)
    team.use_int8(int8)
    if row == "cascade":
        return team.predict_proba
    return lambda texts: team.predict_alone(texts, row)


def parameters(team, row):
    """Weights the row can run: lexical expert, encoders, and the heads of its answers (each counted once)."""
    row, _ = base_row(row)
    size = lambda tree: sum(v.size for _, v in leaves(tree))  # noqa: E731
    parts = {e: size(team.lexical.params) if e == LEXICAL else
             sum(int(np.prod(s)) for s in expected_shapes(team.expert(e).config).values())
             for e in experts_of(team, row)}
    if row == "cascade":
        answers = {k: team.composition.answers[k] for k in team.composition.active}
    else:  # a model alone: the last tier's fused head, or a member's own
        answers = {len(team.tiers) - 1: Answer("fused", [])} if row == "fused" else {
            0: Answer("single", team.alone_experts(row))}
    for k, a in answers.items():
        for e in a.experts:  # a member's head, read by a "single" or a "stack" answer ("fused" lists none)
            if e != LEXICAL:
                parts[f"head:{e}"] = size(team.singles[e][1])
        if a.kind == "stack":
            parts[f"stack{k}"] = size(team.composition.stacks[k])
        if a.kind == "fused":
            parts[f"fused{k}"] = size(team.tiers[k][1])
    return int(sum(parts.values()))


def rss_mb():
    """Peak resident memory of this process so far, MB. VmHWM rather than ru_maxrss: Linux carries the parent's
    peak over fork and exec into ru_maxrss (a child of a 600 MB parent starts at 600), VmHWM is this process's."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024 / 1e6
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # kB where /proc is missing


def measure(model, row, texts, n_latency, n_throughput, repeats):
    """One row, in this (fresh) process -> dict of its numbers. texts: warm-up texts first, then the rest."""
    team = load_team(model)
    team.use_int8(base_row(row)[1])
    for e in experts_of(team, row):
        if e != LEXICAL:
            team.expert(e)  # load the weights now: the RSS after loading is the row's resident model
    loaded = rss_mb()
    run = serve(team, row)
    warm, rest = texts[:WARMUP], texts[WARMUP:]
    for t in warm:
        run([t])
    run(rest[:BATCH])
    seconds = []
    for t in rest[:n_latency]:
        t0 = time.perf_counter()
        run([t])
        seconds.append(time.perf_counter() - t0)
    batch_texts, rates, flops, exits = rest[:n_throughput], [], [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        for s in range(0, len(batch_texts), BATCH):
            _, info = run(batch_texts[s:s + BATCH])
            if r == 0:
                flops.append(info["flops"])
                exits.append(info.get("exit_tier", []))
        rates.append(len(batch_texts) / (time.perf_counter() - t0))
    experts = experts_of(team, row)
    out = {"row": row, "experts": experts, "short": [short(e) for e in experts], "parameters": parameters(team, row),
           "flops_per_text": float(np.concatenate(flops).mean()),
           "latency_ms_p50": 1000 * float(np.percentile(seconds, 50)),
           "latency_ms_p95": 1000 * float(np.percentile(seconds, 95)), "latency_texts": len(seconds),
           "docs_per_s": float(np.median(rates)), "throughput_texts": len(batch_texts), "repeats": repeats,
           "loaded_rss_mb": loaded, "peak_rss_mb": rss_mb(), "numba_threads": numba.get_num_threads()}
    out["precision"] = "int8" if base_row(row)[1] else "float32"
    if base_row(row)[0] == "cascade":
        tiers = np.concatenate(exits)
        out["exit_share"] = {str(k): float((tiers == k).mean()) for k in team.composition.active}
    return out


def in_fresh_process(args, texts_file, row):
    """One row measured in a new Python process of this minislm (same environment) -> its numbers."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    run = subprocess.run([sys.executable, "-m", "minislm.resources", *args, "--row", row, "--texts-file", texts_file],
                         capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"row {row} failed: {(run.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_texts(dataset, n):
    """n texts of a protocol's test split (or of a CSV / Parquet / JSONL file's text column), in a fixed
    random order, so every row reads the same texts -> (texts, where they come from)."""
    try:
        if Path(dataset).suffix.lower() in TABULAR:
            texts, source = data.read_column(dataset, "text"), f"the text column of {Path(dataset).name}"
        else:
            texts, source = data.protocol_splits(dataset)[1].texts, f"the {dataset} test split (its protocol)"
    except (data.DataError, FileNotFoundError) as e:
        raise InputError(str(e)) from e
    texts = [t for t in texts if t and t.strip()]
    order = np.random.default_rng(0).permutation(len(texts))
    return [texts[i] for i in order[:n]], source


def busy_seconds():
    """CPU seconds every process on the machine has run (user + system), from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def own_seconds():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def markdown(r):
    m = r["machine"]
    lines = [f"# Inference resources: {r['model']}", "",
             f"CPU: {m['cpu']['model']}, {m['cpu']['logical_cpus']} logical CPUs ({m['usable_cpus']} usable), "
             f"Numba threads {r['rows'][0]['numba_threads'] if r['rows'] else '?'}; numpy {m['numpy']}, "
             f"numba {m['numba']}, Python {m['python']}.",
             f"Load average (1 min) {m['load_start'][0]:.2f} at the start, {m['load_end'][0]:.2f} at the end; other "
             f"processes kept {m['other_busy_cores']:.2f} cores busy on average during the run.",
             f"Texts: {r['texts_source']}, {r['texts']} for latency (one per call, after {WARMUP} warm-up "
             f"calls), {r['throughput_texts']} for throughput (batches of {BATCH}, median of {r['repeats']}).",
             f"Command: `{r['command']}`", ""]
    if m["shared"]:
        lines += [f"**The machine was shared**: other processes kept {m['other_busy_cores']:.2f} of "
                  f"{m['usable_cpus']} cores busy (load average {m['load_start'][0]:.2f} at the start); every time "
                  f"here is slower, and less steady, than on a quiet machine.", ""]
    lines += ["| row | experts run | parameters (M) | MFLOPs / text | p50 ms | p95 ms | docs/s | RSS loaded MB "
              "| peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {label(x['row'])} | {', '.join(x['short'])} | {x['parameters'] / 1e6:.2f} "
                     f"| {x['flops_per_text'] / 1e6:.4g} | {x['latency_ms_p50']:.2f} | {x['latency_ms_p95']:.2f} "
                     f"| {x['docs_per_s']:.1f} | {x['loaded_rss_mb']:.0f} | {x['peak_rss_mb']:.0f} |")
    cascade = next((x for x in r["rows"] if x["row"] == "cascade"), None)
    if cascade:
        lines += ["", "Cascade exits (share of throughput texts per tier): " + ", ".join(
            f"tier {k} {v:.1%}" for k, v in cascade["exit_share"].items())]
    lines += ["", f"FLOPs: mean over the throughput texts, 1 multiply-add = 2 FLOPs. {r['int8']}."]
    return "\n".join(lines) + "\n"


def parser():
    ap = Parser(prog="python -m minislm.resources", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="team checkpoint folder (default: the shipped team)")
    ap.add_argument("--dataset", default="ag_news", help="protocol whose test texts are served, or a CSV / "
                                                         "Parquet / JSONL file with a text column")
    ap.add_argument("--texts", type=int, default=200, help="texts timed one by one for latency")
    ap.add_argument("--throughput-texts", type=int, default=1000, help="texts timed in batches for throughput")
    ap.add_argument("--repeats", type=int, default=3, help="throughput passes (the median is kept)")
    ap.add_argument("--rows", nargs="+", help="only these rows, e.g. lexical L6 fused cascade (default: every row)")
    ap.add_argument("--out-dir", default=str(OUT_DIR), help="where resources.json and resources.md go")
    ap.add_argument("--quick", action="store_true", help="tiny counts, to check the tool runs")
    ap.add_argument("--row", help=argparse.SUPPRESS)         # internal: one row's numbers, as JSON
    ap.add_argument("--texts-file", help=argparse.SUPPRESS)  # internal: the texts, as a JSON list
    return ap


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:
        return 2 if e.code else 0
    if args.quick:
        args.texts, args.throughput_texts, args.repeats = 5, 20, 1
    if min(args.texts, args.throughput_texts, args.repeats) < 1:
        print("error: --texts, --throughput-texts and --repeats must be at least 1", file=sys.stderr)
        return 2
    if args.row:  # a child: measure one row, print its JSON
        texts = json.loads(Path(args.texts_file).read_text(encoding="utf-8"))
        print(json.dumps(measure(args.model, args.row, texts, args.texts, args.throughput_texts, args.repeats)))
        return 0
    load_start, busy0, own0, t0 = os.getloadavg(), busy_seconds(), own_seconds(), time.time()
    try:
        team = load_team(args.model)  # fetches missing encoders here, once, not in every row's process
        rows = pick_rows(team, args.rows) if args.rows else row_names(team)
        texts, source = test_texts(args.dataset, WARMUP + max(args.texts, args.throughput_texts, BATCH))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(texts) < WARMUP + 1:
        print(f"error: {args.dataset} has {len(texts)} usable texts; give at least {WARMUP + 1}", file=sys.stderr)
        return 2
    child = ["--model", args.model, "--texts", str(args.texts), "--throughput-texts", str(args.throughput_texts),
             "--repeats", str(args.repeats)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        texts_file = os.path.join(tmp, "texts.json")
        Path(texts_file).write_text(json.dumps(texts), encoding="utf-8")
        try:
            # a throwaway first process fills Numba's on-disk cache, so no row's memory includes compiling
            in_fresh_process(["--model", args.model, "--texts", "1", "--throughput-texts", "1", "--repeats", "1"],
                             texts_file, "fused" if "fused" in row_names(team) else "cascade")
            for row in rows:
                print(f"{row} (a fresh process)", file=sys.stderr, flush=True)
                results.append(in_fresh_process(child, texts_file, row))
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    other = max(0.0, (busy_seconds() - busy0) - (own_seconds() - own0)) / max(time.time() - t0, 1e-9)
    usable = len(os.sched_getaffinity(0))
    machine = {"cpu": cpu_info(), "usable_cpus": usable, "load_start": list(load_start),
               "load_end": list(os.getloadavg()), "other_busy_cores": other,
               "shared": bool(other >= SHARED_CORES or load_start[0] >= SHARED_LOAD * usable),
               "numpy": np.__version__, "numba": numba.__version__, "python": platform.python_version()}
    result = {"command": "python -m minislm.resources " + " ".join(argv), "model": args.model,
              "dataset": args.dataset, "texts_source": source, "texts": results[0]["latency_texts"],
              "throughput_texts": results[0]["throughput_texts"], "repeats": args.repeats,
              "machine": machine,
              "int8": "rows named int8:...: the same heads reading encoders whose linears run on int8 weights "
                      "(per-channel 7-bit weights, per-row 8-bit activations; Team.use_int8)", "rows": results}
    table = markdown(result)
    print(table)
    write_json(Path(args.out_dir) / "resources.json", result)
    write_text(Path(args.out_dir) / "resources.md", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
