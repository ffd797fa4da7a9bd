"""Corpus-scale classification on one machine: a CSV / Parquet / JSONL file in, one answer row per input row out,
in constant memory, resumable after an interruption.

    input rows --chunk_size at a time--> team.predict_proba --> <out>.parts/part-000000.parquet, part-000001 ...
                                                                 + manifest.json (input sha256, settings, chunks)
    every chunk done --> parts concatenated, in order, into <out> (.parquet, .csv or .jsonl) --> parts removed

The input is read lazily (Parquet by record batches, CSV row by row with every cell as text, JSONL line by
line), so memory holds one chunk whatever the file's size. Each part and the manifest are written atomically
(write beside, then rename), so an interrupted run leaves only whole parts; running the same command again
resumes after the last part the manifest lists. The manifest keys the work to the input's full sha256 and to
the settings: a changed input or changed settings is refused (restart=True starts over), never mixed in.

Why a full sha256 and not size + mtime + a sample: a sample misses an edit in the middle of the file, and mtime
changes on a mere copy. Hashing reads at disk speed (about a second per GB), while classifying that GB takes
hours, so the full hash is the honest identity at a negligible cost. For the same reason the input must be a
regular file: a pipe can be read only once.

The output is checked before any work (a known type, not a folder, in a writable folder) and never replaces a
file that is already there unless overwrite=True (--overwrite) or it is this work's own output being resumed.
The run holds the output's lock (atomic.exclusive: .<name>.lock beside it), so a second run on the same output
is refused at once instead of mixing its parts into the first one's.

Output columns, one row per input row, in input order:
    <id_column>   the input's id, when one is named (its Parquet type kept; CSV cells stay text)
    label         the answer ("" when the text is empty)
    confidence    the answer's probability (null when empty)
    exit_tier     the tier that answered, 0 = lexical (null when empty)
    flops         FLOPs spent on the row (null when empty)
    p_<label>     the probability of each of the C classes (null when empty)
    note          why a row was not classified or was cut; "" otherwise
"""
import csv
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from minislm.atomic import LockedError, atomic_path, exclusive, unwritable, write_json
from minislm.cli import printable

FORMATS = (".parquet", ".csv", ".jsonl")
MAX_TEXT_CHARS = 100_000   # longer texts are cut here, as in classify (the encoders read max_len tokens anyway)
MANIFEST_VERSION = 1
EMPTY_NOTE = "empty text: nothing to classify"
RESULT_COLUMNS = ("label", "confidence", "exit_tier", "flops", "note")


class StreamError(ValueError):
    """An input, output or setting the stream cannot use; the message names the problem and the remedy."""


class ResumeError(StreamError):
    """Work already started on another input or with other settings: refused rather than mixed."""


@dataclass
class StreamSettings:
    text_column: str = "text"        # column (CSV header, Parquet field, JSONL key) holding the texts
    id_column: str | None = None     # column copied to the output beside each answer (None: no id)
    chunk_size: int = 1000           # rows per part file: the unit of memory, of progress and of resume
    max_tier: int | None = None      # run at most this tier (0 = lexical only); None: the whole cascade
    max_flops: float | None = None   # FLOP budget per text; None: no budget

    def check(self):
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise StreamError(f"chunk_size must be a whole number of rows, at least 1, got {self.chunk_size!r}")
        if self.max_flops is not None and not (math.isfinite(self.max_flops) and self.max_flops > 0):
            raise StreamError(f"max_flops must be a positive number of FLOPs per text, got {self.max_flops!r}")
        return self


# ---- reading, lazily -------------------------------------------------------------------------------------
def file_format(path, what="input"):
    """.parquet / .csv / .jsonl of a path, or a StreamError naming the formats known."""
    ext = Path(path).suffix.lower()
    if ext not in FORMATS:
        raise StreamError(f"{path}: unknown {what} type {ext or '(no extension)'!r}; use .parquet, .csv or .jsonl")
    return ext


def _cell_text(v):
    """A cell as text, None when it is missing (a float NaN included: pandas writes missing values so)."""
    if v is None or (isinstance(v, float) and v != v):
        return None
    return v if isinstance(v, str) else str(v)


