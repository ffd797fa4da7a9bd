"""Three ways to adapt a pretrained expert to a task, each a trainable view of its encoder.

    LoRA    (Hu et al. 2021) base weights frozen; each chosen linear y = x W^T + b gains a low-rank branch
            + (alpha / r) drop(x) A^T B^T, A [r, K] random, B [N, r] zero (training starts at the pretrained
            model). Query, key and value, fused into one [3H, H] matrix here, get an (A, B) each. merge() folds
            W + (alpha / r) B A into the packed weights: inference then costs nothing extra.
    top-k   only the top k layers train; the frozen layers below compute the same output for a text in every
            epoch, so that output is computed once and kept on disk (TopLayers.cache), and an epoch runs k layers.
    full    every tensor trains (the small experts: L3 has 17M parameters, L6 23M).

Shapes: B batch, T tokens, M = B T, H hidden, K / N a linear's input / output width, r the LoRA rank, L layers.
Each adaptation exposes the same small interface to the training loop (finetune.py):
    params                     {name: float32 array}, updated in place by the optimizer
    forward(ids, mask, idx)    -> (hidden states {l: [B, T, H]} for l = first_hidden .. L, state for backward)
    backward(state, d_hidden)  -> {name: gradient} matching params
    after_step()               re-packs what the optimizer changed
    encoder()                  -> an Encoder with everything merged in (for inference)
    delta()                    -> (arrays, meta): only what changed, float32, meta with the base weights' sha256
and apply(expert, arrays, meta) rebuilds the adapted expert from a delta, after checking the base.
"""
import contextlib
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from minislm import atomic
from minislm.encoder.backward import SparseRows, encoder_backward, encoder_params, layer_of, layer_param_names
from minislm.encoder.folder import attention_names, expected_shapes
from minislm.encoder.model import (Encoder, Workspace, additive_mask, embed, embedding_weights, layer_forward,
                                   layer_weights, relative_position_bias)
from minislm.encoder.pooling import pool_layers
from minislm.kernels.layout import transpose
from minislm.kernels.matmul import TransposedWeight, linear, pack_weight
from minislm.kernels.tiles import whole_panels

METHODS = ("lora", "topk", "full")
ATTENTION_TARGETS = ("qkv", "attn_out")
FFN_TARGETS = ("ffn_in", "ffn_out")
CACHE_FORMAT = 1  # bump when the layout of TopLayers' disk cache changes


def lora_targets(cfg, i, targets):
    """Layer i's LoRA targets -> {linear: [(Hugging Face module name, output rows slice)]}."""
    a, H, F = attention_names(cfg, i), cfg.hidden, cfg.ffn
    p = f"encoder.layer.{i}."
    blocks = {"qkv": [(a[part], slice(j * H, (j + 1) * H)) for j, part in enumerate(("query", "key", "value"))],
              "attn_out": [(a["out"], slice(0, H))],
              "ffn_in": [(p + "intermediate.dense", slice(0, F))],
              "ffn_out": [(p + "output.dense", slice(0, H))]}
    return {t: blocks[t] for t in targets}


