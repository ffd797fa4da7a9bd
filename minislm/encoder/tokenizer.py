"""Text -> token ids with the model's own `tokenizer.json`, truncated and padded by minislm.

The `tokenizers` library does the WordPiece work (normalising, splitting, special tokens). Any padding or
truncation baked into the file is switched off: minislm truncates to the model's maximum positions (the special
tokens kept) and pads every batch to its own longest row, so a batch never carries more padding than it
needs.
"""
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer


class Tokenizer:
    def __init__(self, hf, max_len, pad_id):
        self.hf = hf            # the tokenizers.Tokenizer, padding and truncation off
        self.max_len = max_len  # longest row minislm produces, special tokens included
        self.pad_id = pad_id    # id written into padding positions

    @classmethod
    def from_file(cls, path, max_len, pad_id):
        path = Path(path)
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses with terse messages
            raise ValueError(f"{path} is not a readable tokenizer.json ({e}); restore it from the model's "
                             f"source") from e
        hf.no_padding()
        hf.no_truncation()
        return cls(hf, max_len, pad_id)

    def encode(self, texts, max_len=None):
        """list of B strings -> list of B id lists, each cut to max_len (default: the model's limit)."""
        max_len = self.max_len if max_len is None else min(int(max_len), self.max_len)
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings; wrap a single text as [text]")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text {i} is a {type(t).__name__}, not a str; pass texts as strings")
        if max_len < 2:
            raise ValueError(f"max_len={max_len} leaves no room for the [CLS] and [SEP] tokens; use >= 2")
        # tokenizers cuts the words and still adds the special tokens ([CLS] ... [SEP]) after them
        self.hf.enable_truncation(max_length=max_len)
        try:
            return [enc.ids for enc in self.hf.encode_batch(list(texts))]
        finally:
            self.hf.no_truncation()

    def pad(self, rows):
        """list of B id lists -> ids [B, T] int64, mask [B, T] bool, T = the longest row."""
        T = max((len(r) for r in rows), default=0)
        ids = np.full((len(rows), T), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), T), dtype=bool)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = r
            mask[b, :len(r)] = True
        return ids, mask

    def encode_batch(self, texts, max_len=None):
        """list of B strings -> ids [B, T] int64, mask [B, T] bool (right padding)."""
        return self.pad(self.encode(texts, max_len))
