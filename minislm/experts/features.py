"""Every layer's pooled features of a text, computed once per encoder and kept on disk, addressed by content.

For each text the cache holds [L', 2H] float32: per layer (embeddings included) the masked mean over real
tokens and the first token's vector (CLS), side by side (L' = L + 1 layers unless a layer set is asked for).
The layer mix of the collaboration learns which of them to use, so the encoder runs once per text, not once per
epoch, seed, split, fold or protocol.

Layout (never pickle) under the cache folder (MINISLM_CACHE_DIR, else $XDG_CACHE_HOME/minislm/features, else
~/.cache/minislm/features):
    <expert>/<space>/space.json   what every entry here was made with: weights sha256, tokenizer sha256,
                                  max_len, head/tail setting, layer set, shape; <space> is that key's hash
    <expert>/<space>/<id>.npy     a shard: float32 [n, L', 2H], n texts in length-sorted order
    <expert>/<space>/<id>.json    its manifest: the sha256 of each text (row order), the shape, the .npy's sha256
A text is found by its sha256 in any shard of its space, so any subset, reordering or re-splitting of texts
already seen is served from disk and only unseen texts run through the encoder.

Writes: the .npy, then the .json, each to a unique temporary file renamed into place, so a shard exists once its
manifest does and two processes filling one space never write the same file (a text computed by both is in two
shards; either serves it). An interrupted fill keeps its finished shards. A shard whose manifest does not parse,
or disagrees with its space, its .npy's shape or sha256, is reported on one line, deleted and recomputed.

Size: bounded by MINISLM_FEATURE_CACHE_GB (default DEFAULT_MAX_GB); after a fill, the least recently used
shards (a read touches its manifest's mtime) are deleted until the folder is under the bound. On disk a text
costs (L' x 2H x 4) bytes plus 67 bytes of manifest: 12.4 kB for L3, 21.6 kB for L6, 79.9 kB for MPNet.
"""
import hashlib
import io
import json
import os
import re
import secrets
import sys
import time
import weakref
from pathlib import Path

import numpy as np

from minislm.atomic import atomic_path, write_json
from minislm.encoder.pooling import pool_layers

FORMAT = 1              # bumped when the layout or the meaning of an entry changes
SHARD_TEXTS = 512       # texts per shard: the unit of writing, of reuse by a resumed fill, and of eviction
DEFAULT_MAX_GB = 10.0   # size bound of the whole cache folder (every expert), MINISLM_FEATURE_CACHE_GB moves it
STALE_SECONDS = 3600    # temporary files and manifest-less shards older than this are left-overs of a crash


