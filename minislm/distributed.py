"""Corpus-scale classification and feature extraction with Ray Data (the optional `distributed` extra; nothing
else in minislm imports ray).

    ray.data.read_parquet(input) --blocks--> map_batches(TeamPredictor, concurrency=workers) --> Parquet
                                             one actor per worker: the team loaded once, Numba's threads = its CPUs

Each actor loads the team once and answers batch after batch, so the start-up cost (loading the checkpoint
and the encoders, warming Numba's cached kernels) is paid once per worker, not per batch. The answer columns
are those of minislm.stream (label, confidence, exit_tier, flops, p_<label>, note; the id column first when
named), so a file classified here and one classified by `classify_file` on one machine can be compared row by
row. Order is kept (DataContext.execution_options.preserve_order), and a batch that fails stops the job with a
BatchError naming the batch and its cause: no row is silently dropped and no partial output is left behind.

    from minislm.distributed import classify_ray
    classify_ray("big.parquet", "answers.parquet", "weights/ag_news", id_column="id", workers=2)
    classify_ray(..., address="ray://head:10001")   # an existing cluster (minislm installed on its nodes)
"""
import math
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np

from minislm.atomic import atomic_path
from minislm.stream import StreamError, _cell_text, check_id_column, classify_texts, prepare

EXTRA = "distributed"
INSTALL = f"pip install 'minislm[{EXTRA}]' (or: pip install 'ray[data]')"


class DistributedError(StreamError):
    """A distributed run that cannot start or finish as asked; the message names the remedy."""


class BatchError(DistributedError):
    """A batch whose rows could not be answered: the whole job stops rather than lose its rows."""


def require_ray():
    """-> the ray module, or a DistributedError naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise DistributedError(f"Ray is not installed ({e}); install the {EXTRA!r} extra: {INSTALL}") from e
    return ray


def assigned_cpus(default=1):
    """Whole CPUs Ray assigned to the calling actor (at least 1); `default` outside Ray."""
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # not inside a Ray worker
        cpus = None
    return max(1, int(cpus if cpus is not None else default))


def set_threads(n):
    """Numba's kernel threads for this process: n, within what Numba was started with -> the number set."""
    import numba

    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


def _batch_label(batch, id_column):
    n = batch.num_rows
    if id_column and n:
        col = batch.column(id_column)
        return f"batch of {n} rows (ids {col[0].as_py()!r} .. {col[n - 1].as_py()!r})"
    return f"batch of {n} rows"


class TeamPredictor:
    """A callable class for `Dataset.map_batches(TeamPredictor, fn_constructor_kwargs={"model": path, ...},
    batch_format="pyarrow")`: a pyarrow.Table of B input rows -> a pyarrow.Table of B answer rows.

    The team is loaded once per actor, and Numba runs on the CPUs Ray gave the actor (its num_cpus)."""

    def __init__(self, model, text_column="text", id_column=None, max_tier=None, max_flops=None):
        from minislm.team import Team

        t0 = time.perf_counter()
        self.threads = set_threads(assigned_cpus())
        self.team = Team.load(model)
        check_id_column(id_column, self.team.cfg.label_names)
        # pay the start-up here, once: load every encoder and Numba's kernels by one text through every tier
        self.team.predict_proba(["start"], thresholds=[1.01] * (len(self.team.cfg.experts) - 1))
        self.text_column, self.id_column = text_column, id_column
        self.max_tier, self.max_flops = max_tier, max_flops
        self.start_seconds = time.perf_counter() - t0

    def answer(self, batch):
        """pyarrow.Table [B rows] -> pyarrow.Table [B answer rows]."""
        texts = [_cell_text(v) for v in batch.column(self.text_column).to_pylist()]
        ids = batch.column(self.id_column).combine_chunks() if self.id_column else None
        table, _ = classify_texts(self.team, texts, ids, self.id_column, self.max_tier, self.max_flops)
        return table

    def __call__(self, batch):
        try:
            return self.answer(batch)
        except Exception as e:
            raise BatchError(f"{_batch_label(batch, self.id_column)} failed: {type(e).__name__}: {e}") from e