def _missing(path, column, columns, role):
    flag = "--column" if role == "text" else "--id-column"
    return StreamError(f"{path}: no {role} column {column!r} (columns: {', '.join(map(str, columns)) or 'none'}); "
                       f"name the right one with {flag}")


def _parquet_rows(path, cols, skip):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends: the user needs the file's problem
        raise StreamError(f"{path} could not be read as Parquet ({str(e).splitlines()[0][:160]}); "
                          f"check the file's format") from e
    names = pf.schema_arrow.names
    for role, c in zip(("text", "id"), cols):
        if c is not None and c not in names:
            raise _missing(path, c, names, role)
    wanted = list(dict.fromkeys(c for c in cols if c is not None))
    groups, first = list(range(pf.metadata.num_row_groups)), 0
    while groups and first + pf.metadata.row_group(groups[0]).num_rows <= skip:  # skip whole groups unread
        first += pf.metadata.row_group(groups.pop(0)).num_rows
    skip -= first
    for batch in pf.iter_batches(batch_size=4096, row_groups=groups, columns=wanted):
        values = [batch.column(c).to_pylist() if c is not None else None for c in cols]
        texts, ids = values
        for i in range(skip, batch.num_rows):
            yield texts[i], (ids[i] if ids is not None else None)
        skip = max(0, skip - batch.num_rows)


_UNDECODED = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of a byte that is not UTF-8


def _csv_rows(path, cols, skip):
    # surrogateescape, then a check per row: a bad byte is reported at its own row, after every row before it
    # was yielded (strict decoding fails a whole read-ahead buffer early, at a row number that is not its own)
    f = open(path, newline="", encoding="utf-8", errors="surrogateescape")  # noqa: SIM115 (closed in finally)
    try:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if not header:
                raise StreamError(f"{path}: the file is empty; it needs a header row and at least one row")
            if any(_UNDECODED.search(c) for c in header):
                raise StreamError(f"{path} is not valid UTF-8 (in the header row); re-save it as UTF-8")
            for role, c in zip(("text", "id"), cols):
                if c is not None and c not in header:
                    raise _missing(path, c, header, role)
            where = [header.index(c) if c is not None else None for c in cols]
            for n, row in enumerate(reader):
                if any(_UNDECODED.search(c) for c in row):
                    raise StreamError(f"{path} is not valid UTF-8 (row {n + 1} after the header, line "
                                      f"{reader.line_num}); re-save it as UTF-8")
                if n < skip:
                    continue
                cells = [row[i] if i is not None and i < len(row) and row[i] != "" else None for i in where]
                yield cells[0], cells[1]
        except csv.Error as e:
            raise StreamError(f"{path} is not a readable CSV file (row {reader.line_num}: {e})") from e
    finally:
        f.close()


def _jsonl_rows(path, cols, skip):
    with open(path, "rb") as f:
        n = 0
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue  # blank lines (a trailing newline) are not rows
            n += 1
            if n <= skip:
                continue
            try:
                obj = json.loads(raw)
            except UnicodeDecodeError as e:
                raise StreamError(f"{path} is not valid UTF-8 (line {line_no}); re-save it as UTF-8") from e
            except json.JSONDecodeError as e:
                raise StreamError(f"{path}: line {line_no} is not JSON ({e.msg}); each line must be one object") from e
            if not isinstance(obj, dict):
                raise StreamError(f"{path}: line {line_no} is a JSON {type(obj).__name__}, not an object; each "
                                  f"line must be one object such as {{\"text\": \"...\"}}")
            if n == 1 + skip:
                for role, c in zip(("text", "id"), cols):
                    if c is not None and c not in obj:
                        raise _missing(path, c, list(obj), role)
            yield obj.get(cols[0]), (obj.get(cols[1]) if cols[1] is not None else None)


