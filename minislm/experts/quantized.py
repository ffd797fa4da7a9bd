"""int8 experts: write an expert's int8 folder, and get an int8 expert whether or not that folder exists.

    python -m minislm.weights quantize all-MiniLM-L6-v2    ->   <weights_dir>/all-MiniLM-L6-v2-int8/
        config.json, tokenizer.json, vocab.txt   copied from the float32 folder
        model-int8.safetensors                   the int8 encoder (encoder/quantize.py names its tensors)
        quantized.json                           format, scheme, the float32 source (name, sha256), sizes
        prepared.json                            the manifest of every file's sha256 (registry.py), written last
The folder is assembled beside its destination and renamed into place, as fetch does, so an interrupted
quantize leaves nothing half-made. Loading it (`load_expert("<name>-int8")`) checks it like a float32 folder.

`int8_of(expert)` quantizes a loaded float32 expert in memory (about 50 ms for all-MiniLM-L6-v2): what the team
does for an adapted expert, a user's own folder, or a registry expert whose int8 folder was not written.
"""
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

from minislm.atomic import save_safetensors, write_json
from minislm.encoder.quantize import SCHEME, int8_tensors, linear_bytes, quantize_encoder
from minislm.experts import registry
from minislm.experts.load import load_expert

FORMAT = "minislm-int8"
FORMAT_VERSION = 1
COPIED = ("config.json", "tokenizer.json", "vocab.txt")  # vocab.txt only when the float32 folder has one


def int8_of(expert):
    """A loaded float32 Expert -> its int8 version, quantized now (the tokenizer and float32 tensors shared)."""
    if expert.precision == "int8":
        return expert
    return dataclasses.replace(expert, name=registry.int8_name(expert.name), encoder=quantize_encoder(expert.encoder),
                               _sha256=None, source_sha256=expert.weights_sha256)


def quantize_expert(name, dest=None, force=False, progress=print):
    """Write the int8 folder of registry expert `name` into the store `dest` (default: the weights dir) -> its path.

    An intact int8 folder made from the same float32 weights is kept as it is (quantizing is deterministic)
    unless force; a damaged or stale one is written again."""
    store = Path(dest or registry.weights_dir())
    fp32 = dataclasses.replace(load_expert(str(registry.expert_dir(name, store))), name=name)  # manifest-checked
    folder = store / registry.int8_name(name)
    if not force and _intact_from(folder, fp32.weights_sha256):
        progress(f"{name}: int8 version already written from these weights: {folder}")
        return folder
    expert = int8_of(fp32)
    tensors = int8_tensors(expert.encoder)
    with tempfile.TemporaryDirectory(dir=store, prefix=f".quantize-{name}-") as tmp:
        out = Path(tmp) / folder.name
        out.mkdir()
        for f in COPIED:
            if (fp32.folder / f).is_file():
                shutil.copy2(fp32.folder / f, out / f)
        save_safetensors(out / registry.INT8_WEIGHTS, tensors, metadata={"format": FORMAT, "source_sha256":
                                                                          fp32.weights_sha256})
        write_json(out / registry.INT8_META, {
            "format": FORMAT, "version": FORMAT_VERSION, "precision": "int8", "scheme": SCHEME,
            "source": {"name": name, "file": "model.safetensors", "sha256": fp32.weights_sha256},
            "quantized": "every layer's query, key, value, attention output, intermediate and output Linear: "
                         "<module>.weight_codes int8 [out, in] and <module>.weight_scales float32 [out]; every "
                         "other tensor float32 under its Hugging Face name",
            "linear_bytes": {"float32": linear_bytes(fp32.encoder), "int8": linear_bytes(expert.encoder)}})
        registry.write_manifest(out, registry.int8_name(name), {"precision": "int8", "source_sha256":
                                                                fp32.weights_sha256})
        if folder.exists():  # damaged, stale or forced: moved aside, removed with tmp
            os.replace(folder, Path(tmp) / "replaced")
        os.replace(out, folder)
    ratio = linear_bytes(fp32.encoder) / linear_bytes(expert.encoder)
    size = (folder / registry.INT8_WEIGHTS).stat().st_size / 1e6
    progress(f"{name}: int8 version written to {folder} ({size:.0f} MB {registry.INT8_WEIGHTS}, "
             f"linear weights {ratio:.2f}x smaller)")
    return folder


def _intact_from(folder, source_sha256):
    manifest = registry.read_manifest(folder)
    return manifest is not None and manifest.get("source_sha256") == source_sha256 \
        and not registry.integrity_problems(folder)


def saved_int8(name, expected_sha256=None, dest=None):
    """The int8 Expert from registry expert `name`'s int8 folder, or None when it has none (or `name` is not a
    registry expert). A damaged folder, or one quantized from other weights than expected_sha256 (default: the
    prepared float32 folder's), is a DamagedExpertError naming the command that writes it again."""
    if name not in registry.EXPERTS:
        return None
    store = Path(dest or registry.weights_dir())
    folder = store / registry.int8_name(name)
    if not folder.exists():
        return None
    expert = load_expert(str(registry.int8_dir(name, store)))
    expert = dataclasses.replace(expert, name=registry.int8_name(name))
    want = expected_sha256 or registry.prepared_sha256(store / name)
    if want and expert.source_sha256 != want:
        raise registry.DamagedExpertError(
            f"the int8 version of {name!r} in {folder} was quantized from weights {expert.source_sha256[:12]}..., "
            f"not from {want[:12]}... (the {'ones expected' if expected_sha256 else 'prepared float32 ones'}); run "
            f"`{registry.QUANTIZE_COMMAND} {name}` to write it again")
    return expert
