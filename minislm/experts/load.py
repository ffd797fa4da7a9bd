"""A pretrained expert ready to use: its tokenizer and encoder, loaded by name or from any local folder.

    expert = load_expert("all-MiniLM-L6-v2")         # one of the prepared experts (see registry.py)
    expert = load_expert("/path/to/any/bert-folder")  # or any HF BERT/MPNet folder
    vectors = expert.embed(["a sentence", "another"])  # [B, H], masked mean of the last layer
    expert = load_expert("all-MiniLM-L6-v2-int8")    # its int8 version (`python -m minislm.weights quantize`)

An int8 folder (experts/quantized.py writes it) is recognised by its quantized.json, by name or by path.
"""
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minislm.encoder.config import EncoderConfig
from minislm.encoder.folder import WeightsError, load_folder, read_config
from minislm.encoder.quantize import encoder_from_int8_tensors, int8_identity, read_int8_weights
from minislm.encoder.model import Encoder
from minislm.encoder.pooling import pool_cls, pool_mean
from minislm.encoder.tokenizer import Tokenizer
from minislm.experts import registry


@dataclass
class Expert:
    name: str                 # registry name, or the folder path for a user's own model
    folder: Path              # where config.json, model.safetensors and tokenizer.json live
    config: EncoderConfig
    tokenizer: Tokenizer
    encoder: Encoder
    _sha256: str | None = field(default=None, repr=False)
    source_sha256: str | None = None  # int8: the weights_sha256 of the float32 weights it was quantized from

    @property
    def precision(self):
        """"float32" or "int8" (the encoder's linears)."""
        return self.encoder.precision

    @property
    def weights_sha256(self):
        """The identity of these weights in caches and checkpoints: sha256 of model.safetensors (the manifest's,
        checked at load, for a prepared expert; hashed on first use for a user's folder); for an int8 expert one
        derived from its float32 source (encoder/quantize.py: int8_identity), folder or not."""
        if self._sha256 is None:
            self._sha256 = (int8_identity(self.source_sha256) if self.source_sha256
                            else registry.sha256_of(self.folder / "model.safetensors"))
        return self._sha256

    def rehash(self):
        """Hash model.safetensors now, ignoring any recorded value -> sha256 (an int8 expert's identity is
        derived from its source's, which the team checks itself)."""
        if self.source_sha256:
            return self.weights_sha256
        self._sha256 = registry.sha256_of(self.folder / "model.safetensors")
        return self._sha256

    def hidden_states(self, texts, max_len=None):
        """B texts -> hidden states [L+1, B, T, H] and mask [B, T] (one padded batch)."""
        ids, mask = self.tokenizer.encode_batch(texts, max_len)
        return self.encoder.forward(ids, mask), mask

    def embed(self, texts, layer=-1, pooling="mean", max_len=None, batch_size=32):
        """B texts -> [B, H]: one layer pooled ("mean" over real tokens, or "cls"), in length-sorted batches."""
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        rows = self.tokenizer.encode(texts, max_len)
        out = np.zeros((len(rows), self.config.hidden), dtype=np.float32)
        order = np.argsort([-len(r) for r in rows], kind="stable")  # similar lengths together: less padding
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask = self.tokenizer.pad([rows[i] for i in idx])
            h = self.encoder.forward(ids, mask)[layer]
            out[idx] = pool_mean(h, mask) if pooling == "mean" else pool_cls(h)
        return out


# config.json fields read as whole numbers (encoder/config.py), each with the least value that makes sense
WHOLE_FIELDS = {"hidden_size": 1, "num_attention_heads": 1, "vocab_size": 1, "num_hidden_layers": 1,
                "intermediate_size": 1, "max_position_embeddings": 1, "type_vocab_size": 0, "pad_token_id": 0,
                "relative_attention_num_buckets": 1}