def read_rows(path, text_column="text", id_column=None, skip=0):
    """-> iterator of (text or None, id) per input row, in file order, after the first `skip` rows; lazy.

    Texts are str (a non-string cell becomes its text, a missing one None); ids are kept as read."""
    path = Path(path)
    if path.is_dir():
        raise StreamError(f"{path} is a directory; pass a .parquet, .csv or .jsonl file")
    if not path.is_file():
        raise StreamError(f"{path} does not exist; check the path")
    reader = {".parquet": _parquet_rows, ".csv": _csv_rows, ".jsonl": _jsonl_rows}[file_format(path)]
    for text, id_ in reader(path, (text_column, id_column), skip):
        yield _cell_text(text), id_


def id_type(path, id_column):
    """The pyarrow type ids keep in the output: the Parquet field's, text for CSV, None (inferred) for JSONL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fmt = file_format(path)
    if id_column is None or fmt == ".jsonl":
        return None
    if fmt == ".csv":
        return pa.string()
    schema = pq.read_schema(path)
    return schema.field(id_column).type if id_column in schema.names else None


def count_rows(path):
    """Rows of a Parquet file from its footer; None for CSV / JSONL (counting would read the whole file)."""
    if file_format(path) != ".parquet":
        return None
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:
        return None  # read_rows reports an unreadable file with a proper message


def chunked(rows, n):
    """Iterator of rows -> lists of n rows (the last one shorter)."""
    chunk = []
    for r in rows:
        chunk.append(r)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---- classifying one chunk -------------------------------------------------------------------------------
def prepare(texts):
    """B raw texts (None when missing) -> (B texts to classify, None for empty ones; B notes)."""
    out, notes = [], []
    for t in texts:
        if t is None or not t.strip():
            out.append(None)
            notes.append(EMPTY_NOTE)
        elif len(t) > MAX_TEXT_CHARS:
            out.append(t[:MAX_TEXT_CHARS])
            notes.append(f"cut to its first {MAX_TEXT_CHARS:,} characters")
        else:
            out.append(t)
            notes.append("")
    return out, notes


def output_columns(label_names, id_column=None):
    """The output's column names, in order."""
    cols = ([id_column] if id_column else []) + list(RESULT_COLUMNS[:4]) + [f"p_{n}" for n in label_names]
    return cols + ["note"]


def check_id_column(id_column, label_names):
    if id_column and id_column in output_columns(label_names):
        raise StreamError(f"the id column {id_column!r} has the name of an output column; rename it in the input "
                          f"or copy it under another name")


def classify_texts(team, texts, ids=None, id_column=None, max_tier=None, max_flops=None, id_type=None):
    """B raw texts (None when missing) [+ B ids] -> pyarrow.Table of B answer rows (see the module docstring),
    and the exit tiers [B'] of the B' rows classified. Empty texts get an empty label and a note.
    id_type: the ids' pyarrow type (None: inferred from the values)."""
    import pyarrow as pa

    clean, notes = prepare(texts)
    keep = [i for i, t in enumerate(clean) if t is not None]
    B, names = len(texts), team.cfg.label_names
    probs, info = team.predict_proba([clean[i] for i in keep], max_tier=max_tier, max_flops=max_flops)
    mask = np.ones(B, dtype=bool)
    mask[keep] = False  # pyarrow's mask: True = null

    def spread(values, dtype):
        full = np.zeros(B, dtype=dtype)
        full[keep] = values
        return pa.array(full, mask=mask)

    label = np.full(B, "", dtype=object)
    label[keep] = [names[j] for j in probs.argmax(axis=1)]
    cols = {}
    if id_column:
        cols[id_column] = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(list(ids), type=id_type)
    cols["label"] = pa.array(label.tolist(), type=pa.string())
    cols["confidence"] = spread(probs.max(axis=1) if len(keep) else [], np.float32)
    cols["exit_tier"] = spread(info["exit_tier"], np.int16)
    cols["flops"] = spread(info["flops"], np.float64)
    for c, n in enumerate(names):
        cols[f"p_{n}"] = spread(probs[:, c], np.float32)
    cols["note"] = pa.array(notes, type=pa.string())
    return pa.table(cols), np.asarray(info["exit_tier"])