class EmbedPredictor:
    """A callable class for map_batches: pyarrow.Table [B rows] -> pyarrow.Table [B rows] of (id,) `embedding`
    (the expert's masked mean of its last layer, [H] float32; null for an empty text) and `note`."""

    def __init__(self, expert, text_column="text", id_column=None, max_len=None):
        from minislm.experts.load import load_expert

        t0 = time.perf_counter()
        self.threads = set_threads(assigned_cpus())
        self.expert = load_expert(expert)
        self.text_column, self.id_column, self.max_len = text_column, id_column, max_len
        self.start_seconds = time.perf_counter() - t0

    def answer(self, batch):
        import pyarrow as pa

        clean, notes = prepare([_cell_text(v) for v in batch.column(self.text_column).to_pylist()])
        keep = [i for i, t in enumerate(clean) if t is not None]
        H, B = self.expert.config.hidden, len(clean)
        vectors = np.zeros((B, H), dtype=np.float32)
        if keep:
            vectors[keep] = self.expert.embed([clean[i] for i in keep], max_len=self.max_len)
        mask = np.ones(B, dtype=bool)
        mask[keep] = False
        emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), H, mask=pa.array(mask))
        cols = {self.id_column: batch.column(self.id_column).combine_chunks()} if self.id_column else {}
        cols.update(embedding=emb, note=pa.array(notes, type=pa.string()))
        return pa.table(cols)

    def __call__(self, batch):
        try:
            return self.answer(batch)
        except Exception as e:
            raise BatchError(f"{_batch_label(batch, self.id_column)} failed: {type(e).__name__}: {e}") from e


# ---- running a job ---------------------------------------------------------------------------------------
READ_CPUS = 1   # Ray Data's file listing and reading tasks each hold one CPU slot while they run


def connect(address=None, num_cpus=None):
    """Join the cluster at `address`, or start a local Ray instance for num_cpus cores of workers (default:
    this machine's cores); an instance already running in this process is reused. -> the ray module.

    A local instance gets READ_CPUS logical CPU beyond num_cpus: Ray Data schedules the input's listing and
    reading as tasks needing a CPU slot, and with every slot held by a predictor actor they would never run
    (the job would hang). They are I/O, so the extra slot does not oversubscribe the cores in practice."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    if address:
        ray.init(address=address, ignore_reinit_error=True)
        return ray
    # local workers must import this very minislm (not another installed copy): put it first on their path
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=(num_cpus or os.cpu_count()) + READ_CPUS, include_dashboard=False, ignore_reinit_error=True,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    return ray


def _find(exc, cls):
    """The first exception of type cls in exc's chain (Ray wraps a worker's error in its own types)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, cls):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


