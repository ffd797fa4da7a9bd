"""Labelled text datasets: AG News, IMDB and DBpedia-14, or a user's own CSV / Parquet / JSONL file.

Datasets are read with the `datasets` library, from a local folder laid out as <name>/{split}.parquet +
labels.json (an argument, else $MINISLM_DATA_DIR, else the usual places), or from the Hugging Face hub when
online. Only part of the official splits may exist offline, so every dataset has a `protocol`: what it trains
and tests on, written into every result.
"""
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
HUB_IDS = {"ag_news": "fancyzhx/ag_news", "imdb": "stanfordnlp/imdb", "dbpedia_14": "fancyzhx/dbpedia_14"}
SEED = 0

PROTOCOLS = {
    "ag_news": {"train": "train", "test": "test",
                "note": "train on the 13,675-row real subset of the official train split, test on the full "
                        "official test split (7,600 rows); validation rows are carved from train"},
    "imdb": {"train": "train", "test": "test", "subsample": {"train": 2000, "test": 2000}, "seed": SEED,
             "note": "stratified subsample (fixed seed) of 2,000 train and 2,000 test reviews of the official "
                     "splits, for compute; validation rows are carved from train"},
    "dbpedia_14": {"train": "test", "test": "test", "split_fraction": 0.5, "seed": SEED,
                   "note": "only 7,600 official test rows exist offline (70,000 on the hub): a fixed stratified "
                           "half of them trains, the other half is scored; no row is both. A half rather than "
                           "5-fold CV keeps one fixed test set shared by every row and seed"},
    # small-data protocols: the same test rows, 1,000 stratified training rows
    "ag_news-1k": {"base": "ag_news", "train": "train", "test": "test", "subsample": {"train": 1000}, "seed": SEED,
                   "note": "1,000 stratified rows of the AG News train subset, the full official test split"},
    "imdb-1k": {"base": "imdb", "train": "train", "test": "test", "subsample": {"train": 1000, "test": 2000},
                "seed": SEED, "note": "1,000 stratified IMDB training reviews, the same 2,000 test reviews as imdb"},
}


class DataError(ValueError):
    """A dataset that cannot be used as asked."""


@dataclass
class TextDataset:
    texts: list             # B strings
    labels: np.ndarray      # [B] int64 in 0..C-1
    label_names: list       # C class names, in label order
    name: str               # "ag_news", or the file name for a user's file
    split: str              # "train", "test", ...
    source: str             # folder, file or hub id it was read from
    protocol: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.texts)

    def subset(self, idx, split=None):
        idx = np.asarray(idx, dtype=np.int64)
        return TextDataset([self.texts[i] for i in idx], self.labels[idx], self.label_names, self.name,
                           split or self.split, self.source, self.protocol)


def search_dirs(data_dir=None):
    """Folders that may hold <name>/{split}.parquet, in the order they are tried."""
    if data_dir:
        return [Path(data_dir)]
    dirs = [Path(os.environ["MINISLM_DATA_DIR"])] if os.environ.get("MINISLM_DATA_DIR") else []
    return dirs + [REPO / "data", REPO.parent / "shared" / "data"]


def check_labels(labels, label_names, source):
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise DataError(f"{source}: the dataset is empty; it needs at least one labelled row")
    bad = labels[(labels < 0) | (labels >= len(label_names))]
    if len(bad):
        raise DataError(f"{source}: label {int(bad[0])} is outside labels.json, which names {len(label_names)} "
                        f"classes (0..{len(label_names) - 1}: {', '.join(label_names)})")
    return labels


def load_local(name, split, folder):
    """<folder>/<name>/{split}.parquet + labels.json -> TextDataset."""
    from datasets import Dataset

    base = Path(folder) / name
    file = base / f"{split}.parquet"
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist (splits here: "
                                f"{', '.join(sorted(p.stem for p in base.glob('*.parquet'))) or 'none'})")
    label_names = json.loads((base / "labels.json").read_text(encoding="utf-8"))
    ds = Dataset.from_parquet(str(file))
    for col in ("text", "label"):
        if col not in ds.column_names:
            raise DataError(f"{file}: no {col!r} column (columns: {', '.join(ds.column_names)})")
    return TextDataset(list(ds["text"]), check_labels(ds["label"], label_names, file), label_names, name, split,
                       str(file), PROTOCOLS.get(name, {}))