def cache_dir_default():
    """MINISLM_CACHE_DIR if set, else $XDG_CACHE_HOME/minislm/features, else ~/.cache/minislm/features."""
    if os.environ.get("MINISLM_CACHE_DIR"):
        return Path(os.environ["MINISLM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "minislm" / "features"


def max_bytes_default():
    """The cache folder's size bound in bytes (MINISLM_FEATURE_CACHE_GB, default DEFAULT_MAX_GB)."""
    raw = os.environ.get("MINISLM_FEATURE_CACHE_GB", "")
    try:
        gb = float(raw) if raw else DEFAULT_MAX_GB
    except ValueError:
        raise ValueError(f"MINISLM_FEATURE_CACHE_GB={raw!r} is not a number; set it to a size in GB, e.g. 10") from None
    if gb <= 0:
        raise ValueError(f"MINISLM_FEATURE_CACHE_GB={raw!r} must be positive; set it to a size in GB, e.g. 10")
    return int(gb * 1e9)


def text_sha256(text):
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def length_batches(lengths, batch_size):
    """Row order sorted by length (longest first) cut into batches, so padding stays small."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pooled_features(model, texts, max_len=128, batch_size=32, rows=None, head=None):
    """Pooled features [B, L+1, 2H] of texts, computed now (no cache), in length-sorted batches, each padded to
    its own longest row. rows: the texts already tokenized by this model's tokenizer (then `texts` is not read);
    head: the tokenizer's head + tail truncation (None keeps a long text's start)."""
    if rows is None:
        rows = model.tokenizer.encode(texts, max_len, head)
    out = np.zeros((len(rows), model.config.n_layers + 1, 2 * model.config.hidden), dtype=np.float32)
    for idx in length_batches([len(r) for r in rows], batch_size):
        ids, mask = model.tokenizer.pad([rows[i] for i in idx])
        out[idx] = pool_layers(model.encoder.forward(ids, mask), mask)
    return out


def extract(model, texts, dataset=None, split=None, max_len=128, batch_size=32, cache_dir=None, progress=True,
            head=None, layers=None, log=None):
    """Pooled features of every text, [B, L', 2H] float32: from the cache where it holds them, the rest computed
    (length-sorted batches) and added to it.

    model: a loaded expert with `.name`, `.weights_sha256`, `.tokenizer`, `.config` and `.encoder` (see load.py).
    dataset, split: only name the work in the progress bar (the cache is keyed on the texts themselves).
    head: head + tail truncation as in Tokenizer.encode; layers: indices into the L + 1 layers (None: all).
    log: where a damaged entry is reported (default: stderr).
    """
    log = log or _stderr
    cache = SpaceCache(Path(cache_dir or cache_dir_default()), model, max_len, head, layers)
    keys = [text_sha256(t) for t in texts]
    out = np.zeros((len(texts), *cache.row_shape), dtype=np.float32)
    missing = cache.fill(keys, out, log)                                  # key -> positions not found on disk
    if missing:
        first = [pos[0] for pos in missing.values()]
        rows = model.tokenizer.encode([texts[i] for i in first], cache.max_len, head)
        order = np.argsort([-len(r) for r in rows], kind="stable")       # longest first, as pooled_features
        per_shard = batch_size * max(1, SHARD_TEXTS // batch_size)       # whole batches, so batching is unchanged
        desc = f"{_safe(model.name)} {dataset or ''}{'/' + split if split else ''}".strip()
        bar = _progress(len(texts), len(texts) - sum(len(p) for p in missing.values()), desc, progress)
        for s in range(0, len(order), per_shard):
            chunk = order[s:s + per_shard]
            feats = pooled_features(model, None, batch_size=batch_size, rows=[rows[i] for i in chunk])
            feats = np.ascontiguousarray(feats[:, cache.layers] if cache.layers is not None else feats)
            chunk_keys = [keys[first[i]] for i in chunk]
            cache.write(chunk_keys, feats)
            for k, f in zip(chunk_keys, feats):
                out[missing[k]] = f
            bar.update(sum(len(missing[k]) for k in chunk_keys))
        bar.close()
        cache.evict(max_bytes_default())
    return out


class SpaceCache:
    """The shards of one (encoder weights, tokenizer, max_len, head, layers) space in the cache folder."""

    def __init__(self, root, model, max_len, head, layers):
        cfg = model.config
        self.root = root
        self.max_len = min(int(max_len), model.tokenizer.max_len)
        self.layers = None if layers is None else [int(i) % (cfg.n_layers + 1) for i in layers]
        n_layers = cfg.n_layers + 1 if self.layers is None else len(self.layers)
        self.row_shape = (n_layers, 2 * cfg.hidden)
        self.space = {"format": FORMAT, "weights_sha256": model.weights_sha256,
                      "tokenizer_sha256": _tokenizer_sha256(model.tokenizer), "max_len": self.max_len,
                      "head": None if head is None else int(head), "layers": self.layers or "all",
                      "row_shape": list(self.row_shape), "dtype": "float32"}
        space_id = hashlib.sha256(json.dumps(self.space, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = root / _safe(model.name) / space_id
        self.used = set()    # shards read or written by this call: never evicted by it

    def manifests(self):
        if not self.folder.is_dir():
            return []
        return [p for p in self.folder.glob("*.json") if not p.name.startswith(".") and p.name != "space.json"]

    def fill(self, keys, out, log):
        """Copy every cached row of `keys` into out [B, L', 2H] -> {key: [positions]} of the rows not found."""
        want = {}
        for i, k in enumerate(keys):
            want.setdefault(k, []).append(i)
        plan = {}  # shard manifest -> [(row in the shard, key)]
        found = set()
        for path in sorted(self.manifests(), key=_mtime, reverse=True):  # the most recently used copy first
            meta = self._read_manifest(path, log)
            if meta is None:
                continue
            for row, k in enumerate(meta["texts"]):
                if k in want and k not in found:
                    found.add(k)
                    plan.setdefault(path, (meta, []))[1].append((row, k))
        for path, (meta, rows) in plan.items():
            data = self._read_shard(path, meta, log)
            if data is None:
                found -= {k for _, k in rows}
                continue
            for row, k in rows:
                out[want[k]] = data[row]
            self.used.add(path.stem)
            _touch(path)
        return {k: pos for k, pos in want.items() if k not in found}

    def _read_manifest(self, path, log):
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
            ok = (isinstance(meta, dict) and meta.get("space") == self.space and isinstance(meta.get("texts"), list)
                  and meta.get("shape") == [len(meta["texts"]), *self.row_shape] and "npy_sha256" in meta)
            why = "its manifest does not match its space, shape or text list"
        except FileNotFoundError:
            return None  # evicted by another process since the folder was listed
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
            ok, why = False, f"its manifest is not valid JSON ({e.__class__.__name__})"
        if not ok:
            self._discard(path, why, log)
            return None
        return meta

    def _read_shard(self, path, meta, log):
        npy = path.with_suffix(".npy")
        try:
            raw = npy.read_bytes()
        except FileNotFoundError:
            if path.exists():  # a manifest without its data (the .npy is renamed into place first)
                self._discard(path, "its .npy is missing", log)
            return None
        if hashlib.sha256(raw).hexdigest() != meta["npy_sha256"]:
            self._discard(path, f"its .npy's sha256 differs from the manifest's ({len(raw)} bytes)", log)
            return None
        try:
            data = np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            self._discard(path, f"its .npy does not load ({e.__class__.__name__})", log)
            return None
        if data.dtype != np.float32 or list(data.shape) != meta["shape"]:
            self._discard(path, f"its .npy holds {data.dtype} {list(data.shape)}, not float32 {meta['shape']}", log)
            return None
        return data

    def _discard(self, path, why, log):
        log(f"feature cache: discarded damaged shard {path} ({why}); its texts are computed again")
        _remove(path)
        _remove(path.with_suffix(".npy"))

    def write(self, keys, feats):
        """One new shard of rows feats [n, L', 2H] for the text hashes `keys`: .npy first, then its manifest."""
        if not (self.folder / "space.json").exists():
            write_json(self.folder / "space.json", self.space)
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(feats, dtype=np.float32), allow_pickle=False)
        raw = buf.getvalue()
        shard = f"{time.time_ns():x}-{os.getpid()}-{secrets.token_hex(4)}"  # unique across processes
        with atomic_path(self.folder / f"{shard}.npy") as tmp:
            with open(tmp, "wb") as f:
                f.write(raw)
        manifest = {"space": self.space, "shape": list(feats.shape), "npy_sha256": hashlib.sha256(raw).hexdigest(),
                    "texts": list(keys)}
        with atomic_path(self.folder / f"{shard}.json") as tmp:  # compact: 67 bytes per text
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(manifest, f, separators=(",", ":"))
        self.used.add(shard)

    def evict(self, max_bytes):
        """Delete the least recently used shards of the whole cache folder until it holds <= max_bytes (the
        shards this call used stay), and the left-overs of crashed writers."""
        shards, total, now = [], 0, time.time()
        for folder in self.root.glob("*/*"):
            if not (folder / "space.json").is_file():  # only the cache's own space folders are touched
                continue
            for f in folder.iterdir():
                try:
                    st = f.stat()
                except FileNotFoundError:
                    continue
                total += st.st_size
                if f.name.startswith(".tmp-") or (f.suffix == ".npy" and not f.with_suffix(".json").exists()):
                    if now - st.st_mtime > STALE_SECONDS:
                        total -= st.st_size
                        _remove(f)
                elif f.suffix == ".json" and f.name != "space.json":
                    npy = f.with_suffix(".npy")
                    size = st.st_size + (npy.stat().st_size if npy.exists() else 0)
                    shards.append((st.st_mtime, size, f))
        for _, size, f in sorted(shards, key=lambda s: s[0]):
            if total <= max_bytes:
                break
            if f.parent == self.folder and f.stem in self.used:
                continue
            _remove(f)  # the manifest first: a shard without one is never read
            _remove(f.with_suffix(".npy"))
            total -= size


_TOKENIZER_SHA = weakref.WeakKeyDictionary()


def _tokenizer_sha256(tokenizer):
    """sha256 of the tokenizer's own JSON (its vocabulary and rules): features depend on it as on the weights."""
    if tokenizer not in _TOKENIZER_SHA:
        _TOKENIZER_SHA[tokenizer] = hashlib.sha256(tokenizer.hf.to_str().encode()).hexdigest()
    return _TOKENIZER_SHA[tokenizer]


def _safe(name):
    """An expert's name (or folder path) as one folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_")[-60:] or "expert"


def _mtime(path):
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _touch(path):
    try:
        os.utime(path)
    except OSError:
        pass


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _stderr(message):
    print(message, file=sys.stderr)


def _progress(total, initial, desc, enabled):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="doc", disable=not enabled, smoothing=0.1)