# ---- the work folder -------------------------------------------------------------------------------------
def input_fingerprint(path):
    """{"path", "size", "sha256"} of the whole input file (see the module docstring for why the whole)."""
    from minislm.experts.registry import sha256_of

    p = Path(path)
    return {"path": str(p.resolve()), "size": p.stat().st_size, "sha256": sha256_of(p)}


def model_fingerprint(folder):
    """sha256 of each file of a checkpoint folder: the team's identity, whatever path it is loaded from."""
    from minislm.experts.registry import sha256_of

    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    return {p.name: sha256_of(p) for p in files}


def work_dir(out):
    return Path(str(out) + ".parts")


def part_path(work, k):
    return Path(work) / f"part-{k:06d}.parquet"


def _manifest_path(work):
    return Path(work) / "manifest.json"


def _differences(old, new):
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k)]


def open_work(out, fingerprint, settings, restart=False):
    """-> the manifest to continue: a fresh one, or the one found in <out>.parts when it is for the same
    input and settings. A manifest for another input or other settings is a ResumeError unless restart."""
    work = work_dir(out)
    path = _manifest_path(work)
    if path.is_file() and restart:
        clear_work(work)
    elif path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            old_input, old_settings, done = old["input"], old["settings"], old["chunks_done"]
            counts = old.get("tier_counts", [])
            for v in (done, old["rows_done"], *counts):  # whole numbers, or a resume would skip the wrong rows
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise ValueError(f"a count is {v!r}")
            if done > old["rows_done"] or not isinstance(old_input.get("sha256"), str):
                raise ValueError("the counts do not fit together")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ResumeError(f"{path} is damaged ({type(e).__name__}: {e}); pass restart=True (--restart) to start "
                              f"over") from e
        if old_input["sha256"] != fingerprint["sha256"]:
            raise ResumeError(f"{work} holds work on another input (sha256 {old_input['sha256'][:12]}... of "
                              f"{old_input['path']}, this input is {fingerprint['sha256'][:12]}...); refused so "
                              f"answers are never mixed: pass restart=True (--restart) to start over, or another "
                              f"output path")
        if old_settings != settings:
            raise ResumeError(f"{work} was started with other settings ({'; '.join(_differences(old_settings, settings))}); "
                              f"run with the same settings to resume, or pass restart=True (--restart) to start over")
        missing = [part_path(work, k).name for k in range(done) if not part_path(work, k).is_file()]
        if missing:
            raise ResumeError(f"{work}: the manifest lists {done} chunks but {missing[0]} is missing; pass "
                              f"restart=True (--restart) to start over")
        old["input"] = fingerprint  # same bytes; the path may have moved
        return old
    work.mkdir(parents=True, exist_ok=True)
    manifest = {"format": "minislm-stream", "version": MANIFEST_VERSION, "input": fingerprint,
                "settings": settings, "chunks_done": 0, "rows_done": 0, "complete": False}
    write_json(path, manifest)
    return manifest


def clear_work(work):
    """Remove the parts and manifest this module wrote, then the folder if nothing else is in it."""
    work = Path(work)
    for p in list(work.glob("part-*.parquet")) + list(work.glob(".tmp-*")) + [_manifest_path(work)]:
        if p.is_file():
            p.unlink()
    try:
        work.rmdir()
    except OSError:
        pass  # the folder holds files of someone else's: leave them


def write_part(work, k, table):
    import pyarrow.parquet as pq

    with atomic_path(part_path(work, k)) as tmp:
        pq.write_table(table, tmp)


# ---- the final file --------------------------------------------------------------------------------------
def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _csv_cell(v):
    if v is None:
        return ""
    return repr(v) if isinstance(v, float) else str(v)


