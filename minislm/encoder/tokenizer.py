"""Text -> token ids with the model's own `tokenizer.json`, truncated and padded by minislm.

The `tokenizers` library does the WordPiece work (normalising, splitting, special tokens). Any padding or
truncation baked into the file is switched off: minislm truncates to the model's maximum positions (the special
tokens kept) and pads every batch to its own longest row, so a batch never carries more padding than it
needs.

A long text is cut at its end by default. With head=h it keeps its first h and its last max_len - h - specials
tokens instead: for reviews that state the verdict at the end, Sun et al. 2019 ("How to Fine-Tune BERT for
Text Classification?") found head 128 + tail 382 best on IMDB, ahead of head-only and tail-only.
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

    def encode(self, texts, max_len=None, head=None):
        """list of B strings -> list of B id lists, each cut to max_len (default: the model's limit).

        head None: a long text keeps its beginning. head h: it keeps its first h and its last
        max_len - h - (the special tokens) content tokens, the special tokens ([CLS] ... [SEP]) kept.
        """
        max_len = self.max_len if max_len is None else min(int(max_len), self.max_len)
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings; wrap a single text as [text]")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text {i} is a {type(t).__name__}, not a str; pass texts as strings")
        if max_len < 2:
            raise ValueError(f"max_len={max_len} leaves no room for the [CLS] and [SEP] tokens; use >= 2")
        if head is not None:
            return [self.head_tail(enc, max_len, int(head)) for enc in self.hf.encode_batch(list(texts))]
        # tokenizers cuts the words and still adds the special tokens ([CLS] ... [SEP]) after them
        self.hf.enable_truncation(max_length=max_len)
        try:
            return [enc.ids for enc in self.hf.encode_batch(list(texts))]
        finally:
            self.hf.no_truncation()

    @staticmethod
    def head_tail(enc, max_len, head):
        """One untruncated tokenizers Encoding -> its ids cut to max_len: leading and trailing special tokens
        kept, then the first `head` and the last (max_len - specials - head) content tokens."""
        ids, special = enc.ids, enc.special_tokens_mask
        if len(ids) <= max_len:
            return list(ids)
        lead = next((i for i, s in enumerate(special) if not s), len(ids))
        trail = next((i for i, s in enumerate(reversed(special)) if not s), 0)
        budget = max_len - lead - trail
        if not 0 <= head <= budget:
            raise ValueError(f"head={head} must lie in 0..{budget} (max_len {max_len} minus {lead + trail} "
                             f"special tokens)")
        content = ids[lead:len(ids) - trail]
        tail = content[len(content) - (budget - head):] if budget > head else []
        return list(ids[:lead]) + list(content[:head]) + list(tail) + list(ids[len(ids) - trail:])

    def pad(self, rows):
        """list of B id lists -> ids [B, T] int64, mask [B, T] bool, T = the longest row."""
        T = max((len(r) for r in rows), default=0)
        ids = np.full((len(rows), T), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), T), dtype=bool)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = r
            mask[b, :len(r)] = True
        return ids, mask

    def encode_batch(self, texts, max_len=None, head=None):
        """list of B strings -> ids [B, T] int64, mask [B, T] bool (right padding); head as in encode."""
        return self.pad(self.encode(texts, max_len, head))
