"""The lexical expert: hashed word and WordPiece n-grams, sublinear TF-IDF, a penalised multinomial logistic
regression fitted full-batch by Newton-CG. The team's near-free tier 0.

    text -> lowercased words (regex \\w\\w+, the whole text) and WordPiece ids (the encoders' tokenizer, untruncated)
         -> n-grams: word 1- and 2-grams and WordPieces, each hashed to a bucket in [0, NB)
         -> x_j = (1 + log tf_j) * idf_j, then x / |x|_2           (sublinear TF-IDF, Salton and Buckley 1988)
         -> logits = x W + b  [C]                                     W [NB, C] (a row per bucket), b [C]

Hashing. A word is reduced to 32 bits by CRC-32 of its UTF-8 bytes, a WordPiece is its id. An n-gram of
tokens t_1..t_n gets the key h = ((t_1 G + t_2) G + ...) + kind K + seed S (64-bit wrap-around; kind tells word
from WordPiece n-grams and the order n apart) and the bucket splitmix64(h) mod NB. Different seeds give
independent bucket layouts; the same seed gives the same layout on every machine.

Weighting. idf_j = log((1 + N) / (1 + df_j)) + 1 over the N training texts (df_j: texts holding bucket j), and
idf_j = 0 for a bucket no training text holds, so an unseen n-gram neither scores nor dilutes the norm. These
are the weights of scikit-learn's TfidfVectorizer(sublinear_tf=True), the baseline this expert is held to.

Fit. The loss is the mean cross-entropy plus (lam/2)|W|^2 (lexical_solver.py has the gradient, the
Hessian-vector product and the Newton-CG). lam = 1 / (c N) mirrors scikit-learn's C: c is picked from
cfg.c_grid on a stratified hold-out of the training rows (warm-started from the strongest penalty down), then
the model is refitted on every row. The fit touches only the buckets the training texts hold.

Cost. Inference hashes each n-gram, weights it and adds its C weights: ~(55 + 2C) operations per n-gram
occurrence (flops() below), some 10^4 per AG News text against the encoders' 10^9. On disk: idf [NB] and
W [NB, C] in float32, 4 NB (1 + C) bytes (5.2 MB at NB = 2^18, C = 4). `python -m minislm.experts.lexical_eval`
measures it against scikit-learn's TF-IDF + logistic regression.
"""
import json
import re
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from minislm.atomic import save_safetensors, write_json
from minislm.experts.lexical_solver import Problem, csr_matmul, newton_cg
from minislm.kernels.activations import SOFTMAX_FLOPS_PER_ELEM, softmax_np

WORD = re.compile(r"\w\w+")          # scikit-learn's default token pattern: runs of 2+ word characters
GOLD = np.uint64(0x9E3779B97F4A7C15)
KIND = np.uint64(0xD1B54A32D192ED03)
SEED = np.uint64(0x94D049BB133111EB)
WORD_KIND, PIECE_KIND = 0, 8         # kind of an n-gram = base + n: word 1-gram = 1, WordPiece 2-gram = 10

# Operations per n-gram occurrence at inference (FLOP = 2 x multiply-add, integer ops counted alike):
HASH_OPS = 50     # CRC-32 of the word (~4 ops a byte over ~8 bytes), the key (2 per token), splitmix64 (8), mod, count
WEIGHT_OPS = 5    # log, times idf, square and add into the norm, scale by 1 / norm


@dataclass(frozen=True)
class LexicalConfig:
    vocab_size: int = 30522      # V: WordPiece vocabulary of the tokenizer the ids come from
    n_buckets: int = 1 << 18     # NB: hash buckets shared by every n-gram (262,144: a 5 MB model at C = 4)
    seed: int = 0                # hash seed (the hold-out split is seeded by fit's seed)
    n_classes: int = 4           # C
    special_ids: tuple = (0, 100, 101, 102, 103)  # [PAD] [UNK] [CLS] [SEP] [MASK]: not n-grams
    word_ngrams: int = 2         # word n-grams of orders 1..this (0: no word features)
    piece_ngrams: int = 1        # WordPiece n-grams of orders 1..this (0: none; 2 measured no better)
    c_grid: tuple = (10.0, 30.0, 100.0)  # inverse penalties tried (lam = 1 / (c N)), as scikit-learn's C; c = 3
                                         # never won the hold-out on AG News or IMDB and cost a fifth of a fit
    val_fraction: float = 0.15   # share of the training rows held out to pick c


