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
                   "note": "only 7,600 official test rows exist offline: a fixed stratified half of them trains, "
                           "the other half is scored; no row is both"},
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
    return dirs + [REPO / "data", REPO.parent / "shared" / "data", Path("/work/shared/data")]


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
    if name not in PROTOCOLS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(PROTOCOLS)} (use load_file for your own)")
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


def load_file(path, text_column="text", label_column="label", label_names=None):
    """A user's CSV / Parquet / JSONL file -> TextDataset. String labels become ids (sorted, or in the order
    of label_names); integer labels must lie in 0..len(label_names)-1 when names are given."""
    from datasets import Dataset

    path = Path(path)
    readers = {".csv": Dataset.from_csv, ".parquet": Dataset.from_parquet, ".jsonl": Dataset.from_json,
               ".json": Dataset.from_json}
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix.lower() not in readers:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use .csv, .parquet or .jsonl")
    try:
        ds = readers[path.suffix.lower()](str(path))
    except Exception as e:
        if "no data" in str(e) or path.stat().st_size == 0:  # datasets' words for a file without rows
            raise DataError(f"{path}: the dataset is empty; it needs at least one labelled row") from e
        raise DataError(f"{path} could not be read as {path.suffix[1:]} ({type(e).__name__}: {e})") from e
    for col, what in ((text_column, "text"), (label_column, "label")):
        if col not in ds.column_names:
            raise DataError(f"{path}: no {what} column {col!r} (columns: {', '.join(ds.column_names)}); "
                            f"name it with --{what}-column")
    if len(ds) == 0:
        raise DataError(f"{path}: the dataset is empty; it needs at least one labelled row")
    raw = list(ds[label_column])
    if all(isinstance(v, str) for v in raw):
        names = list(label_names) if label_names else sorted(set(raw))
        index = {n: i for i, n in enumerate(names)}
        unknown = [v for v in raw if v not in index]
        if unknown:
            raise DataError(f"{path}: label {unknown[0]!r} is not one of the known labels ({', '.join(names)})")
        labels = [index[v] for v in raw]
    else:
        labels = raw
        names = list(label_names) if label_names else [str(i) for i in range(int(max(raw)) + 1)]
    texts = ["" if t is None else str(t) for t in ds[text_column]]
    return TextDataset(texts, check_labels(labels, names, path), names, path.stem, "file", str(path),
                       {"note": f"user file {path.name}"})


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
    p = PROTOCOLS[name]
    train, test = load(name, p["train"], data_dir), load(name, p["test"], data_dir)
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
    if "test" in sizes:
        test = stratified_subsample(test, sizes["test"], p["seed"])
    protocol = dict(p, dataset=name, n_train=len(train), n_test=len(test), test_rows_dropped_as_in_train=dropped)
    train.protocol = test.protocol = protocol
    return train, test
