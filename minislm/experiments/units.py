"""The units an experiments run is resumed by: each finished one is a file, so a rerun skips it and says so.

A run's folder (cache/experiments/<run>/, see __main__.run_dir) holds, per seed s:
    seed-<s>-adapt-<method>-<expert>.json         one adaptation of one expert: its settings, the base weights'
    seed-<s>-adapt-<method>-<expert>.safetensors  sha256, the hash of the rows it trained on, what it scored
                                                  (info) and its delta (the .safetensors: only the tensors that
                                                  changed, checked against the delta's sha256 on load)
    seed-<s>.json                                 the seed's team training and every row scored on it
The adaptation units come first (the team trains on the adapted encoders); the seed's unit is written when its
team and rows are done. Each file is written atomically (temporary file + rename); the .safetensors before its
.json, so a unit exists once its .json does. The aggregate (notebooks/results/<protocol>.*) is rebuilt from the
seed units alone; the .safetensors are needed only to resume a seed whose team is not finished.
"""
import hashlib
import json
from pathlib import Path

import numpy as np

from minislm.atomic import save_safetensors, write_json
from minislm.team.adaptation import adapt, load_delta


def seed_unit(folder, seed):
    return Path(folder) / f"seed-{seed}.json"


def adapt_tag(settings):
    """AdaptSettings -> how a row names the method: "lora-r8", "top2" or "full"."""
    return {"lora": f"lora-r{settings.rank}", "topk": f"top{settings.top_k}", "full": "full"}[settings.method]


def adapt_unit(folder, seed, expert, settings):
    """-> the .json of (seed, expert, adaptation method)'s unit; its delta is the same name's .safetensors."""
    return Path(folder) / f"seed-{seed}-adapt-{adapt_tag(settings)}-{Path(expert).name}.json"


def finished_adapt_units(folder, seed):
    """The .json of every finished adaptation unit of a seed, sorted."""
    return sorted(Path(folder).glob(f"seed-{seed}-adapt-*.json")) if Path(folder).is_dir() else []


def skipped(path):
    """The one line a rerun logs for a finished unit it does not run again."""
    return f"skipped: {Path(path).parent.name}/{Path(path).name}, done before ({path})"


def read_seed(path, log=None):
    """A seed unit -> its dict, or None when it is not there or does not parse (said so: it is run again)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        if log:
            log(f"{path}: unreadable ({e.__class__.__name__}); running this unit again")
        return None


def rows_sha256(texts_fit, y_fit, texts_val, y_val):
    """One hash of the rows an adaptation trains and stops on."""
    h = hashlib.sha256()
    for texts, y in ((texts_fit, y_fit), (texts_val, y_val)):
        for t in texts:
            h.update(t.encode("utf-8", "surrogatepass"))
            h.update(b"\x00")
        h.update(np.asarray(y, dtype=np.int64).tobytes())
        h.update(b"\x01")
    return h.hexdigest()


def kept_adapt(folder, fresh=False, log=print):
    """An adaptation step with adaptation.adapt's signature that keeps each finished adaptation as a unit in
    `folder`: a unit made for the same settings, base weights and rows is loaded (and said so) instead of
    trained again; one that does not match or does not load is said so and trained again. fresh: always train."""
    import dataclasses

    def step(expert, texts_fit, y_fit, texts_val, y_val, settings, log=log, work_dir=None):
        path = adapt_unit(folder, settings.seed, expert.name, settings)
        key = {"expert": expert.name, "base_sha256": expert.weights_sha256,
               "rows_sha256": rows_sha256(texts_fit, y_fit, texts_val, y_val),
               "settings": dataclasses.asdict(settings)}
        if path.exists() and not fresh:
            got = _load(path, key, expert)
            if isinstance(got, str):
                log(f"{path.name}: {got}; adapting again")
            else:
                log(skipped(path))
                return got
        adapted, (arrays, meta), info = adapt(expert, texts_fit, y_fit, texts_val, y_val, settings, log=log,
                                              work_dir=work_dir)
        save_safetensors(path.with_suffix(".safetensors"), {k: np.ascontiguousarray(v) for k, v in arrays.items()})
        write_json(path, {"unit": "adaptation", **key, "delta_meta": meta, "info": _plain(info),
                          "delta_file": path.with_suffix(".safetensors").name})
        return adapted, (arrays, meta), info

    return step


def _load(path, key, expert):
    """A finished adaptation unit -> (adapted expert, (arrays, meta), info), or why it cannot be used (str)."""
    from safetensors.numpy import load_file

    try:
        unit = json.loads(path.read_text(encoding="utf-8"))
        if {k: unit.get(k) for k in key} != key:
            return "made for other settings, weights or rows"
        arrays = load_file(str(path.with_suffix(".safetensors")))
        adapted = load_delta(expert, arrays, unit["delta_meta"])  # checks the arrays' sha256
    except (OSError, ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        return f"unreadable ({e.__class__.__name__}: {str(e)[:120]})"
    return adapted, (arrays, unit["delta_meta"]), unit["info"]


def _plain(obj):
    """info with NumPy scalars turned into JSON numbers."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