def load_hub(name, split):
    """The dataset from the Hugging Face hub, text formed as in the local copies."""
    import datasets

    ds = datasets.load_dataset(HUB_IDS[name], split=split)
    label_names = ds.features["label"].names
    if name == "dbpedia_14":  # local text = title + ". " + content, stripped
        texts = [f"{t}. {c.strip()}" for t, c in zip(ds["title"], ds["content"])]
    else:
        texts = list(ds["text"])
    return TextDataset(texts, check_labels(ds["label"], label_names, HUB_IDS[name]), label_names, name, split,
                       HUB_IDS[name], PROTOCOLS[name])


def load(name, split, data_dir=None):
    """A known dataset's split -> TextDataset: from a local folder if one has it, else from the hub."""
    if name not in HUB_IDS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(HUB_IDS)} (use load_file for your own)")
    tried = []
    for folder in search_dirs(data_dir):
        if (folder / name / f"{split}.parquet").is_file():
            return load_local(name, split, folder)
        tried.append(str(folder / name))
    try:
        return load_hub(name, split)
    except Exception as e:  # offline, or the hub refused: say where we looked
        raise DataError(f"{name}/{split} not found locally (looked in {', '.join(tried)}) and the hub failed "
                        f"({type(e).__name__}: {str(e)[:120]}); set MINISLM_DATA_DIR to a folder holding "
                        f"{name}/{split}.parquet and labels.json, or go online") from e


READERS = (".csv", ".parquet", ".jsonl", ".json")


def _read_table(path):
    """A CSV / Parquet / JSONL file -> datasets.Dataset, or a DataError naming the problem."""
    import datasets
    from datasets import Dataset

    path = Path(path)
    readers = {".csv": Dataset.from_csv, ".parquet": Dataset.from_parquet, ".jsonl": Dataset.from_json,
               ".json": Dataset.from_json}
    if path.is_dir():
        raise DataError(f"{path} is a directory; pass a CSV, Parquet or JSONL file")
    if not path.exists():
        raise DataError(f"{path} does not exist; check the path")
    if path.suffix.lower() not in readers:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use .csv, .parquet or .jsonl")
    if not path.is_file():  # a FIFO, /dev/stdin, a process substitution: read once, front to back
        if path.suffix.lower() == ".parquet":
            raise DataError(f"{path} is a pipe, and Parquet is read from its end; save it to a file first")
        return _read_stream(path)
    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a bar per file read would mix into the one line an error is reported in
    try:
        ds = _read_csv(path) if path.suffix.lower() == ".csv" else readers[path.suffix.lower()](str(path))
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; the user needs the file's problem, not the library's
        if "no data" in str(e) or path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty; it needs at least one row") from e
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise DataError(f"{path} could not be read as {path.suffix[1:]} ({first}); check the file's format") from e
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    if len(ds) == 0:
        raise DataError(f"{path}: the file has no rows; it needs at least one")
    return ds