class LoRALinear:
    """The LoRA branch of one linear: delta = (alpha / r) drop(x) A_j^T B_j^T on each block j of output rows.

    forward(x [M, K]) -> (delta [M, N], cache); backward(cache, x, dy [M, N], need_dx) -> (dx [M, K], grads):
        u = drop(x) A^T [M, r],  dB = s dy^T u,  du = s dy B,  dA = du^T drop(x),  dx = drop'(du A)
    (s = alpha / r), so the frozen W never gets a gradient. Every product runs on the GEMM kernel (matmul.py),
    the blocks of a fused linear (query, key, value) stacked into one product each (`_stacked`): NumPy's BLAS
    would start its own threads, which then spin beside Numba's on the same cores.
    """

    def __init__(self, blocks, K, rank, alpha, dropout, rng):
        self.names = [name for name, _ in blocks]
        self.slices = [sl for _, sl in blocks]
        self.N = max(sl.stop for sl in self.slices)
        bound = 1.0 / np.sqrt(K)  # peft's default: Kaiming-uniform A (a = sqrt 5), B = 0
        self.A = [rng.uniform(-bound, bound, (rank, K)).astype(np.float32) for _ in blocks]
        self.B = [np.zeros((sl.stop - sl.start, rank), dtype=np.float32) for sl in self.slices]
        self.scale = np.float32(alpha / rank)
        self.dropout = float(dropout)
        self.rng = None  # a Generator while training (dropout on), None for evaluation

    def params(self):
        out = {}
        for name, A, B in zip(self.names, self.A, self.B):
            out[name + ".lora_A"], out[name + ".lora_B"] = A, B
        return out

    def _dropped(self, x, keep):
        return x if keep is None else x * keep * np.float32(1.0 / (1.0 - self.dropout))

    def _stacked(self):
        # -> A_all [R', K]: every block's A stacked and zero-padded to whole panels (R' = whole_panels(blocks r)),
        # and B_all [N, R']: block j's s B_j in rows sl_j, columns j r .. j r + r, zero elsewhere (block-diagonal),
        # so that the branch is two GEMMs on the kernel's tiles: delta = (x A_all^T) B_all^T
        r = self.A[0].shape[0]
        width = whole_panels(r * len(self.A))
        A_all = np.zeros((width, self.A[0].shape[1]), dtype=np.float32)
        B_all = np.zeros((self.N, width), dtype=np.float32)
        for j, (sl, A, B) in enumerate(zip(self.slices, self.A, self.B)):
            A_all[j * r:(j + 1) * r] = A
            B_all[sl, j * r:(j + 1) * r] = self.scale * B
        return A_all, B_all

    def forward(self, x):
        keep = None
        if self.rng is not None and self.dropout > 0:
            keep = self.rng.random(x.shape, dtype=np.float32) >= self.dropout
        xd = self._dropped(x, keep)
        A_all, B_all = self._stacked()
        u = linear(xd, A_all)                                    # [M, R']
        return linear(u, B_all), (keep, u)                       # [M, N]

    def backward(self, cache, x, dy, need_dx):
        keep, u = cache
        xd = self._dropped(x, keep)
        A_all, B_all = self._stacked()
        r = self.A[0].shape[0]
        dB_all = linear(transpose(dy), TransposedWeight(u))     # [N, R'] = dy^T u (the s is in B_all's rows)
        du = linear(dy, TransposedWeight(B_all))                 # [M, R'] = s dy B per block
        dA_all = linear(transpose(du), TransposedWeight(xd))     # [R', K]
        grads = {}
        for j, (name, sl) in enumerate(zip(self.names, self.slices)):
            grads[name + ".lora_A"] = np.ascontiguousarray(dA_all[j * r:(j + 1) * r])
            grads[name + ".lora_B"] = self.scale * dB_all[sl, j * r:(j + 1) * r]
        if not need_dx:
            return None, grads
        return self._dropped(linear(du, TransposedWeight(A_all)), keep), grads

    def merge(self, w):
        """w [N, K] -> w + s B_j A_j on each block (a new array)."""
        w = np.array(w, dtype=np.float32)
        for sl, A, B in zip(self.slices, self.A, self.B):
            w[sl] += self.scale * (B @ A)
        return w


def _sha256_of_arrays(arrays):
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name], dtype=np.float32).tobytes())
    return h.hexdigest()