def splitmix64(x):
    """uint64 array -> uint64 array: the splitmix64 finaliser (a bijective bit mixer)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def ngram_buckets(tokens, doc, n, kind, n_buckets, seed):
    """tokens [m] uint64, doc [m] (non-decreasing text index of each token) -> (buckets [k], doc [k]) of every
    n-gram that stays inside one text, in order."""
    m = len(tokens) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    inside = doc[:m] == doc[n - 1:]
    with np.errstate(over="ignore"):
        h = tokens[:m].copy()
        for j in range(1, n):
            h = h * GOLD + tokens[j:j + m]
        h = h + np.uint64(kind) * KIND + np.uint64(seed) * SEED
    return (splitmix64(h[inside]) % np.uint64(n_buckets)).astype(np.int64), doc[:m][inside]


def word_tokens(texts):
    """B texts -> (CRC-32 of each lowercased word [m] uint64, text index of each [m])."""
    words = [[zlib.crc32(w.encode("utf-8")) for w in WORD.findall(t.lower())] for t in texts]
    return _flatten(words)


def piece_tokens(tokenizer, texts, special_ids):
    """B texts -> (WordPiece ids of each text, specials dropped, nothing truncated [m] uint64, text index [m])."""
    special = set(special_ids)
    encs = tokenizer.hf.encode_batch(list(texts), add_special_tokens=False) if len(texts) else []
    return _flatten([[i for i in e.ids if i not in special] for e in encs])


def _flatten(lists):
    doc = np.repeat(np.arange(len(lists), dtype=np.int64), [len(x) for x in lists])
    flat = np.fromiter((v for x in lists for v in x), dtype=np.uint64, count=len(doc))
    return flat, doc


def occurrences(texts, tokenizer, cfg):
    """B texts -> CSR (offsets [B+1], rows [nnz]): the bucket of every n-gram occurrence, text by text."""
    parts = []
    for (tokens, doc), kind, top in ((word_tokens(texts), WORD_KIND, cfg.word_ngrams),
                                     (piece_tokens(tokenizer, texts, cfg.special_ids), PIECE_KIND, cfg.piece_ngrams)):
        parts += [ngram_buckets(tokens, doc, n, kind + n, cfg.n_buckets, cfg.seed) for n in range(1, top + 1)]
    rows = np.concatenate([p[0] for p in parts] + [np.zeros(0, dtype=np.int64)])
    doc = np.concatenate([p[1] for p in parts] + [np.zeros(0, dtype=np.int64)])
    order = np.argsort(doc, kind="stable")
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(np.bincount(doc, minlength=len(texts)))
    return offsets, rows[order]


def term_counts(offsets, rows, n_buckets):
    """CSR occurrences -> (doc [u], bucket [u], count [u]): each distinct (text, bucket) pair, sorted."""
    doc = np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets))
    keys, counts = np.unique(doc * n_buckets + rows, return_counts=True)
    return keys // n_buckets, keys % n_buckets, counts


def fit_idf(doc, bucket, n_docs, n_buckets):
    """Distinct (text, bucket) pairs of n_docs training texts -> idf [NB] float32 (0 where df = 0)."""
    df = np.bincount(bucket, minlength=n_buckets)
    idf = np.log((1.0 + n_docs) / (1.0 + df)) + 1.0
    return np.where(df > 0, idf, 0.0).astype(np.float32)


def tfidf_rows(doc, bucket, count, idf, n_docs, dtype=np.float32):
    """Distinct (text, bucket, count) triples, idf [NB] -> CSR (indptr [B+1], cols [nnz], vals [nnz]) of the
    L2-normalised sublinear TF-IDF rows; buckets of idf 0 are dropped."""
    vals = (1.0 + np.log(count)) * idf[bucket].astype(np.float64)
    keep = vals > 0
    doc, bucket, vals = doc[keep], bucket[keep], vals[keep]
    norm = np.sqrt(np.bincount(doc, weights=vals * vals, minlength=n_docs))
    vals = vals / norm[doc]
    indptr = np.zeros(n_docs + 1, dtype=np.int64)
    indptr[1:] = np.cumsum(np.bincount(doc, minlength=n_docs))
    return indptr, bucket.astype(np.int64), vals.astype(dtype)


def holdout_split(labels, fraction, seed):
    """labels [B] -> (fit rows, held-out rows): about `fraction` of each class with 2+ rows held out."""
    rng = np.random.default_rng(seed)
    fit, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = min(max(int(round(fraction * len(idx))), 1), len(idx) - 1)   # a one-row class stays in the fit
        val.append(idx[:k])
        fit.append(idx[k:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(val))


class LexicalModel:
    """A trained (or trainable) lexical expert with its tokenizer."""

    def __init__(self, cfg, params, tokenizer, label_names=None):
        self.cfg = cfg                  # LexicalConfig
        self.params = params            # {"idf": [NB], "w": [NB, C], "b": [C]}, float32
        self.tokenizer = tokenizer      # minislm.encoder.tokenizer.Tokenizer (the encoders' WordPiece)
        self.label_names = list(label_names or range(cfg.n_classes))
        self.info = {}                  # what the last fit did: chosen c, hold-out accuracies, solver steps

    @classmethod
    def create(cls, tokenizer, n_classes, label_names=None, **kw):
        """A zero model over LexicalConfig(**kw); fit() trains it."""
        cfg = LexicalConfig(vocab_size=tokenizer.hf.get_vocab_size(), n_classes=n_classes, **kw)
        params = {"idf": np.zeros(cfg.n_buckets, dtype=np.float32),
                  "w": np.zeros((cfg.n_buckets, n_classes), dtype=np.float32),
                  "b": np.zeros(n_classes, dtype=np.float32)}
        return cls(cfg, params, tokenizer, label_names)

    def bags(self, texts):
        """B texts -> CSR (offsets [B+1], rows [nnz]): the bucket of every n-gram occurrence of each text."""
        return occurrences(texts, self.tokenizer, self.cfg)

    def features(self, texts, dtype=np.float32):
        """B texts -> CSR (indptr [B+1], cols [nnz], vals [nnz]): the normalised TF-IDF rows."""
        offsets, rows = self.bags(texts)
        return tfidf_rows(*term_counts(offsets, rows, self.cfg.n_buckets), self.params["idf"], len(texts), dtype)

    def bag(self, texts):
        """B texts -> class scores x W + b [B, C]: the dense summary of a text a linear model has (D = C)."""
        return csr_matmul(*self.features(texts), self.params["w"]) + self.params["b"]

    def predict_proba(self, texts):
        """B texts -> probabilities [B, C]."""
        return softmax_np(self.bag(texts))

    def flops(self, offsets):
        """CSR offsets [B+1] -> FLOPs per text [B]: per n-gram occurrence its hash, weight and C multiply-adds
        (distinct n-grams are at most the occurrences, so this bounds the sparse dot from above), then the
        norm's square root, the bias and the softmax."""
        n = np.diff(offsets)
        C = self.cfg.n_classes
        return n * (HASH_OPS + WEIGHT_OPS + 2 * C) + 1 + C + SOFTMAX_FLOPS_PER_ELEM * C

    def fit(self, texts, labels, epochs=10, lr=1.0, seed=0, progress=None):
        """Pick c on a hold-out, refit on every row -> self.
        epochs: Newton steps per fit (each one a CG solve of a few dozen passes over the rows; 10 is ample).
        lr: the first step length the line search tries (1.0, the full Newton step).
        seed: the hold-out split (the fit itself has no randomness)."""
        cfg, C, NB = self.cfg, self.cfg.n_classes, self.cfg.n_buckets
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels; give one label per text")
        if labels.size and (labels.min() < 0 or labels.max() >= C):
            raise ValueError(f"labels must lie in 0..{C - 1}, found {labels.min()}..{labels.max()}")
        doc, bucket, count = term_counts(*self.bags(texts), NB)

        def subset(rows):
            """sorted training rows [k] -> their distinct (text, bucket, count) triples, texts renumbered 0..k-1."""
            take = np.isin(doc, rows)
            return np.searchsorted(rows, doc[take]), bucket[take], count[take]

        def solve(rows, c, start=None):
            """rows of the training set, inverse penalty c -> (idf [NB], w [NB, C], b [C], solver info)."""
            d, bk, ct = subset(rows)
            idf = fit_idf(d, bk, len(rows), NB)
            indptr, cols, vals = tfidf_rows(d, bk, ct, idf, len(rows), np.float64)
            used, local = np.unique(cols, return_inverse=True)      # fit only the buckets these rows hold
            theta = np.zeros((len(used) + 1, C))
            if start is not None:
                theta[:-1], theta[-1] = start[0][used], start[1]
            prob = Problem((indptr, local.astype(np.int64), vals), labels[rows], C, len(used), 1.0 / (c * len(rows)))
            theta, info = newton_cg(prob, theta, max_newton=epochs, step0=lr)
            w = np.zeros((NB, C))
            w[used] = theta[:-1]
            return idf, w, theta[-1], info

        fit_rows, val_rows = holdout_split(labels, cfg.val_fraction, seed)
        grid = sorted(cfg.c_grid)
        chosen, scores, start = grid[len(grid) // 2], {}, None
        if len(grid) > 1 and len(val_rows) and len(np.unique(labels[fit_rows])) > 1:
            for c in grid:                              # strongest penalty first: each fit warm-starts the next
                idf, w, b, info = solve(fit_rows, c, start)
                start = (w, b)
                Xv = tfidf_rows(*subset(val_rows), idf, len(val_rows))
                scores[c] = float(((csr_matmul(*Xv, w) + b).argmax(1) == labels[val_rows]).mean())
                if progress:
                    progress(f"lexical c={c:g}: hold-out accuracy {scores[c]:.4f} ({info['cg_steps']} CG steps)")
            chosen = max(grid, key=lambda c: (scores[c], -c))   # ties go to the stronger penalty
        idf, w, b, info = solve(np.arange(len(labels)), chosen)    # cold: measured faster than from the hold-out fit
        self.params = {"idf": idf, "w": w.astype(np.float32), "b": b.astype(np.float32)}
        self.info = dict(info, c=chosen, holdout_accuracy=scores)
        if progress:
            progress(f"lexical refit on {len(labels)} rows at c={chosen:g}: loss {info['loss']:.4f}")
        return self

    def state(self):
        """-> (arrays {"idf", "w", "b"}, JSON-able meta): what a checkpoint stores of this expert."""
        arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.params.items()}
        return arrays, {"config": asdict(self.cfg), "label_names": self.label_names}

    @classmethod
    def from_state(cls, arrays, meta, tokenizer):
        """Inverse of state(), checked against the tokenizer it will read with."""
        c = meta["config"]
        if "table" in arrays or "dim" in c:
            raise ValueError("these arrays hold the earlier embedding-bag lexical expert (a 'table'); this "
                             "version is a TF-IDF linear model: retrain the lexical expert")
        cfg = LexicalConfig(**dict(c, special_ids=tuple(c["special_ids"]), c_grid=tuple(c["c_grid"])))
        if tokenizer.hf.get_vocab_size() != cfg.vocab_size:
            raise ValueError(f"the lexical expert was trained on a {cfg.vocab_size}-word vocabulary, the "
                             f"tokenizer given has {tokenizer.hf.get_vocab_size()}")
        want = {"idf": (cfg.n_buckets,), "w": (cfg.n_buckets, cfg.n_classes), "b": (cfg.n_classes,)}
        for k, shape in want.items():
            if k not in arrays or tuple(arrays[k].shape) != shape or arrays[k].dtype != np.float32:
                found = None if k not in arrays else (tuple(arrays[k].shape), str(arrays[k].dtype))
                raise ValueError(f"lexical array {k!r} should be float32 {shape}, found {found}")
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
