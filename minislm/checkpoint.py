"""Save and load a trained team: safetensors for arrays, JSON for everything else, never pickle.

A checkpoint folder holds
    team.json            format, team config, label names, experts (with their weights' sha256), the config of
                         every trained model, cascade thresholds, data protocol, metrics, the command that made it
    team.safetensors     every array, keyed "<part>/<path>" (e.g. "tier3/head/out/w", "stats/all-MiniLM-L6-v2/mean")
    lexical.json, lexical.safetensors   the lexical expert
The folder is written beside its destination and swapped in at the end, so an interrupted save leaves the
previous checkpoint intact.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from minislm.atomic import save_safetensors, write_json
from minislm.collab.model import CollabConfig

FORMAT = "minislm-team"
VERSION = 1


class CheckpointError(ValueError):
    """A folder that is not a minislm checkpoint, or one that does not fit what it is used with."""


def _escape(name):
    """Expert names may be folder paths: keep '/' as the key separator only."""
    return name.replace("%", "%25").replace("/", "%2F")


def _unescape(part):
    return part.replace("%2F", "/").replace("%25", "%")


def flatten(tree, prefix):
    out = {}
    for k in sorted(tree):
        v = tree[k]
        key = f"{prefix}/{_escape(k)}"
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = np.ascontiguousarray(v, dtype=np.float32)
    return out


def unflatten(arrays, prefix):
    """Inverse of flatten; a collaboration's parameter-free fusion ({}) comes back as {} too."""
    tree = {"fusion": {}} if prefix.startswith(("tier", "router", "single")) else {}
    for key, v in arrays.items():
        if not key.startswith(prefix + "/"):
            continue
        node = tree
        parts = [_unescape(x) for x in key[len(prefix) + 1:].split("/")]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = v
    return tree


def save(team, folder, command=None):
    """Write `team` to `folder` (replacing an older checkpoint only once the new one is complete)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, (mu, sd) in team.stats.items():
        arrays[f"stats/{_escape(name)}/mean"], arrays[f"stats/{_escape(name)}/std"] = mu, sd
    for name, (_, p) in team.singles.items():
        arrays.update(flatten(p, f"single/{_escape(name)}"))
    for k, tier in enumerate(team.tiers):
        if tier is not None:
            arrays.update(flatten(tier[1], f"tier{k}"))
    if team.router is not None:
        arrays.update(flatten(team.router[1], "router"))
    meta = {
        "format": FORMAT, "version": VERSION, "command": command,
        "config": {k: v for k, v in team.cfg.__dict__.items()},
        "label_names": list(team.cfg.label_names),
        "experts": [{"name": e, "tier": k, "weights_sha256": None if e == "lexical" else team.expert(e).weights_sha256}
                    for k, e in enumerate(team.cfg.experts)],
        "singles": {n: c.to_dict() for n, (c, _) in team.singles.items()},
        "tiers": [None if t is None else t[0].to_dict() for t in team.tiers],
        "router": None if team.router is None else team.router[0].to_dict(),
        "thresholds": [float(t) for t in team.thresholds],
        "protocol": team.protocol, "metrics": team.metrics,
    }
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes an owner-only folder; a checkpoint is meant to be shared
    try:
        save_safetensors(tmp / "team.safetensors", arrays)
        team.lexical.save(tmp)
        write_json(tmp / "team.json", meta)  # written last: its presence marks a complete checkpoint
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def read_meta(folder):
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; a minislm checkpoint is a folder with team.json "
                              f"(make one with `python -m minislm.train`)")
    f = folder / "team.json"
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{folder} is not a minislm checkpoint: it has no team.json") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f} is not valid JSON ({e}); the checkpoint is damaged: train it again") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{f} is not a minislm team checkpoint (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{f} has checkpoint version {meta.get('version')}, this minislm reads {VERSION}")
    return meta


def load(folder, experts=None, label_names=None):
    """Checkpoint folder -> Team. experts / label_names, when given, must match the checkpoint's."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from minislm.lexical import LexicalModel
    from minislm.team import Team, TeamConfig

    folder = Path(folder)
    meta = read_meta(folder)
    if experts is not None and list(experts) != meta["config"]["experts"]:
        raise CheckpointError(f"{folder} was trained with experts {meta['config']['experts']}, not {list(experts)}; "
                              f"train a checkpoint for this expert set")
    if label_names is not None and list(label_names) != meta["label_names"]:
        raise CheckpointError(f"{folder} predicts labels {meta['label_names']}, not {list(label_names)}; "
                              f"train a checkpoint for these labels")
    try:
        arrays = load_file(str(folder / "team.safetensors"))
    except (SafetensorError, FileNotFoundError, OSError) as e:
        raise CheckpointError(f"{folder / 'team.safetensors'} cannot be read ({e}); the checkpoint is damaged") from e
    team = Team(TeamConfig(**meta["config"]))
    team.expected_sha256 = {e["name"]: e["weights_sha256"] for e in meta["experts"]}
    for name in team.cfg.experts:
        if f"stats/{_escape(name)}/mean" in arrays:
            team.stats[name] = (arrays[f"stats/{_escape(name)}/mean"], arrays[f"stats/{_escape(name)}/std"])
    for name, c in meta["singles"].items():
        team.singles[name] = (CollabConfig(**c), unflatten(arrays, f"single/{_escape(name)}"))
    team.tiers = [None if c is None else (CollabConfig(**c), unflatten(arrays, f"tier{k}"))
                  for k, c in enumerate(meta["tiers"])]
    if meta.get("router"):
        team.router = (CollabConfig(**meta["router"]), unflatten(arrays, "router"))
    team.thresholds = meta["thresholds"]
    team.protocol, team.metrics, team.command = meta["protocol"], meta["metrics"], meta.get("command")
    team.lexical = LexicalModel.load(folder, team.tokenizer())
    return team