class LoRA:
    """LoRA branches on every layer's attention linears (and optionally the feed-forward's)."""
    method = "lora"

    def __init__(self, expert, rank=8, alpha=16.0, dropout=0.0, ffn=False, seed=0):
        cfg = expert.config
        self.expert, self.base = expert, expert.encoder
        self.rank, self.alpha, self.dropout, self.ffn = rank, alpha, dropout, ffn
        rng = np.random.default_rng(seed)
        targets = ATTENTION_TARGETS + (FFN_TARGETS if ffn else ())
        widths = {"qkv": cfg.hidden, "attn_out": cfg.hidden, "ffn_in": cfg.hidden, "ffn_out": cfg.ffn}
        self.adapters = [{t: LoRALinear(blocks, widths[t], rank, alpha, dropout, rng)
                          for t, blocks in lora_targets(cfg, i, targets).items()} for i in range(cfg.n_layers)]
        self.params = {}
        for layer in self.adapters:
            for a in layer.values():
                self.params.update(a.params())
        self.first_hidden = 0

    def train_mode(self, rng):
        """rng: a Generator for the branches' dropout, or None for evaluation."""
        for layer in self.adapters:
            for a in layer.values():
                a.rng = rng

    def forward(self, ids, mask, idx=None, keep=None):
        hidden, caches = self.base.forward(ids, mask, keep=True if keep is None else keep, adapters=self.adapters)
        return dict(enumerate(hidden)), (ids, mask, caches)

    def backward(self, state, d_hidden):
        ids, mask, caches = state
        return encoder_backward(self.base, ids, mask, caches, d_hidden, [], adapters=self.adapters)

    def after_step(self):
        pass  # the branches' arrays are the parameters themselves

    def encoder(self):
        """The base encoder with every branch folded into its packed weights: W + (alpha / r) B A."""
        layers = []
        for lw, adapters in zip(self.base.layers, self.adapters):
            fields = {}
            for target, a in adapters.items():
                fields[target + "_w"] = pack_weight(a.merge(getattr(lw, target + "_w").unpack()))
            layers.append(dataclasses.replace(lw, **fields))
        return Encoder(self.base.config, self.base.embeddings, layers, self.base.matmul_backend)

    def delta(self):
        arrays = {n: np.array(p, dtype=np.float32) for n, p in self.params.items()}
        meta = {"method": "lora", "base_sha256": self.expert.weights_sha256, "rank": self.rank,
                "alpha": self.alpha, "ffn": self.ffn, "delta_sha256": _sha256_of_arrays(arrays)}
        return arrays, meta


class Tensors:
    """Some of the encoder's own tensors train (full fine-tuning, or the top k layers); the rest stay frozen."""

    def __init__(self, expert, names, method):
        self.method = method
        self.expert, self.cfg = expert, expert.config
        self.all = encoder_params(expert.encoder)           # every tensor, copies: the base is never touched
        self.params = {n: self.all[n] for n in sorted(names)}
        self.layers = sorted({layer_of(n) for n in names})
        self.first_hidden = 0
        self.current = Encoder(self.cfg, expert.encoder.embeddings, list(expert.encoder.layers),
                               expert.encoder.matmul_backend)
        self.after_step()

    def train_mode(self, rng):
        pass  # the encoder has no dropout of its own here

    def forward(self, ids, mask, idx=None, keep=None):
        keep = range(max(self.layers[0], 0), self.cfg.n_layers) if keep is None else keep
        hidden, caches = self.current.forward(ids, mask, keep=keep)
        return dict(enumerate(hidden)), (ids, mask, caches)

    def backward(self, state, d_hidden):
        ids, mask, caches = state
        grads = encoder_backward(self.current, ids, mask, caches, d_hidden, self.params)
        return {n: g.dense(self.params[n].shape[0]) if isinstance(g, SparseRows) else g for n, g in grads.items()}

    def after_step(self):
        for i in self.layers:
            if i >= 0:
                self.current.layers[i] = layer_weights(self.cfg, self.all, i)
        if -1 in self.layers or 0 in self.layers and self.cfg.family == "mpnet":
            self.current.embeddings = embedding_weights(self.cfg, self.all)

    def encoder(self):
        return Encoder(self.cfg, self.current.embeddings, list(self.current.layers), self.current.matmul_backend)

    def delta(self):
        arrays = {n: np.array(p, dtype=np.float32) for n, p in self.params.items()}
        meta = {"method": self.method, "base_sha256": self.expert.weights_sha256,
                "delta_sha256": _sha256_of_arrays(arrays)}
        return arrays, meta


def full(expert):
    """Every tensor of the encoder trains."""
    return Tensors(expert, expected_shapes(expert.config), "full")


def top_layer_names(cfg, k):
    """The Hugging Face names of the top k layers' tensors."""
    if not 1 <= k <= cfg.n_layers:
        raise ValueError(f"top_k={k} must lie in 1..{cfg.n_layers} (this encoder's layers)")
    return [n for i in range(cfg.n_layers - k, cfg.n_layers) for names in layer_param_names(cfg, i).values()
            for n in names]


