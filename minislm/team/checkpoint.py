"""The checkpoint format: a folder of arrays (safetensors) and JSON, never pickle. It knows nothing of Team:
the team turns itself into (meta, arrays) and assembles itself from them (team.py).

A checkpoint folder holds
    team.json          format, version, the team's config, label names, experts with their weights' sha256,
                       the config of every trained model, cascade settings, protocol, metrics, the command, and
                       the sha256 of every array (so flipped bytes are found, never served)
    team.safetensors   every array, keyed "<part>/<path>" (e.g. "tier3/head/out/w", "lexical/table")
Writing assembles the new folder beside the destination and swaps the two in one atomic exchange
(renameat2 RENAME_EXCHANGE on Linux), so the path always holds a whole checkpoint: the old one, or the new.
"""
import ctypes
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from minislm.atomic import save_safetensors, write_json

FORMAT = "minislm-team"
VERSION = 2
META_FILE, ARRAYS_FILE = "team.json", "team.safetensors"
TRAIN_COMMAND = "python -m minislm.train"


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
    return meta


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
