"""Read a Hugging Face model folder (config.json, model.safetensors, tokenizer.json) into NumPy, checking it.

Every tensor the encoder needs is looked up by its Hugging Face name; a missing tensor, a wrong shape or a
wrong dtype stops the load with a message naming the file, the tensor, what was expected and what was found.
safetensors only: no pickle, so a weights file can never run code.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from minislm.encoder.config import ConfigError, EncoderConfig, from_hf_dict

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
# Prefixes that task-specific checkpoints put before the bare encoder's names.
KNOWN_PREFIXES = ("bert.", "mpnet.", "0.auto_model.", "model.")


class WeightsError(ValueError):
    """A model folder whose files do not hold what the config says they should."""


@dataclass
class HFFolder:
    path: Path                     # the folder
    config: EncoderConfig          # shapes read from config.json
    params: dict                   # Hugging Face tensor name -> float32 array
    ignored: list = field(default_factory=list)  # names in the file the encoder does not use (position_ids, pooler)


def expected_shapes(cfg):
    """Hugging Face tensor name -> shape, for every weight of a `cfg` encoder."""
    H, F = cfg.hidden, cfg.ffn
    shapes = {
        "embeddings.word_embeddings.weight": (cfg.vocab_size, H),
        "embeddings.position_embeddings.weight": (cfg.max_positions, H),
        "embeddings.LayerNorm.weight": (H,),
        "embeddings.LayerNorm.bias": (H,),
    }
    if cfg.family == "bert":
        shapes["embeddings.token_type_embeddings.weight"] = (cfg.type_vocab_size, H)
        attn = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
                "out": "attention.output.dense", "ln": "attention.output.LayerNorm"}
    else:
        shapes["encoder.relative_attention_bias.weight"] = (cfg.relative_buckets, cfg.n_heads)
        attn = {"query": "attention.attn.q", "key": "attention.attn.k", "value": "attention.attn.v",
                "out": "attention.attn.o", "ln": "attention.LayerNorm"}
    for i in range(cfg.n_layers):
        p = f"encoder.layer.{i}."
        for part in ("query", "key", "value", "out"):
            shapes[p + attn[part] + ".weight"] = (H, H)
            shapes[p + attn[part] + ".bias"] = (H,)
        shapes[p + attn["ln"] + ".weight"] = (H,)
        shapes[p + attn["ln"] + ".bias"] = (H,)
        shapes[p + "intermediate.dense.weight"] = (F, H)
        shapes[p + "intermediate.dense.bias"] = (F,)
        shapes[p + "output.dense.weight"] = (H, F)
        shapes[p + "output.dense.bias"] = (H,)
        shapes[p + "output.LayerNorm.weight"] = (H,)
        shapes[p + "output.LayerNorm.bias"] = (H,)
    return shapes


def attention_names(cfg, i):
    """The Hugging Face names of layer i's attention parts: query, key, value, out, ln."""
    p = f"encoder.layer.{i}."
    if cfg.family == "bert":
        return {"query": p + "attention.self.query", "key": p + "attention.self.key",
                "value": p + "attention.self.value", "out": p + "attention.output.dense",
                "ln": p + "attention.output.LayerNorm"}
    return {"query": p + "attention.attn.q", "key": p + "attention.attn.k", "value": p + "attention.attn.v",
            "out": p + "attention.attn.o", "ln": p + "attention.LayerNorm"}


def check_folder(path):
    """The folder as a Path, or an error naming the missing file."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist (expected a folder with "
                                f"{', '.join(REQUIRED_FILES)})")
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing: a model folder needs {', '.join(REQUIRED_FILES)}")
    return path


def read_config(path):
    """config.json of a model folder -> EncoderConfig."""
    file = Path(path) / "config.json"
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file} is not valid JSON ({e}); restore the model folder's config.json") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{file} must hold a JSON object, found {type(raw).__name__}")
    return from_hf_dict(raw, source=str(file))


def _bare_name(name):
    for prefix in KNOWN_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def read_weights(file, cfg):
    """model.safetensors -> (name -> float32 array for every expected tensor, names ignored)."""
    want = expected_shapes(cfg)
    params, ignored = {}, []
    try:
        with safe_open(str(file), framework="numpy") as f:
            for name in f.keys():
                bare = _bare_name(name)
                if bare not in want:
                    ignored.append(name)
                    continue
                meta = f.get_slice(name)
                dtype, shape = meta.get_dtype(), tuple(meta.get_shape())
                if shape != want[bare]:
                    raise WeightsError(f"{file}: tensor {name!r} has shape {shape}, expected {want[bare]} "
                                       f"from config.json; the weights do not match this config")
                if dtype != "F32":
                    raise WeightsError(f"{file}: tensor {name!r} has dtype {dtype}, expected F32 (float32); "
                                       f"convert the checkpoint to float32")
                params[bare] = np.ascontiguousarray(f.get_tensor(name), dtype=np.float32)
    except SafetensorError as e:
        raise WeightsError(f"{file} is not a readable safetensors file ({e}); it may be truncated or corrupt: "
                           f"delete it and fetch or convert the weights again") from e
    missing = [n for n in want if n not in params]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise WeightsError(f"{file}: missing tensor {missing[0]!r} (shape {want[missing[0]]})"
                           f"{', ' + ', '.join(map(repr, missing[1:3])) if len(missing) > 1 else ''}{more}; "
                           f"the file does not hold a {cfg.family} encoder matching config.json")
    return params, ignored


def load_folder(path):
    """A Hugging Face BERT/MPNet folder -> HFFolder(config, params), every tensor checked."""
    path = check_folder(path)
    cfg = read_config(path)
    params, ignored = read_weights(path / "model.safetensors", cfg)
    return HFFolder(path=path, config=cfg, params=params, ignored=ignored)