def run_layers(encoder, x, mask, start, keep=()):
    """x [B, T, H], the input of layer `start`, mask [B, T] -> (hidden [L+1-start, B, T, H] of layers start..L,
    caches: a list of L, the kept layers' intermediates, None elsewhere)."""
    cfg = encoder.config
    B, T, H = x.shape
    hidden = np.empty((cfg.n_layers + 1 - start, B, T, H), dtype=np.float32)
    hidden[0] = x
    caches = [None] * cfg.n_layers
    mask_add = additive_mask(mask)
    pos_bias = None
    if encoder.embeddings.relative_bias is not None:
        pos_bias = relative_position_bias(cfg, encoder.embeddings.relative_bias, T)
    ws = Workspace.allocate(cfg, B, T)
    for i in range(start, cfg.n_layers):
        caches[i] = layer_forward(cfg, encoder.layers[i], hidden[i - start], mask_add, pos_bias,
                                  hidden[i - start + 1], ws, i in keep, encoder.matmul_backend)
    return hidden, caches


def cache_bytes(cfg, k, n_tokens, n_texts, dtype=np.float16, pooled=False):
    """Disk bytes of TopLayers.cache for top-k of an encoder over n_texts texts holding n_tokens real tokens."""
    start = cfg.n_layers - k
    return n_tokens * cfg.hidden * np.dtype(dtype).itemsize + (
        n_texts * (start + 1) * 2 * cfg.hidden * 4 if pooled else 0) + 8 * (n_texts + 1)


class TopLayers(Tensors):
    """The top k layers train. With cache(), the frozen layers' output (the input of layer L - k, real tokens
    only) and their pooled states are computed once and read back from disk; without it every step runs them."""

    def __init__(self, expert, k):
        super().__init__(expert, top_layer_names(expert.config, k), "topk")
        self.k, self.start = k, expert.config.n_layers - k
        self.cached = None

    def cache(self, rows, batches, pad, work_dir, texts_hash, max_len, dtype=np.float16, log=print, pooled=True):
        """rows: the token-id lists of the texts that forward's idx refers to; batches: the index batches the
        cache is computed in (the training batches, so a batch's padded length, and hence every float, matches a
        run without the cache); pad(rows) -> ids, mask. pooled: also keep every frozen layer's pooled states
        (only a layer-mix head reads them). Files go to work_dir/topk-<key>/, key = sha256 of the weights'
        sha256, texts_hash, max_len, the start layer, dtype and pooled; an existing complete cache is reused.

        Disk: every real token's H values in `dtype` (float16: 2 H bytes a token), plus (L - k + 1) 2H float32
        per text when pooled (`cache_bytes`). Memory: both arrays are filled through memory maps batch by
        batch and read back memory-mapped, so a process holds one batch of them at a time."""
        cfg, H = self.cfg, self.cfg.hidden
        key = hashlib.sha256(json.dumps([CACHE_FORMAT, self.expert.weights_sha256, texts_hash, max_len, self.start,
                                         np.dtype(dtype).name, bool(pooled)]).encode()).hexdigest()[:20]
        folder = Path(work_dir) / f"topk-{key}"
        done = folder / "done.json"
        names = ("tokens", "offsets", "pooled") if pooled else ("tokens", "offsets")
        if not done.exists():
            lengths = np.array([len(r) for r in rows])
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            folder.mkdir(parents=True, exist_ok=True)
            with contextlib.ExitStack() as stack:
                tmp = {n: stack.enter_context(atomic.atomic_path(folder / f"{n}.npy")) for n in names}
                tokens = np.lib.format.open_memmap(tmp["tokens"], mode="w+", dtype=dtype, shape=(int(offsets[-1]), H))
                np.save(tmp["offsets"], offsets, allow_pickle=False)
                store = (np.lib.format.open_memmap(tmp["pooled"], mode="w+", dtype=np.float32,
                                                   shape=(len(rows), self.start + 1, 2 * H)) if pooled else None)
                base = _bottom(self.expert.encoder, self.start)
                for b in batches:
                    ids, mask = pad([rows[i] for i in b])
                    hidden, _ = run_layers(base, embed(cfg, base.embeddings, ids), mask, 0)
                    if pooled:
                        store[b] = pool_layers(hidden, mask)
                    for j, i in enumerate(b):
                        tokens[offsets[i]:offsets[i + 1]] = hidden[-1, j, :lengths[i]]
                for arr in (tokens, store):
                    if arr is not None:
                        arr.flush()
                del tokens, store
            atomic.write_json(done, {"rows": len(rows), "start_layer": self.start, "dtype": np.dtype(dtype).name,
                                     "pooled": bool(pooled)})
            log(f"top-{self.k}: cached layers 0..{self.start - 1}' output of {len(rows)} texts in {folder} "
                f"({sum((folder / f'{n}.npy').stat().st_size for n in names) / 1e6:.0f} MB)")
        self.cached = {name: np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in names}
        return folder

    def forward(self, ids, mask, idx=None, keep=None):
        if self.cached is None or idx is None:
            return super().forward(ids, mask, idx, keep)
        B, T = ids.shape
        x = np.zeros((B, T, self.cfg.hidden), dtype=np.float32)
        off = self.cached["offsets"]
        for j, i in enumerate(idx):
            x[j, :off[i + 1] - off[i]] = self.cached["tokens"][off[i]:off[i + 1]]
        keep = range(self.start, self.cfg.n_layers) if keep is None else keep
        hidden, caches = run_layers(self.current, x, mask, self.start, keep)
        states = dict(enumerate(hidden, start=self.start))
        if "pooled" in self.cached:
            states["pooled_below"] = np.asarray(self.cached["pooled"][idx])  # [B, start + 1, 2H]
        return states, (ids, mask, caches)


