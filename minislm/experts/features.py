"""Run an encoder expert over a dataset and keep every layer's pooled features, cached on disk.

For each text the cache holds [L+1, 2H]: per layer (embeddings included) the masked mean over real tokens
and the first token's vector (CLS), side by side. The layer mix of the collaboration learns which of them
to use, so the encoder runs once per dataset, not once per training epoch.

Cache layout (never pickle): <cache_dir>/<expert>/<dataset>-<split>-len<T>-<hash>/
    features.npy   float32 [B, L+1, 2H], an .npy memmap filled batch by batch
    meta.json      the key the file was made for, and how many length-sorted batches are done
A meta.json whose key differs from the one asked for means the file was made for other inputs: it is
rebuilt, never reused. An interrupted extraction resumes at the first batch not marked done.
"""
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from minislm.atomic import write_json
from minislm.encoder.pooling import pool_layers

SAVE_EVERY = 20  # batches between flushes of the cache (and of the resume point)
DEFAULT_CACHE_DIR = Path(__file__).resolve().parent.parent.parent / "cache" / "features"


def cache_dir_default():
    """MINISLM_CACHE_DIR if set, else <repo>/cache/features."""
    return Path(os.environ.get("MINISLM_CACHE_DIR", DEFAULT_CACHE_DIR))


@dataclass(frozen=True)
class FeatureKey:
    expert: str          # expert name (or folder path for a user's model)
    weights_sha256: str  # identity of the weights actually used
    dataset: str         # dataset name, e.g. "ag_news"
    split: str           # split name, e.g. "test"
    max_len: int         # tokens per text after truncation
    n_texts: int         # rows in the split
    content_sha256: str  # hash of every text, in order

    def folder_name(self):
        short = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]
        return f"{self.dataset}-{self.split}-len{self.max_len}-{short}"


def texts_sha256(texts):
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


def length_batches(lengths, batch_size):
    """Row order sorted by length (longest first) cut into batches, so padding stays small."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pooled_features(model, texts, max_len=128, batch_size=32, rows=None):
    """Pooled features [B, L+1, 2H] of texts, computed now (no cache), in length-sorted batches.

    rows: the texts already tokenized by this model's tokenizer (then `texts` is not read)."""
    if rows is None:
        rows = model.tokenizer.encode(texts, max_len)
    out = np.zeros((len(rows), model.config.n_layers + 1, 2 * model.config.hidden), dtype=np.float32)
    for idx in length_batches([len(r) for r in rows], batch_size):
        ids, mask = model.tokenizer.pad([rows[i] for i in idx])
        out[idx] = pool_layers(model.encoder.forward(ids, mask), mask)
    return out


def extract(model, texts, dataset, split, max_len=128, batch_size=32, cache_dir=None, progress=True):
    """Pooled features of every text, [B, L+1, 2H] float32, from the cache when it matches.

    model: a loaded expert with `.name`, `.weights_sha256`, `.tokenizer` and `.encoder` (see experts.py).
    """
    key = FeatureKey(model.name, model.weights_sha256, dataset, split, int(max_len), len(texts),
                     texts_sha256(texts))
    shape = (len(texts), model.encoder.config.n_layers + 1, 2 * model.encoder.config.hidden)
    safe_name = re.sub(r"[^A-Za-z0-9._-]+", "_", model.name).strip("_")[-60:]  # a folder path is a name too
    folder = Path(cache_dir or cache_dir_default()) / safe_name / key.folder_name()
    meta_path, data_path = folder / "meta.json", folder / "features.npy"
    meta = _read_meta(meta_path)
    if meta is not None and (meta.get("key") != asdict(key) or _stored_shape(data_path) != shape):
        shutil.rmtree(folder)  # made for other inputs, or damaged: rebuild, never reuse
        meta = None
    if meta is not None and meta.get("complete"):
        return np.load(data_path, mmap_mode="r")

    ids, mask = model.tokenizer.encode_batch(texts, max_len=max_len)   # [B, T] each, padded to the longest
    lengths = mask.sum(axis=1)
    batches = length_batches(lengths, batch_size)
    if meta is None:
        folder.mkdir(parents=True, exist_ok=True)
        feats = np.lib.format.open_memmap(data_path, mode="w+", dtype=np.float32, shape=shape)
        meta = {"key": asdict(key), "batch_size": batch_size, "batches_done": 0, "complete": False}
        write_json(meta_path, meta)
    else:
        feats = np.load(data_path, mmap_mode="r+")
        if meta.get("batch_size") != batch_size:
            batch_size = meta["batch_size"]  # resume with the batching the file was started with
            batches = length_batches(lengths, batch_size)

    start, t0, done_tokens = meta["batches_done"], time.perf_counter(), 0
    bar = _progress(len(texts), meta["batches_done"] * batch_size, f"{model.name} {dataset}/{split}", progress)
    for i in range(start, len(batches)):
        rows = batches[i]
        T = int(lengths[rows].max())
        hidden = model.encoder.forward(ids[rows, :T], mask[rows, :T])  # [L+1, b, T, H]
        feats[rows] = pool_layers(hidden, mask[rows, :T])
        done_tokens += int(lengths[rows].sum())
        if (i + 1) % SAVE_EVERY == 0 or i == len(batches) - 1:
            feats.flush()
            meta["batches_done"] = i + 1
            write_json(meta_path, meta)
        bar.update(len(rows))
    bar.close()
    feats.flush()
    meta.update(batches_done=len(batches), complete=True,
                seconds=round(time.perf_counter() - t0, 1), tokens=done_tokens)
    write_json(meta_path, meta)
    del feats
    return np.load(data_path, mmap_mode="r")


def _stored_shape(path):
    try:
        return tuple(np.load(path, mmap_mode="r").shape)
    except (OSError, ValueError):
        return None


def _read_meta(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _progress(total, initial, desc, enabled):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="doc", disable=not enabled, smoothing=0.1)