def _read_stream(path):
    """A CSV or JSONL pipe -> datasets.Dataset, read in one pass (CSV cells as text, as _read_csv)."""
    from datasets import Dataset

    if path.suffix.lower() == ".csv":
        ds = _read_csv(path)
    else:
        rows = []
        with open(path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except UnicodeDecodeError as e:
                    raise DataError(f"{path} is not valid UTF-8 (line {n}); re-save it as UTF-8") from e
                except ValueError as e:
                    raise DataError(f"{path}: line {n} is not JSON ({e}); each line must be one object") from e
                if not isinstance(obj, dict):
                    raise DataError(f"{path}: line {n} is a JSON {type(obj).__name__}, not an object; each line "
                                    f"must be one object such as {{\"text\": \"...\"}}")
                rows.append(obj)
        keys = list(dict.fromkeys(k for r in rows for k in r))
        try:
            ds = Dataset.from_dict({k: [r.get(k) for r in rows] for k in keys})
        except Exception as e:  # pyarrow refuses a column of mixed types
            raise DataError(f"{path} could not be read as jsonl ({str(e).splitlines()[0][:160]}); give each key "
                            f"one type of value") from e
    if len(ds) == 0:
        raise DataError(f"{path}: the input has no rows; it needs at least one")
    return ds


def _read_csv(path):
    """A CSV file -> datasets.Dataset of string columns (every cell as written: "1e308" stays text, an empty
    cell is None), read with the standard library so no column is guessed to be a number."""
    import csv

    from datasets import Dataset

    limit = csv.field_size_limit()
    csv.field_size_limit(1 << 30)  # a long text is cut later, never a reason to refuse the file
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 (byte {e.start}); re-save it as UTF-8") from e
    except csv.Error as e:
        raise DataError(f"{path} is not a readable CSV file ({e}); check the file's format") from e
    finally:
        csv.field_size_limit(limit)
    if not rows or not rows[0]:
        raise DataError(f"{path}: the file is empty; it needs a header row and at least one row")
    header, body = rows[0], rows[1:]
    cols = {name: [r[i] if i < len(r) and r[i] != "" else None for r in body] for i, name in enumerate(header)}
    return Dataset.from_dict(cols)


def _need_column(ds, path, column, flag):
    if column not in ds.column_names:
        raise DataError(f"{path}: no column {column!r} (columns: {', '.join(ds.column_names)}); name the right "
                        f"one with {flag}")


def read_column(path, column="text", flag="--column"):
    """The text column of a table -> list of B str, None where a cell is empty (never parsed as labels)."""
    ds = _read_table(path)
    _need_column(ds, path, column, flag)
    return [None if v is None or (isinstance(v, float) and v != v) else str(v) for v in ds[column]]


def _is_number(v):
    try:
        float(v)
    except ValueError:
        return False
    return True


def map_labels(raw, label_names=None, source="labels"):
    """Raw labels [B] -> (ids [B] int64, label names), by one rule:
    - whole numbers (ints, or floats like 3.0) with label_names: ids as given, each in 0..C-1;
      without label_names: the distinct values in sorted order become 0..C-1, named by their value;
    - strings that all read as numbers (a CSV's "3") are numbers;
    - other strings: stripped of surrounding spaces; with label_names in that order, else sorted; two spellings
      that differ only in case are refused rather than silently made two classes;
    - anything else (missing values, fractions, mixed types, booleans) is refused, naming the row."""
    for i, v in enumerate(raw):
        if v is None or (isinstance(v, float) and v != v):
            raise DataError(f"{source}: row {i} has no label; label every row or drop it")
        if isinstance(v, bool):
            raise DataError(f"{source}: row {i} has the boolean label {v!r}; use class names or whole numbers")
    if all(isinstance(v, str) for v in raw) and all(_is_number(v) for v in raw):
        raw = [float(v) for v in raw]  # "3" and "3.0" in a CSV are the number 3
    if all(isinstance(v, str) for v in raw):
        vals = [v.strip() for v in raw]
        names = [str(n).strip() for n in label_names] if label_names else sorted(set(vals))
        folded = {}
        for n in set(vals) | set(names):
            folded.setdefault(n.casefold(), set()).add(n)
        clash = next((sorted(v) for v in folded.values() if len(v) > 1), None)
        if clash:
            raise DataError(f"{source}: labels {clash} differ only in case; spell each class one way")
        index = {n: i for i, n in enumerate(names)}
        unknown = next((v for v in vals if v not in index), None)
        if unknown is not None:
            raise DataError(f"{source}: label {unknown!r} is not one of the known labels ({', '.join(names)}); use "
                            f"one of those")
        return np.array([index[v] for v in vals], dtype=np.int64), names
    if any(isinstance(v, str) for v in raw):
        i = next(i for i, v in enumerate(raw) if not isinstance(v, str))
        raise DataError(f"{source}: labels mix text and numbers (row {i}: {raw[i]!r}); use one kind")
    try:
        vals = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{source}: labels must be class names or whole numbers ({e})") from e
    bad = np.flatnonzero(~np.isfinite(vals) | (vals != np.round(vals)))
    if len(bad):
        raise DataError(f"{source}: row {bad[0]} has the label {raw[bad[0]]!r}, not a whole number; labels must "
                        f"be class names or whole numbers")
    if label_names:
        out = np.flatnonzero((vals < 0) | (vals >= len(label_names)))
        if len(out):
            raise DataError(f"{source}: label {raw[out[0]]!r} (row {out[0]}) is outside 0..{len(label_names) - 1}, "
                            f"the ids of the {len(label_names)} named classes ({', '.join(map(str, label_names))})")
        return vals.astype(np.int64), list(label_names)
    classes = np.unique(vals)  # in float64, so huge values are never cast
    names = [str(int(c)) if abs(c) < 2 ** 53 else repr(float(c)) for c in classes]
    return np.searchsorted(classes, vals).astype(np.int64), names


def load_file(path, text_column="text", label_column="label", label_names=None):
    """A user's CSV / Parquet / JSONL file -> TextDataset, labels mapped by map_labels' rule."""
    path = Path(path)
    ds = _read_table(path)
    _need_column(ds, path, text_column, "--text-column")
    _need_column(ds, path, label_column, "--label-column")
    labels, names = map_labels(list(ds[label_column]), label_names, str(path))
    texts = ["" if t is None else str(t) for t in ds[text_column]]
    return TextDataset(texts, labels, names, path.stem, "file", str(path), {"note": f"user file {path.name}"})


def clean_training(ds):
    """Validate training rows before any work -> (cleaned TextDataset, facts).

    Empty texts are removed; repeated texts are kept once (the first occurrence, its label), so no text can
    sit on both sides of a fit/validation split; at least two classes must remain. facts: {"counts": {...},
    "notes": [one line per thing done]}."""
    keep, seen, empty, dup, conflict = [], {}, 0, 0, 0
    for i, t in enumerate(ds.texts):
        if not isinstance(t, str):
            raise DataError(f"{ds.source}: text {i} is a {type(t).__name__}, not a str; pass every text as a "
                            f"string")
        if not t.strip():
            empty += 1
            continue
        if t in seen:
            dup += 1
            conflict += int(ds.labels[seen[t]] != ds.labels[i])
            continue
        seen[t] = i
        keep.append(i)
    notes = []
    if empty:
        notes.append(f"{empty} empty text(s) removed")
    if dup:
        notes.append(f"{dup} repeated text(s) removed, the first copy kept"
                     + (f" ({conflict} had a different label than the first)" if conflict else ""))
    if not keep:
        raise DataError(f"{ds.source}: every text is empty, nothing to train on; give rows with text")
    out = ds.subset(keep)
    counts = np.bincount(out.labels, minlength=len(ds.label_names))
    present = int((counts > 0).sum())
    if present < 2:
        raise DataError(f"{ds.source}: only one class ({ds.label_names[int(counts.argmax())]!r}) has rows; a "
                        f"classifier needs at least two classes")
    missing = [n for n, c in zip(ds.label_names, counts) if c == 0]
    if missing:
        notes.append(f"classes with no training row: {', '.join(missing)}")
    notes.append(f"{len(out)} rows, per class: " + ", ".join(f"{n} {c}" for n, c in zip(ds.label_names, counts)))
    return out, {"counts": {"rows_in": len(ds), "rows_used": len(out), "empty": empty, "duplicates": dup,
                            "conflicting_duplicates": conflict}, "notes": notes}


def stratified_indices(labels, n, seed):
    """n row indices keeping every class's share (largest-remainder rounding), in a fixed shuffled order."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts / counts.sum() * n
    take = np.floor(exact).astype(int)
    take[np.argsort(-(exact - take), kind="stable")[: n - take.sum()]] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def stratified_subsample(ds, n, seed=SEED):
    if n >= len(ds):
        return ds
    return ds.subset(stratified_indices(ds.labels, n, seed))


def stratified_split(ds, fraction, seed=SEED):
    """-> (rest, held): `fraction` of the rows, stratified, held apart (validation or test)."""
    held = stratified_indices(ds.labels, int(round(fraction * len(ds))), seed)
    rest = np.setdiff1d(np.arange(len(ds)), held)
    return ds.subset(rest), ds.subset(held, split=f"{ds.split}-held")


def kfold(labels, k, seed=SEED):
    """-> k (train_idx, val_idx) pairs; every row is in exactly one val fold; classes spread evenly."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        fold_of[rows] = (np.arange(len(rows)) + int(rng.integers(k))) % k
    return [(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in range(k)]


def protocol_splits(name, data_dir=None):
    """A dataset's (train, test) TextDatasets as its protocol defines them. Test rows whose text also occurs
    in train (IMDB and AG News have such cross-split duplicates) are dropped, so no trained row is scored."""
    if name not in PROTOCOLS:
        raise DataError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    p = PROTOCOLS[name]
    base = p.get("base", name)  # a small-data protocol reads its base dataset (and shares its feature cache)
    train, test = load(base, p["train"], data_dir), load(base, p["test"], data_dir)
    if "split_fraction" in p:
        train, test = stratified_split(train, p["split_fraction"], p["seed"])
        test.split = "test-held"
    seen = set(train.texts)
    keep = [i for i, t in enumerate(test.texts) if t not in seen]
    dropped = len(test) - len(keep)
    if dropped:
        test = test.subset(keep)
    sizes = p.get("subsample", {})
    if "train" in sizes:
        train = stratified_subsample(train, sizes["train"], p["seed"])
        if base != name:
            train.split = f"{p['train']}-{sizes['train']}"
    if "test" in sizes:
        test = stratified_subsample(test, sizes["test"], p["seed"])
    protocol = dict(p, dataset=name, n_train=len(train), n_test=len(test), test_rows_dropped_as_in_train=dropped)
    train.protocol = test.protocol = protocol
    return train, test
