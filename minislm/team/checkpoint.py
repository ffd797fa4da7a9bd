"""The checkpoint format: a folder of arrays (safetensors) and JSON, never pickle. It knows nothing of Team:
the team turns itself into (meta, arrays) and assembles itself from them (team.py).

A checkpoint folder holds
    team.json          format, version, the team's config, label names, experts with their weights' sha256,
                       the config of every trained model, cascade settings, protocol, metrics, the command, and
                       the sha256 of every array (so flipped bytes are found, never served)
    team.safetensors   every array, keyed "<part>/<path>" (e.g. "tier3/head/out/w", "lexical/table")
Writing assembles the new folder beside the destination and swaps the two in one atomic exchange
(renameat2 RENAME_EXCHANGE on Linux), so the path always holds a whole checkpoint: the old one, or the new;
a writer holds the destination's lock (atomic.exclusive) meanwhile, so two never replace each other's.
Reading checks every field of team.json the API would check (check_meta) before anything is loaded or run:
a threshold of NaN or 2.0 in a hand-edited file is refused, never served.
"""
import ctypes
import hashlib
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from minislm.atomic import LockedError, exclusive, save_safetensors, write_json
from minislm.team.cascade import CANDIDATES

FORMAT = "minislm-team"
VERSION = 2
META_FILE, ARRAYS_FILE = "team.json", "team.safetensors"
TRAIN_COMMAND = "python -m minislm.train"
NEVER_STOP = float(CANDIDATES[-1])  # the threshold grid's value above every confidence: rows never stop there


class CheckpointError(ValueError):
    """A folder that is not a minislm checkpoint, a damaged one, or one that does not fit its use."""


# ---- array trees -------------------------------------------------------------------------------------------
def _escape(name):
    """Expert names may be folder paths: keep '/' as the key separator only."""
    return name.replace("%", "%25").replace("/", "%2F")


def _unescape(part):
    return part.replace("%2F", "/").replace("%25", "%")


def flatten(tree, prefix):
    """Nested dict of arrays -> {"prefix/a/b": float32 array}. An empty dict is kept as a marker key."""
    out = {}
    for k in sorted(tree):
        v = tree[k]
        key = f"{prefix}/{_escape(k)}"
        if isinstance(v, dict):
            out.update(flatten(v, key) if v else {key + "/.empty": np.zeros(0, dtype=np.float32)})
        else:
            out[key] = np.ascontiguousarray(v, dtype=np.float32)
    return out


def unflatten(arrays, prefix):
    """Inverse of flatten: the subtree under `prefix`."""
    tree = {}
    for key, v in arrays.items():
        if not key.startswith(prefix + "/"):
            continue
        node = tree
        parts = [_unescape(x) for x in key[len(prefix) + 1:].split("/")]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if parts[-1] != ".empty":
            node[parts[-1]] = v
    return tree


def array_sha256(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# ---- where a checkpoint may be written ----------------------------------------------------------------------
def is_checkpoint(folder):
    try:
        meta = json.loads((Path(folder) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def check_destination(folder):
    """Refuse a destination that would lose the user's files, or that cannot be written, before any work:
    it must be a new path, an empty folder, or a minislm checkpoint holding nothing else (then replaced)."""
    folder = Path(folder)
    if folder.is_symlink():
        raise CheckpointError(f"--out {folder} is a symbolic link; name the folder it points to, or a new one")
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"--out {folder} is a file, not a folder; name a new folder for the checkpoint")
    if folder.is_dir() and any(folder.iterdir()):
        if not is_checkpoint(folder):
            raise CheckpointError(f"--out {folder} holds files that are not a minislm checkpoint; name a new or "
                                  f"empty folder (nothing was changed)")
        others = sorted(p.name for p in folder.iterdir() if p.name not in (META_FILE, ARRAYS_FILE))
        if others:  # replacing the checkpoint would delete them with the old folder
            raise CheckpointError(f"--out {folder} is a checkpoint but also holds {', '.join(others[:3])}"
                                  f"{' ...' if len(others) > 3 else ''}; move those away or name another folder "
                                  f"(nothing was changed)")
    parent = folder.parent
    while not parent.exists():
        parent = parent.parent
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".minislm-write-test-"):
            pass
    except OSError as e:
        raise CheckpointError(f"--out {folder}: cannot write in {parent} ({e.strerror}); choose a writable "
                              f"folder") from e


@contextmanager
def locked(folder):
    """Hold the destination's lock for a whole run (train's, from before the data is read to the swap)."""
    try:
        with exclusive(folder):
            yield
    except LockedError as e:
        raise CheckpointError(f"--out {folder} is being written by another training (process {e.pid or 'unknown'});"
                              f" wait for it to finish or choose another folder (nothing was changed)") from None


# ---- write and read -------------------------------------------------------------------------------------------
def _exchange(a, b):
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE) -> True, or False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def write(folder, meta, arrays):
    """Write (meta, arrays) as a checkpoint at `folder`, replacing an older checkpoint there only once the new
    one is complete. meta: JSON-able dict; arrays: name -> float32 array."""
    folder = Path(folder)
    check_destination(folder)
    with locked(folder):
        return _write(folder, meta, arrays)