def concatenate(work, n_parts, out):
    """part-000000 .. part-<n-1> -> one file `out` (.parquet / .csv / .jsonl by its extension), written
    atomically, one part in memory at a time."""
    import pyarrow.parquet as pq

    ext = file_format(out, "output")
    parts = [part_path(work, k) for k in range(n_parts)]
    schema = _common_schema([pq.read_schema(p) for p in parts])
    with atomic_path(out) as tmp:
        if ext == ".parquet":
            with pq.ParquetWriter(tmp, schema) as w:
                for p in parts:
                    w.write_table(pq.read_table(p).cast(schema))
            return
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f) if ext == ".csv" else None
            if writer:
                writer.writerow(schema.names)
            for p in parts:
                for row in pq.read_table(p).cast(schema).to_pylist():
                    if writer:
                        writer.writerow([_csv_cell(v) for v in row.values()])
                    else:
                        f.write(json.dumps({k: _json_value(v) for k, v in row.items()}, ensure_ascii=False) + "\n")


def _common_schema(schemas):
    """Parts share one schema, except an id column that JSONL filled with mixed types (or all nulls in one
    chunk): then that column becomes text, the one type every value can take."""
    import pyarrow as pa

    first = schemas[0]
    fields = []
    for i, f in enumerate(first):
        types = {s.field(i).type for s in schemas} - {pa.null()}
        if len(types) <= 1:
            fields.append(f.with_type(types.pop() if types else pa.string()))
        else:
            fields.append(f.with_type(pa.string()))
    return pa.schema(fields)


