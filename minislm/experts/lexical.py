"""The lexical expert: a fastText-style bag of n-grams (Joulin et al. 2016), the team's near-free tier 0.

    text -> WordPiece ids (the encoders' own tokenizer) -> unigram rows + hashed bigram rows
         -> bag = mean of those rows of one embedding table E [V + NB, D] -> logits = bag W^T + b  [C]

A bigram (a, b) of ids goes to bucket hash(a, b) mod NB, where hash is the splitmix64 finaliser applied to
a * 0x9E3779B97F4A7C15 + b + seed * 0xD1B54A32D192ED03 (64-bit wrap-around). Different seeds give independent
bucket layouts; the same seed gives the same layout on every machine.

The backward is sparse: only the rows a batch touched get a gradient (returned as unique row ids + rows),
so one SGD step costs what the batch's n-grams cost, not the table's size. The bag [B, D] joins the
collaboration like an encoder's pooled features; the probabilities join logit-level fusion.
"""
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from minislm.atomic import save_safetensors, write_json
from minislm.kernels.activations import log_softmax_np, softmax_np

MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class LexicalConfig:
    vocab_size: int = 30522      # V: WordPiece vocabulary of the tokenizer the ids come from
    n_buckets: int = 1 << 16     # NB: hash buckets for bigrams (65,536: a 6 MB model at D=16)
    dim: int = 16                # D: width of the bag vector
    seed: int = 0                # hash seed (and init seed)
    n_classes: int = 4           # C
    special_ids: tuple = (0, 100, 101, 102, 103)  # [PAD] [UNK] [CLS] [SEP] [MASK]: not n-grams


def splitmix64(x):
    """uint64 array -> uint64 array: the splitmix64 finaliser (a bijective bit mixer)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def bigram_buckets(a, b, n_buckets, seed):
    """ids a [n], b [n] -> bucket of each bigram (a_i, b_i) in [0, n_buckets)."""
    with np.errstate(over="ignore"):
        key = (np.asarray(a, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.asarray(b, dtype=np.uint64)
               + np.uint64(seed) * np.uint64(0xD1B54A32D192ED03))
    return (splitmix64(key) % np.uint64(n_buckets)).astype(np.int64)


def ngram_rows(ids, cfg):
    """One text's WordPiece ids -> its table rows [n]: unigrams, then V + bucket of each bigram."""
    ids = np.asarray([i for i in ids if i not in cfg.special_ids], dtype=np.int64)
    if len(ids) < 2:
        return ids
    return np.concatenate([ids, cfg.vocab_size + bigram_buckets(ids[:-1], ids[1:], cfg.n_buckets, cfg.seed)])


def pack(rows_list):
    """B row arrays -> (offsets [B+1], rows [nnz]): a CSR layout of the bags."""
    offsets = np.zeros(len(rows_list) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows_list])
    rows = np.concatenate(rows_list) if rows_list else np.zeros(0, dtype=np.int64)
    return offsets, rows.astype(np.int64)


def bag_forward(table, offsets, rows):
    """table [R, D], CSR bags -> bag [B, D]: the mean of each bag's rows (zeros for an empty bag)."""
    B = len(offsets) - 1
    counts = np.diff(offsets)
    seg = np.repeat(np.arange(B), counts)
    bag = np.zeros((B, table.shape[1]), dtype=table.dtype)
    np.add.at(bag, seg, table[rows])
    return bag / np.maximum(counts, 1)[:, None].astype(table.dtype)


def bag_backward(dbag, offsets, rows):
    """dbag [B, D] -> (unique rows [U], their gradient [U, D]): each touched row gets dbag / bag size,
    summed over every place it occurs."""
    counts = np.diff(offsets)
    seg = np.repeat(np.arange(len(counts)), counts)
    per_entry = dbag[seg] / np.maximum(counts, 1)[seg, None].astype(dbag.dtype)   # [nnz, D]
    uniq, inverse = np.unique(rows, return_inverse=True)
    grad = np.zeros((len(uniq), dbag.shape[1]), dtype=dbag.dtype)
    np.add.at(grad, inverse, per_entry)
    return uniq, grad


def init_params(cfg, rng):
    R = cfg.vocab_size + cfg.n_buckets
    return {"table": rng.uniform(-1.0 / cfg.dim, 1.0 / cfg.dim, (R, cfg.dim)).astype(np.float32),
            "w": np.zeros((cfg.n_classes, cfg.dim), dtype=np.float32),   # fastText starts the output at zero
            "b": np.zeros(cfg.n_classes, dtype=np.float32)}


def forward(params, offsets, rows):
    """-> bag [B, D], logits [B, C]."""
    bag = bag_forward(params["table"], offsets, rows)
    return bag, bag @ params["w"].T + params["b"]


def backward(params, offsets, rows, bag, dlogits):
    """dlogits [B, C] -> grads {"table": (unique rows, [U, D]), "w": [C, D], "b": [C]}."""
    dbag = dlogits @ params["w"]
    return {"table": bag_backward(dbag, offsets, rows), "w": dlogits.T @ bag, "b": dlogits.sum(axis=0)}


def softmax_xent(logits, labels):
    """logits [B, C], labels [B] -> (mean loss, dlogits [B, C])."""
    B = len(labels)
    logp = log_softmax_np(logits)
    d = np.exp(logp)
    d[np.arange(B), labels] -= 1
    return float(-logp[np.arange(B), labels].mean()), d / B