def _write(folder, meta, arrays):
    folder.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(meta, format=FORMAT, version=VERSION,
                arrays_sha256={k: array_sha256(v) for k, v in sorted(arrays.items())})
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes an owner-only folder; a checkpoint is meant to be shared
    try:
        save_safetensors(tmp / ARRAYS_FILE, arrays)
        write_json(tmp / META_FILE, meta)
        if not folder.exists():
            os.replace(tmp, folder)
        elif _exchange(tmp, folder):
            shutil.rmtree(tmp)  # tmp now holds the old checkpoint
        else:  # no atomic exchange here: the old one is moved aside for the instant of the rename
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            os.replace(folder, old)
            try:
                os.replace(tmp, folder)
            except BaseException:
                os.replace(old, folder)  # the second rename failed (or was interrupted): put the old one back
                raise
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def read_meta(folder):
    """team.json of a checkpoint folder, checked for format and version."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; a minislm checkpoint is a folder with {META_FILE} "
                              f"(make one with `{TRAIN_COMMAND}`)")
    f = folder / META_FILE
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{folder} is not a minislm checkpoint (it has no {META_FILE}); pass a folder "
                              f"`{TRAIN_COMMAND}` wrote") from e
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{f} is not valid JSON ({e}); the checkpoint is damaged: train it again") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{f} is not a minislm team checkpoint (format {found!r}); pass a folder "
                              f"`{TRAIN_COMMAND}` wrote")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{f} has checkpoint version {meta.get('version')}, this minislm reads {VERSION}; "
                              f"train it again with this version (`{TRAIN_COMMAND}`)")
    problem = meta_problem(meta)
    if problem:
        raise CheckpointError(f"{f}: {problem}; the checkpoint is damaged or was edited: train it again "
                              f"(`{TRAIN_COMMAND}`) or restore it")
    return meta


# ---- what team.json may hold ------------------------------------------------------------------------------
def _is_whole(v, lo=0, hi=None):
    return (not isinstance(v, bool) and isinstance(v, int) and v >= lo and (hi is None or v <= hi))


def _is_number(v, lo, hi, open_hi=False):
    return (not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and lo <= v
            and (v < hi if open_hi else v <= hi))


def _name_list(v):
    return isinstance(v, list) and all(isinstance(x, str) and x.strip() for x in v)


def _collab_problem(c, where, n_classes):
    """A stored CollabConfig (collab/model.py) -> what is wrong with it, or None."""
    from minislm.collab.fusion import FUSIONS

    if not isinstance(c, dict):
        return f"{where} must be an object, found {type(c).__name__}"
    checks = {
        "experts": lambda v: _name_list(v) and v,
        "in_layers": lambda v: isinstance(v, list) and len(v) == len(c.get("experts") or []) and all(
            _is_whole(x, 1, 10_000) for x in v),
        "in_dims": lambda v: isinstance(v, list) and len(v) == len(c.get("experts") or []) and all(
            _is_whole(x, 1, 10 ** 7) for x in v),
        "n_classes": lambda v: v == n_classes,
        "fusion": lambda v: v in FUSIONS,
        "proj_dim": lambda v: _is_whole(v, 0, 8192),
        "head_hidden": lambda v: _is_whole(v, 0, 8192),
        "dropout": lambda v: _is_number(v, 0.0, 1.0, open_hi=True),
        "gate": lambda v: v in ("softmax", "noisy_topk"),
        "top_k": lambda v: _is_whole(v, 1, 64),
        "balance": lambda v: _is_number(v, 0.0, 100.0),
        "gate_input": lambda v: isinstance(v, str),
    }
    for key, ok in checks.items():
        if key in c and not ok(c[key]):
            return f"{where}.{key} is {c[key]!r}, not a valid value"
    return None


def _lexical_problem(lex, n_classes):
    if not isinstance(lex, dict) or not isinstance(lex.get("config"), dict):
        return "lexical must be an object with a config"
    if not isinstance(lex.get("tokenizer"), str) or not lex["tokenizer"].strip():
        return f"lexical.tokenizer is {lex.get('tokenizer')!r}, not an expert name or folder"
    c = lex["config"]
    checks = {
        "vocab_size": lambda v: _is_whole(v, 1, 10 ** 7), "n_buckets": lambda v: _is_whole(v, 1, 1 << 26),
        "seed": lambda v: _is_whole(v, 0, 2 ** 64 - 1), "n_classes": lambda v: v == n_classes,
        "word_ngrams": lambda v: _is_whole(v, 0, 8), "piece_ngrams": lambda v: _is_whole(v, 0, 8),
        "special_ids": lambda v: isinstance(v, list) and all(_is_whole(x, 0) for x in v),
        "c_grid": lambda v: isinstance(v, list) and v and all(_is_number(x, 1e-12, 1e12) for x in v),
        "val_fraction": lambda v: _is_number(v, 0.0, 1.0, open_hi=True),
    }
    for key, ok in checks.items():
        if key in c and not ok(c[key]):
            return f"lexical.config.{key} is {c[key]!r}, not a valid value"
    return None


def meta_problem(meta):
    """-> what in a team.json is outside what the API accepts (the first thing found), or None.

    The team config's own fields are checked by TeamConfig on load; here: the label names, the experts and
    their weights' sha256, the cascade's composition (active tiers, thresholds: finite, in [0, 1]; answers),
    every stored head's config, the lexical expert's settings and the adaptation deltas."""
    cfg = meta.get("config")
    if not isinstance(cfg, dict):
        return "config must be an object" if "config" in meta else None  # a missing key: from_state names it
    names = meta.get("label_names", cfg.get("label_names"))
    if not (isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) and n.strip() for n in names)
            and len(set(names)) == len(names)):
        return f"label_names must be two or more distinct, non-empty names, found {names!r}"
    if isinstance(cfg.get("experts"), list) and not _name_list(cfg["experts"]):
        return f"config.experts must be non-empty names or folders, found {cfg['experts']!r}"
    experts = meta.get("experts", [])
    if not isinstance(experts, list):
        return "experts must be a list"
    for k, e in enumerate(experts):
        sha = e.get("weights_sha256") if isinstance(e, dict) else None
        if (not isinstance(e, dict) or not isinstance(e.get("name"), str) or not e["name"].strip()
                or not (sha is None or (isinstance(sha, str) and len(sha) == 64
                                        and all(ch in "0123456789abcdef" for ch in sha)))):
            return f"experts[{k}] must name an expert and its weights' sha256 (64 hex digits), found {e!r}"
    comp = meta.get("composition")
    if comp is not None:
        if not isinstance(comp, dict):
            return "composition must be an object"
        active, thresholds = comp.get("active"), comp.get("thresholds")
        if not (isinstance(active, list) and active and all(_is_whole(k, 0, 64) for k in active)):
            return f"composition.active must be tier numbers, found {active!r}"
        if not (isinstance(thresholds, list) and len(thresholds) == len(active) - 1):
            return (f"composition.thresholds must be {len(active) - 1} number(s), one per active tier but the "
                    f"last, found {thresholds!r}")
        bad = [t for t in thresholds if not (_is_number(t, 0.0, 1.0) or t == NEVER_STOP)]
        if bad:
            return (f"composition.thresholds must be finite confidences in [0, 1] (or {NEVER_STOP}, never stop "
                    f"there), found {bad[0]!r}")
        answers = comp.get("answers")
        if not isinstance(answers, dict) or not all(
                isinstance(a, dict) and a.get("kind") in ("single", "stack", "fused") and _name_list(a.get("experts"))
                for a in answers.values()):
            return "composition.answers must give each active tier a kind (single, stack, fused) and its members"
    n_classes = len(names)
    heads = [(f"singles[{n!r}]", c) for n, c in (meta.get("singles") or {}).items()] if isinstance(
        meta.get("singles", {}), dict) else [("singles", None)]
    tiers = meta.get("tiers", [])
    heads += [(f"tiers[{k}]", c) for k, c in enumerate(tiers) if c is not None] if isinstance(tiers, list) else [
        ("tiers", None)]
    if meta.get("router") is not None:
        heads.append(("router", meta["router"]))
    for where, c in heads:
        problem = _collab_problem(c, where, n_classes)
        if problem:
            return problem
    if "lexical" in meta:
        problem = _lexical_problem(meta["lexical"], n_classes)
        if problem:
            return problem
    deltas = meta.get("deltas", {})
    if not isinstance(deltas, dict) or not all(isinstance(d, dict) for d in deltas.values()):
        return "deltas must map expert names to objects"
    for name, d in deltas.items():
        sha = d.get("base_sha256")
        if not (isinstance(sha, str) and len(sha) == 64):
            return f"deltas[{name!r}].base_sha256 must be 64 hex digits, found {sha!r}"
    for key in ("protocol", "metrics"):
        if key in meta and not isinstance(meta[key], dict):
            return f"{key} must be an object"
    return None


def read(folder):
    """Checkpoint folder -> (meta, arrays), every array checked against its recorded sha256 and for
    non-finite values."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    folder = Path(folder)
    meta = read_meta(folder)
    try:
        arrays = load_file(str(folder / ARRAYS_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{folder / ARRAYS_FILE} cannot be read ({e}); the checkpoint is damaged: train "
                              f"it again") from e
    want = meta.get("arrays_sha256")
    if not isinstance(want, dict) or set(want) != set(arrays):
        raise CheckpointError(f"{folder}: {ARRAYS_FILE} does not hold the arrays {META_FILE} lists; the "
                              f"checkpoint is damaged: train it again")
    for key, a in arrays.items():
        if array_sha256(a) != want[key] or not np.isfinite(a).all():
            raise CheckpointError(f"{folder}: array {key!r} does not match its recorded sha256 (flipped bytes?); "
                                  f"the checkpoint is damaged: train it again or restore it")
    return meta, arrays