def _bottom(encoder, n):
    """The encoder cut to its first n layers (weights shared)."""
    cfg = dataclasses.replace(encoder.config, n_layers=n)
    return Encoder(cfg, encoder.embeddings, encoder.layers[:n], encoder.matmul_backend)


def make(expert, method, rank=8, alpha=16.0, dropout=0.0, ffn=False, top_k=2, seed=0):
    """expert, "lora" | "topk" | "full" -> the adaptation."""
    if method == "lora":
        return LoRA(expert, rank, alpha, dropout, ffn, seed)
    if method == "topk":
        return TopLayers(expert, top_k)
    if method == "full":
        return full(expert)
    raise ValueError(f"method {method!r} is unknown; use one of {', '.join(METHODS)}")


def apply(expert, arrays, meta):
    """expert, a delta (arrays, meta) from delta() -> the adapted Expert, its encoder with the delta merged in.

    The delta must have been trained on these very base weights (meta's base_sha256). The adapted expert's
    weights_sha256 is derived from the base's and the delta's, so caches keyed on it never mix the two.
    """
    if meta.get("base_sha256") != expert.weights_sha256:
        raise ValueError(f"this {meta.get('method')} delta was trained on weights {meta.get('base_sha256')!r}, "
                         f"not on {expert.name}'s ({expert.weights_sha256}); load the expert it was trained from")
    if _sha256_of_arrays(arrays) != meta.get("delta_sha256"):
        raise ValueError("the delta's arrays do not match its meta's delta_sha256: the checkpoint is corrupt")
    cfg = expert.config
    if meta["method"] == "lora":
        lora = LoRA(expert, meta["rank"], meta["alpha"], 0.0, meta["ffn"])
        for name, p in lora.params.items():
            if arrays[name].shape != p.shape:
                raise ValueError(f"delta tensor {name!r} has shape {arrays[name].shape}, expected {p.shape}")
            p[...] = arrays[name]
        encoder = lora.encoder()
    elif meta["method"] in ("topk", "full"):
        shapes = expected_shapes(cfg)
        params = encoder_params(expert.encoder)
        for name, value in arrays.items():
            if name not in shapes or tuple(value.shape) != shapes[name]:
                raise ValueError(f"delta tensor {name!r} {value.shape} is not a tensor of {expert.name}")
            params[name] = np.ascontiguousarray(value, dtype=np.float32)
        encoder = Encoder.from_params(cfg, params).with_backend(expert.encoder.matmul_backend)
    else:
        raise ValueError(f"delta method {meta['method']!r} is unknown; use one of {', '.join(METHODS)}")
    sha = hashlib.sha256((expert.weights_sha256 + meta["delta_sha256"]).encode()).hexdigest()
    return dataclasses.replace(expert, encoder=encoder, _sha256=sha)