class LexicalModel:
    """A trained (or trainable) lexical expert with its tokenizer."""

    def __init__(self, cfg, params, tokenizer, label_names=None):
        self.cfg = cfg                  # LexicalConfig
        self.params = params            # {"table": [V+NB, D], "w": [C, D], "b": [C]}
        self.tokenizer = tokenizer      # minislm.tokenizer.Tokenizer (the encoders' WordPiece)
        self.label_names = list(label_names or range(cfg.n_classes))

    @classmethod
    def create(cls, tokenizer, n_classes, label_names=None, **kw):
        cfg = LexicalConfig(vocab_size=tokenizer.hf.get_vocab_size(), n_classes=n_classes, **kw)
        return cls(cfg, init_params(cfg, np.random.default_rng(cfg.seed)), tokenizer, label_names)

    def bags(self, texts, max_len=512):
        """B texts -> CSR (offsets [B+1], rows [nnz])."""
        return pack([ngram_rows(ids, self.cfg) for ids in self.tokenizer.encode(texts, max_len)])

    def bag(self, texts):
        """B texts -> bag vectors [B, D] (the features the collaboration sees)."""
        return bag_forward(self.params["table"], *self.bags(texts))

    def predict_proba(self, texts):
        """B texts -> probabilities [B, C]."""
        return softmax_np(forward(self.params, *self.bags(texts))[1])

    def flops(self, offsets):
        """CSR offsets -> FLOPs per sample [B]: bigram hashing, the bag's adds and mean, the classifier."""
        n = np.diff(offsets)
        n_bigrams = np.maximum(n - 1, 0) // 2          # n rows = u unigrams + (u - 1) bigrams
        hash_ops = 12 * n_bigrams                      # splitmix64: 3 shifts, 3 xors, 2 multiplies, key 4
        bag_ops = n * self.cfg.dim + self.cfg.dim      # add each row, divide once per dimension
        head_ops = 2 * self.cfg.dim * self.cfg.n_classes + self.cfg.n_classes
        return hash_ops + bag_ops + head_ops

    def fit(self, texts, labels, epochs=10, lr=1.0, batch_size=16, seed=0, progress=None):
        """fastText-style training: SGD with a linearly decaying rate, sparse updates of touched rows only."""
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels; give one label per text")
        if labels.size and (labels.min() < 0 or labels.max() >= self.cfg.n_classes):
            raise ValueError(f"labels must lie in 0..{self.cfg.n_classes - 1}, found {labels.min()}..{labels.max()}")
        row_lists = [ngram_rows(ids, self.cfg) for ids in self.tokenizer.encode(texts, 512)]
        rng = np.random.default_rng(seed)
        steps = epochs * ((len(texts) + batch_size - 1) // batch_size)
        step = 0
        p = self.params
        for epoch in range(epochs):
            order = rng.permutation(len(texts))
            total = 0.0
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                offsets, rows = pack([row_lists[i] for i in idx])
                bag, logits = forward(p, offsets, rows)
                loss, dlogits = softmax_xent(logits, labels[idx])
                g = backward(p, offsets, rows, bag, dlogits * len(idx))  # per-example steps, as in fastText
                rate = np.float32(lr * (1.0 - step / steps))
                uniq, grows = g["table"]
                p["table"][uniq] -= rate * grows
                p["w"] -= rate * g["w"] / len(idx)
                p["b"] -= rate * g["b"] / len(idx)
                total += loss * len(idx)
                step += 1
            if progress:
                progress(f"lexical epoch {epoch + 1}/{epochs}: loss {total / len(texts):.4f}")
        return self

    def state(self):
        """-> (arrays {"table", "w", "b"}, JSON-able meta): what a checkpoint stores of this expert."""
        arrays = {k: np.ascontiguousarray(v) for k, v in self.params.items()}
        return arrays, {"config": asdict(self.cfg), "label_names": self.label_names}

    @classmethod
    def from_state(cls, arrays, meta, tokenizer):
        """Inverse of state(), checked against the tokenizer it will read with."""
        c = meta["config"]
        cfg = LexicalConfig(**dict(c, special_ids=tuple(c["special_ids"])))
        if tokenizer.hf.get_vocab_size() != cfg.vocab_size:
            raise ValueError(f"the lexical expert was trained on a {cfg.vocab_size}-word vocabulary, the "
                             f"tokenizer given has {tokenizer.hf.get_vocab_size()}")
        want = {"table": (cfg.vocab_size + cfg.n_buckets, cfg.dim), "w": (cfg.n_classes, cfg.dim),
                "b": (cfg.n_classes,)}
        for k, shape in want.items():
            if k not in arrays or tuple(arrays[k].shape) != shape:
                found = None if k not in arrays else tuple(arrays[k].shape)
                raise ValueError(f"lexical array {k!r} should be {shape}, found {found}")
        return cls(cfg, {k: arrays[k] for k in want}, tokenizer, meta["label_names"])

    def save(self, folder):
        """-> folder/lexical.safetensors + folder/lexical.json (atomic): the expert on its own."""
        arrays, meta = self.state()
        save_safetensors(Path(folder) / "lexical.safetensors", arrays)
        write_json(Path(folder) / "lexical.json", meta)

    @classmethod
    def load(cls, folder, tokenizer):
        from safetensors.numpy import load_file

        folder = Path(folder)
        meta = json.loads((folder / "lexical.json").read_text(encoding="utf-8"))
        return cls.from_state(load_file(str(folder / "lexical.safetensors")), meta, tokenizer)
