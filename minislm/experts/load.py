"""A pretrained expert ready to use: its tokenizer and encoder, loaded by name or from any local folder.

    expert = load_expert("all-MiniLM-L6-v2")         # one of the prepared experts (see registry.py)
    expert = load_expert("/path/to/any/bert-folder")  # or any HF BERT/MPNet folder
    vectors = expert.embed(["a sentence", "another"])  # [B, H], masked mean of the last layer
"""
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minislm.encoder.config import EncoderConfig
from minislm.encoder.folder import load_folder
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

    @property
    def weights_sha256(self):
        """sha256 of model.safetensors: the identity of these weights in caches and checkpoints (the
        manifest's, checked at load, for a prepared expert; hashed on first use for a user's folder)."""
        if self._sha256 is None:
            self._sha256 = registry.sha256_of(self.folder / "model.safetensors")
        return self._sha256

    def rehash(self):
        """Hash model.safetensors now, ignoring any recorded value -> sha256."""
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


def resolve_folder(name_or_path):
    """An expert's registry name or a folder path -> (name, folder)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"an expert is named by a string or a folder path, got {name_or_path!r}")
    if name_or_path in registry.EXPERTS:
        return name_or_path, registry.expert_dir(name_or_path)  # checked against its manifest
    path = Path(name_or_path)
    if path.is_dir():
        return str(path), path
    raise FileNotFoundError(f"{name_or_path!r} is neither a known expert ({', '.join(registry.EXPERTS)}) nor a "
                            f"model folder; pass one of those names or the path of a folder with config.json, "
                            f"model.safetensors and tokenizer.json")


def load_expert(name_or_path):
    """Registry name or folder -> Expert, every weight checked against config.json."""
    name, folder = resolve_folder(name_or_path)
    hf = load_folder(folder)
    cfg = hf.config
    tokenizer = Tokenizer.from_file(folder / "tokenizer.json", max_len=cfg.max_tokens, pad_id=cfg.pad_id)
    return Expert(name=name, folder=Path(folder), config=cfg, tokenizer=tokenizer,
                  encoder=Encoder.from_params(cfg, hf.params), _sha256=registry.prepared_sha256(folder))