def _first_line(exc):
    """The worker's BatchError message out of Ray's text of the remote traceback, else its first line."""
    text = str(exc).strip()
    found = re.search(r"^\S*BatchError: (.+)$", text, flags=re.MULTILINE)
    if found:
        return found.group(1).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_input(input_parquet, columns):
    import pyarrow.parquet as pq

    p = Path(input_parquet)
    if not p.exists():
        raise DistributedError(f"{p} does not exist; check the path")
    files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
    if not files or any(f.suffix.lower() != ".parquet" for f in files):
        raise DistributedError(f"{p}: the distributed path reads Parquet only; convert the file, or use "
                               f"minislm.stream for CSV / JSONL")
    names = pq.read_schema(files[0]).names
    for c in columns:
        if c is not None and c not in names:
            raise DistributedError(f"{files[0]}: no column {c!r} (columns: {', '.join(names)}); name the right one")
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def _write(ds, output):
    """Write a Dataset: a single .parquet file (rows streamed through this process, in order, written
    atomically), or a folder of Parquet files written by the workers (renamed into place when complete).
    -> rows written."""
    import pyarrow.parquet as pq

    out = Path(output)
    if out.suffix.lower() == ".parquet":
        rows, writer = 0, None
        with atomic_path(out) as tmp:
            try:
                for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, batch.schema)
                    writer.write_table(batch)
                    rows += batch.num_rows
            finally:
                if writer is not None:
                    writer.close()
            if writer is None:
                raise DistributedError(f"the input has no rows: nothing written to {out}")
        return rows
    if out.exists() and any(out.iterdir()):
        raise DistributedError(f"{out} already exists and is not empty; remove it or name another folder")
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ds.write_parquet(str(tmp))
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in tmp.glob("*.parquet"))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _run(input_parquet, output, predictor, kwargs, columns, address, workers, cpus_per_worker, batch_size,
         num_cpus):
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise DistributedError(f"workers must be a whole number, at least 1, got {workers!r}")
    rows_in = _check_input(input_parquet, columns)
    ray = connect(address, num_cpus)
    total = ray.cluster_resources().get("CPU", 0)
    if workers * cpus_per_worker + READ_CPUS > total:
        raise DistributedError(f"{workers} workers x {cpus_per_worker} CPUs leave none of the cluster's {total:g} "
                               f"CPUs for reading the input (the job would wait forever); use at most "
                               f"{max(1, int((total - READ_CPUS) // cpus_per_worker))} workers")
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # answers in input order
    t0 = time.perf_counter()
    try:
        blocks = max(4 * workers, math.ceil(rows_in / 8192))  # enough blocks that every worker gets some
        ds = ray.data.read_parquet(str(input_parquet), override_num_blocks=min(rows_in, blocks) or None)
        ds = ds.select_columns(list(dict.fromkeys(c for c in columns if c)))
        out = ds.map_batches(predictor, fn_constructor_kwargs=kwargs, batch_format="pyarrow",
                             batch_size=batch_size, concurrency=workers, num_cpus=cpus_per_worker)
        rows = _write(out, output)
    except DistributedError:
        raise
    except Exception as e:  # a worker's error arrives wrapped in Ray's own types
        cause = _find(e, BatchError)
        raise BatchError(f"{str(cause) if cause else _first_line(e)}; nothing was written to {output}") from e
    seconds = time.perf_counter() - t0
    return {"rows": rows, "seconds": seconds, "docs_per_s": rows / seconds, "workers": workers,
            "output": str(output)}


def classify_ray(input_parquet, output, model, text_column="text", id_column=None, address=None, workers=1,
                 cpus_per_worker=1, batch_size=256, max_tier=None, max_flops=None, num_cpus=None,
                 predictor=TeamPredictor):
    """Classify a Parquet file (or folder of them) with `workers` actors, each holding the team in `model`.

    output: a .parquet file (one file, rows in input order) or a folder (Parquet files written by the
    workers). address: a Ray cluster to join; None starts a local instance with num_cpus (default: all cores).
    predictor: the callable class run per actor (TeamPredictor, or a subclass).
    -> summary dict: rows, seconds, docs_per_s, workers, output. A failed batch raises BatchError."""
    kwargs = {"model": str(model), "text_column": text_column, "id_column": id_column, "max_tier": max_tier,
              "max_flops": max_flops}
    return _run(input_parquet, output, predictor, kwargs, (text_column, id_column), address, workers,
                cpus_per_worker, batch_size, num_cpus)


def extract_ray(input_parquet, output, expert, text_column="text", id_column=None, address=None, workers=1,
                cpus_per_worker=1, batch_size=256, max_len=None, num_cpus=None):
    """Pooled sentence embeddings of a Parquet file: per row the expert's masked mean of its last layer ([H]
    float32 in an `embedding` column; `expert` is a registry name or a model folder). Output as classify_ray."""
    kwargs = {"expert": str(expert), "text_column": text_column, "id_column": id_column, "max_len": max_len}
    return _run(input_parquet, output, EmbedPredictor, kwargs, (text_column, id_column), address, workers,
                cpus_per_worker, batch_size, num_cpus)


def actor_start_seconds(model, address=None, num_cpus=None):
    """Seconds one fresh actor takes to be ready, measured from the driver (total_seconds: a Ray worker process
    started and the constructor run) and inside it (team_load_seconds: the team and every encoder loaded, one
    text through every tier so Numba's kernels are loaded from the cache)."""
    ray = connect(address, num_cpus)

    @ray.remote(num_cpus=1)
    class _Probe(TeamPredictor):
        def ready(self):
            return self.start_seconds

    t0 = time.perf_counter()
    actor = _Probe.remote(str(model))
    load = ray.get(actor.ready.remote())
    total = time.perf_counter() - t0
    ray.kill(actor)
    return {"total_seconds": total, "team_load_seconds": load}