def saved_progress(out):
    """-> (rows, chunks) saved in <out>.parts by an unfinished run, or None when there is none."""
    try:
        m = json.loads(_manifest_path(work_dir(out)).read_text(encoding="utf-8"))
        return int(m["rows_done"]), int(m["chunks_done"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_output(out, overwrite=False):
    """Refuse, before any work, an output that cannot be written or would replace a file of the user's: an
    unknown type, a folder, a folder that cannot be written, or an existing file (unless overwrite, or it is
    this module's output with its unfinished work in <out>.parts beside it)."""
    out = Path(out)
    file_format(out, "output")
    if out.is_dir():
        raise StreamError(f"the output {out} is a folder; name a .parquet, .csv or .jsonl file to write")
    if out.exists() and not out.is_file():
        raise StreamError(f"the output {out} is not a regular file (a pipe or a device?); name a .parquet, .csv "
                          f"or .jsonl file to write")
    if out.exists() and not overwrite and saved_progress(out) is None:
        raise StreamError(f"the output {out} already exists; pass --overwrite (overwrite=True) to replace it, or "
                          f"name a new file (nothing was changed)")
    why = unwritable(out.parent)
    if why:
        raise StreamError(f"the output {out} cannot be written ({why}); choose a writable folder")


def _check_input(path):
    if path.is_file():
        return
    if path.is_dir():
        raise StreamError(f"{path} is a directory; pass a .parquet, .csv or .jsonl file")
    if path.exists():
        raise StreamError(f"{path} is not a regular file (a pipe?); writing to an output reads the input twice "
                          f"(its sha256 keys the resume), so save it to a file first")
    raise StreamError(f"{path} does not exist; check the path")


# ---- the whole run ---------------------------------------------------------------------------------------
def tier_mix(counts):
    """Exit-tier counts [K] -> "t0 81% t1 12% ..." for a progress bar."""
    total = max(1, int(counts.sum()))
    return " ".join(f"t{k} {100 * c / total:.0f}%" for k, c in enumerate(counts))


def classify_file(team, model_folder, input_path, out, settings=None, restart=False, progress=False,
                  on_chunk=None, overwrite=False):
    """Classify every row of `input_path` into `out`, chunk by chunk, resuming from <out>.parts when a run
    was interrupted. team: a loaded Team; model_folder: its checkpoint folder (part of the settings' identity).
    on_chunk(k, rows_done), when given, is called after part k is safely written. An existing `out` is
    replaced only with overwrite=True (or when it is this work's own, being resumed).

    -> summary dict: rows, chunks, resumed_from (chunks already done), seconds, docs_per_s (of this run's
    rows), tier_counts [K]."""
    settings = (settings or StreamSettings()).check()
    input_path, out = Path(input_path), Path(out)
    file_format(out, "output")
    in_fmt = file_format(input_path)
    _check_input(input_path)
    if out.resolve() == input_path.resolve():
        raise StreamError(f"the output {out} is the input; write the answers to another file")
    check_output(out, overwrite)
    try:
        with exclusive(out):
            return _classify_file(team, model_folder, input_path, out, settings, in_fmt, restart, progress,
                                  on_chunk)
    except LockedError as e:
        raise StreamError(f"the output {out} is being written by another run (process {e.pid or 'unknown'}); wait "
                          f"for it to finish or name another output (nothing was changed)") from None


def _classify_file(team, model_folder, input_path, out, settings, in_fmt, restart, progress, on_chunk):
    names = team.cfg.label_names
    check_id_column(settings.id_column, names)
    last = len(team.cfg.experts) - 1
    if settings.max_tier is not None and not (isinstance(settings.max_tier, int) and 0 <= settings.max_tier <= last):
        raise StreamError(f"max_tier must be a whole number from 0 to {last} for this team, got {settings.max_tier!r}")
    identity = {**asdict(settings), "model": model_fingerprint(model_folder), "input_format": in_fmt,
                "labels": list(names)}
    probe = read_rows(input_path, settings.text_column, settings.id_column)  # columns checked before any work
    if next(probe, None) is None:
        raise StreamError(f"{input_path} has no rows: nothing to classify")
    probe.close()
    manifest = open_work(out, input_fingerprint(input_path), identity, restart=restart)
    work = work_dir(out)
    done, rows_done = manifest["chunks_done"], manifest["rows_done"]
    counts = np.zeros(len(team.cfg.experts), dtype=np.int64)
    for k, c in enumerate(manifest.get("tier_counts", [])):
        counts[k] = c
    total = count_rows(input_path)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=rows_done, unit=" docs", desc=printable(input_path.name), smoothing=0.1)
    t0, new_rows = time.perf_counter(), 0
    ids_as = id_type(input_path, settings.id_column)
    try:
        rows = read_rows(input_path, settings.text_column, settings.id_column, skip=rows_done)
        for k, chunk in enumerate(chunked(rows, settings.chunk_size), start=done):
            texts = [t for t, _ in chunk]
            ids = [i for _, i in chunk] if settings.id_column else None
            table, tiers = classify_texts(team, texts, ids, settings.id_column, settings.max_tier,
                                          settings.max_flops, ids_as)
            write_part(work, k, table)
            counts += np.bincount(tiers.astype(np.int64), minlength=len(counts))
            rows_done += len(chunk)
            new_rows += len(chunk)
            manifest.update(chunks_done=k + 1, rows_done=rows_done, tier_counts=counts.tolist())
            write_json(_manifest_path(work), manifest)
            if bar is not None:
                bar.update(len(chunk))
                bar.set_postfix_str(tier_mix(counts))
            if on_chunk is not None:
                on_chunk(k, rows_done)
    finally:
        if bar is not None:
            bar.close()
    concatenate(work, manifest["chunks_done"], out)
    clear_work(work)
    seconds = time.perf_counter() - t0
    return {"rows": rows_done, "chunks": manifest["chunks_done"], "resumed_from": done, "seconds": seconds,
            "docs_per_s": new_rows / seconds if seconds > 0 else float("nan"), "tier_counts": counts.tolist(),
            "output": str(out)}


def run_stream(input_path, out, model, text_column="text", id_column=None, chunk_size=1000, max_tier=None,
               max_flops=None, restart=False, progress=True, on_chunk=None, team=None, overwrite=False):
    """The command-line entry: load the team in `model` (a checkpoint folder; or pass it loaded as `team`),
    classify `input_path` into `out` (see classify_file) and return its summary. Errors are StreamError /
    CheckpointError (both ValueError): one line each, naming the remedy."""
    from minislm.team import Team

    settings = StreamSettings(text_column=text_column, id_column=id_column, chunk_size=chunk_size,
                              max_tier=max_tier, max_flops=max_flops)
    settings.check()
    team = Team.load(model) if team is None else team
    return classify_file(team, model, input_path, out, settings, restart=restart, progress=progress,
                         on_chunk=on_chunk, overwrite=overwrite)