def check_config_values(folder):
    """Refuse a config.json whose numbers are not numbers ("384px", NaN, 12.5 layers, true), naming the file
    and the field, before anything is built from it (the encoder's reader would say only "invalid literal")."""
    file = Path(folder) / "config.json"
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # read_config reports an unreadable or invalid file itself
    if not isinstance(raw, dict):
        return
    for key, lo in WHOLE_FIELDS.items():
        v = raw.get(key)
        if key in raw and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
            raise WeightsError(f"{file}: field {key!r} is {v!r}, not a whole number >= {lo}; restore the model "
                               f"folder's config.json (or fetch the expert again)")
    eps = raw.get("layer_norm_eps", 1e-12)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < 1):
        raise WeightsError(f"{file}: field 'layer_norm_eps' is {eps!r}, not a small positive number; restore the "
                           f"model folder's config.json (or fetch the expert again)")


def resolve_folder(name_or_path):
    """An expert's registry name or a folder path -> (name, folder). A folder holding a manifest (a prepared
    expert named by its path) is checked against it as a name would be."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"an expert is named by a string or a folder path, got {name_or_path!r}")
    if not str(os.fspath(name_or_path)).strip():  # Path("") is the current folder: never load it by accident
        raise FileNotFoundError(f"an expert name is empty; pass one of {', '.join(registry.EXPERTS)} or the path "
                                f"of a model folder")
    if name_or_path in registry.EXPERTS:
        return name_or_path, registry.expert_dir(name_or_path)  # checked against its manifest
    base = str(name_or_path).removesuffix(registry.INT8_SUFFIX)
    if base != name_or_path and base in registry.EXPERTS:
        return name_or_path, registry.int8_dir(base)           # likewise
    path = Path(name_or_path)
    if path.is_dir():
        if registry.read_manifest(path) is not None:
            problems = registry.integrity_problems(path) or registry.content_problems(path)
            if problems:
                raise registry.DamagedExpertError(f"{path} is damaged ({'; '.join(problems)}); prepare it again "
                                                  f"(`{registry.FETCH_COMMAND}` for a pretrained expert)")
        return str(path), path
    raise FileNotFoundError(f"{name_or_path!r} is neither a known expert ({', '.join(registry.EXPERTS)}) nor a "
                            f"model folder; pass one of those names or the path of a folder with config.json, "
                            f"model.safetensors and tokenizer.json")


def load_expert(name_or_path):
    """Registry name (or <name>-int8) or folder (float32 or int8) -> Expert, every weight checked against
    config.json."""
    name, folder = resolve_folder(name_or_path)
    check_config_values(folder)
    if (Path(folder) / registry.INT8_META).is_file():
        return load_int8_folder(name, folder)
    hf = load_folder(folder)
    cfg = hf.config
    tokenizer = Tokenizer.from_file(folder / "tokenizer.json", max_len=cfg.max_tokens, pad_id=cfg.pad_id)
    return Expert(name=name, folder=Path(folder), config=cfg, tokenizer=tokenizer,
                  encoder=Encoder.from_params(cfg, hf.params), _sha256=registry.prepared_sha256(folder))


def load_int8_folder(name, folder):
    """An int8 folder (config.json, tokenizer.json, model-int8.safetensors, quantized.json) -> int8 Expert."""
    folder = Path(folder)
    meta_file = folder / registry.INT8_META
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        source_sha256 = meta["source"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"{meta_file} does not say which float32 weights this int8 folder came from ({e}); "
                           f"write it again with `{registry.QUANTIZE_COMMAND}`") from e
    for f in ("config.json", "tokenizer.json", registry.INT8_WEIGHTS):
        if not (folder / f).is_file():
            raise FileNotFoundError(f"{folder / f} is missing: an int8 folder needs config.json, tokenizer.json and "
                                    f"{registry.INT8_WEIGHTS}; write it again with `{registry.QUANTIZE_COMMAND}`")
    cfg = read_config(folder)
    encoder = encoder_from_int8_tensors(cfg, read_int8_weights(folder / registry.INT8_WEIGHTS, cfg))
    tokenizer = Tokenizer.from_file(folder / "tokenizer.json", max_len=cfg.max_tokens, pad_id=cfg.pad_id)
    return Expert(name=name, folder=folder, config=cfg, tokenizer=tokenizer, encoder=encoder,
                  source_sha256=source_sha256)
