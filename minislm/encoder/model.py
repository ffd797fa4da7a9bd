"""A transformer encoder (BERT or MPNet family) from pure layer functions over the Numba kernels.

One prediction's path through it:
    ids [B, T] --embed--> x [B, T, H] --layer_forward x L--> hidden states [L+1, B, T, H]

Every step is a plain function of (config, weights, inputs); `layer_forward(..., keep=True)` returns the
intermediates its backward (backward.py) needs.

The two families differ only in the embeddings and the attention bias:
    BERT   word + absolute position (0, 1, 2, ...) + token type 0, then layer norm
    MPNet  word + position counted over real tokens from pad_id + 1, then layer norm; every layer adds the
           same relative-position bias [N, T, T] (T5-style log-spaced buckets) to its attention scores
Each layer is post-norm: a = LN(x + Attn(x)), y = LN(a + W2 GELU(W1 a)).

The four linears of a layer hold either float32 weights (PackedWeight) or int8 ones (Int8Weight, made by
quantize.py); `project` runs the kernel of whichever it holds. Everything else stays float32.
"""
import math
from dataclasses import dataclass

import numpy as np

from minislm.encoder.folder import attention_names
from minislm.kernels import attention, gelu, layer_norm, linear
from minislm.kernels.attention import AttentionScratch
from minislm.kernels.int8 import Int8Weight, linear_int8
from minislm.kernels.matmul import PackedWeight, pack_weight

MASK_VALUE = np.finfo(np.float32).min  # added to scores of padding keys: exactly zero weight after softmax


@dataclass
class EmbeddingWeights:
    word: np.ndarray                   # [V, H]
    position: np.ndarray               # [max_positions, H]
    token_type: np.ndarray | None      # [type_vocab, H] (BERT), None (MPNet)
    ln_gamma: np.ndarray               # [H]
    ln_beta: np.ndarray                # [H]
    relative_bias: np.ndarray | None   # [buckets, N] (MPNet, shared by all layers), None (BERT)


@dataclass
class LayerWeights:
    # The four matrices are packed once for the matmul kernel (PackedWeight.unpack() gives [out, in] back), or
    # quantized once for the int8 one (Int8Weight; an int8 encoder holds them in all four).
    qkv_w: PackedWeight | Int8Weight  # [3H, H] query, key and value projections stacked: one matmul, not three
    qkv_b: np.ndarray      # [3H]
    attn_out_w: PackedWeight | Int8Weight  # [H, H]
    attn_out_b: np.ndarray  # [H]
    ln1_gamma: np.ndarray  # [H] layer norm after attention
    ln1_beta: np.ndarray   # [H]
    ffn_in_w: PackedWeight | Int8Weight  # [F, H]
    ffn_in_b: np.ndarray   # [F]
    ffn_out_w: PackedWeight | Int8Weight  # [H, F]
    ffn_out_b: np.ndarray  # [H]
    ln2_gamma: np.ndarray  # [H] layer norm after the feed-forward block
    ln2_beta: np.ndarray   # [H]


def embedding_weights(cfg, params):
    """Hugging Face tensor dict -> EmbeddingWeights."""
    mpnet = cfg.family == "mpnet"
    return EmbeddingWeights(
        word=params["embeddings.word_embeddings.weight"],
        position=params["embeddings.position_embeddings.weight"],
        token_type=None if mpnet else params["embeddings.token_type_embeddings.weight"],
        ln_gamma=params["embeddings.LayerNorm.weight"],
        ln_beta=params["embeddings.LayerNorm.bias"],
        relative_bias=params["encoder.relative_attention_bias.weight"] if mpnet else None,
    )


def layer_weights(cfg, params, i):
    """Hugging Face tensor dict -> LayerWeights of layer i (q, k, v fused into one [3H, H] matrix)."""
    a = attention_names(cfg, i)
    p = f"encoder.layer.{i}."
    fuse = lambda suffix: np.ascontiguousarray(  # noqa: E731
        np.concatenate([params[a[part] + suffix] for part in ("query", "key", "value")]))
    return LayerWeights(
        qkv_w=pack_weight(fuse(".weight")), qkv_b=fuse(".bias"),
        attn_out_w=pack_weight(params[a["out"] + ".weight"]), attn_out_b=params[a["out"] + ".bias"],
        ln1_gamma=params[a["ln"] + ".weight"], ln1_beta=params[a["ln"] + ".bias"],
        ffn_in_w=pack_weight(params[p + "intermediate.dense.weight"]),
        ffn_in_b=params[p + "intermediate.dense.bias"],
        ffn_out_w=pack_weight(params[p + "output.dense.weight"]), ffn_out_b=params[p + "output.dense.bias"],
        ln2_gamma=params[p + "output.LayerNorm.weight"], ln2_beta=params[p + "output.LayerNorm.bias"],
    )


def position_ids(cfg, ids):
    """ids [B, T] -> positions [B, T]: 0..T-1 for BERT; for MPNet pad_id + 1, pad_id + 2, ... over real tokens
    and pad_id on padding (RoBERTa-style, so a padded row gets the positions it would get alone)."""
    B, T = ids.shape
    if cfg.family == "bert":
        return np.broadcast_to(np.arange(T, dtype=np.int64), (B, T))
    real = (ids != cfg.pad_id).astype(np.int64)
    return np.cumsum(real, axis=1) * real + cfg.pad_id


def embed(cfg, ew, ids):
    """ids [B, T] int -> x [B, T, H]: LN(word + position (+ token type 0))."""
    B, T = ids.shape
    extra = ew.position[position_ids(cfg, ids)]                      # [B, T, H]
    if ew.token_type is not None:
        extra += ew.token_type[0]                                    # single-segment input: type 0 everywhere
    x = ew.word[ids].reshape(B * T, cfg.hidden)
    out = layer_norm(x, ew.ln_gamma, ew.ln_beta, cfg.layer_norm_eps, residual=extra.reshape(B * T, cfg.hidden))
    return out.reshape(B, T, cfg.hidden)


def relative_buckets(relative, n_buckets, max_distance):
    """relative positions (key - query) int [..] -> bucket ids [..], as MPNet was trained.

    Half the buckets for keys before the query, half for keys after. Within a half, distances below
    n/4 get a bucket each; longer ones share log-spaced buckets up to max_distance. The log runs in float32,
    as in the original, so bucket boundaries land on the same integers.
    """
    half = n_buckets // 2
    n = -np.asarray(relative, dtype=np.int64)
    bucket = (n < 0).astype(np.int64) * half
    n = np.abs(n)
    exact = half // 2
    with np.errstate(divide="ignore"):
        scaled = (np.log(n.astype(np.float32) / np.float32(exact))
                  / np.float32(math.log(max_distance / exact)) * np.float32(half - exact))
    large = np.minimum(exact + np.where(n < exact, 0, scaled).astype(np.int64), half - 1)
    return bucket + np.where(n < exact, n, large)


def relative_position_bias(cfg, table, T):
    """table [buckets, N], T -> pos_bias [N, T, T]: the bias every MPNet layer adds to its scores."""
    pos = np.arange(T)
    buckets = relative_buckets(pos[None, :] - pos[:, None], cfg.relative_buckets, cfg.relative_max_distance)
    return np.ascontiguousarray(table[buckets].transpose(2, 0, 1))  # [T, T, N] -> [N, T, T]


def relative_position_bias_backward(cfg, d_pos_bias):
    """d_pos_bias [N, T, T] (summed over the layers that share the bias) -> d_table [buckets, N]: every
    (query, key) pair's gradient added into the bucket it read."""
    N, T, _ = d_pos_bias.shape
    pos = np.arange(T)
    buckets = relative_buckets(pos[None, :] - pos[:, None], cfg.relative_buckets, cfg.relative_max_distance)
    d_table = np.empty((cfg.relative_buckets, N), dtype=np.float32)
    for n in range(N):
        d_table[:, n] = np.bincount(buckets.ravel(), weights=d_pos_bias[n].ravel(), minlength=cfg.relative_buckets)
    return d_table


def additive_mask(mask):
    """mask [B, T] bool (True = real token) -> [B, T] float32: 0 for real keys, float32 min for padding."""
    return np.where(mask, np.float32(0.0), MASK_VALUE).astype(np.float32)


@dataclass
class Workspace:
    """Buffers one forward pass reuses in every layer, so the layer loop allocates nothing."""
    qkv: np.ndarray   # [M, 3H]
    ctx: np.ndarray   # [M, H] attention output, heads concatenated
    proj: np.ndarray  # [M, H] attention output projection
    a: np.ndarray     # [M, H] LN(x + proj)
    h: np.ndarray     # [M, F] GELU(W1 a)
    f: np.ndarray     # [M, H] W2 h
    attn: AttentionScratch  # the attention kernel's per-thread buffers for this T

    @classmethod
    def allocate(cls, cfg, B, T):
        e = lambda *shape: np.empty(shape, dtype=np.float32)  # noqa: E731
        H, F, M = cfg.hidden, cfg.ffn, B * T
        return cls(qkv=e(M, 3 * H), ctx=e(M, H), proj=e(M, H), a=e(M, H), h=e(M, F), f=e(M, H),
                   attn=AttentionScratch(T, H // cfg.n_heads))


def project(x, w, b, gelu=False, out=None, backend=None):
    """x [M, K], w [N, K] (+ b [N]) -> [M, N]: one of a layer's linears, float32 (matmul.linear) for a PackedWeight,
    int8 (int8.linear_int8: x quantized per row on the fly; `backend` does not apply) for an Int8Weight."""
    if isinstance(w, Int8Weight):
        return linear_int8(x, w, b, gelu=gelu, out=out)
    return linear(x, w, b, gelu=gelu, out=out, backend=backend)


def layer_forward(cfg, lw, x, mask_add, pos_bias, out, ws, keep=False, backend=None, adapters=None):
    """One post-norm transformer layer.

    x [B, T, H], mask_add [B, T], pos_bias [N, T, T] or None -> out [B, T, H] (written in place).
    With keep=True returns a dict of this layer's intermediates for a backward pass (minislm/encoder/backward.py):
    x and y are views of the caller's x and out, the rest copies (GELU's input kept unfused as ffn_pre; GELU's
    output is recomputed by the backward, one cheap pass instead of [B T, F] more floats kept); otherwise None.
    backend: the matmul backend (kernels/matmul.py; None = its default) of float32 linears.
    adapters: None, or a dict from some of the linears' names ("qkv", "attn_out", "ffn_in", "ffn_out") to an
    object whose forward(x [M, K]) -> (delta [M, N], cache) is added to that linear's output before what follows
    it (a LoRA branch, minislm/experts/adapt.py); with keep their caches are kept under "adapters".
    """
    B, T, H = x.shape
    M = B * T
    x2 = x.reshape(M, H)
    adapters = adapters or {}
    adapter_caches = {}

    def add_adapter(name, inp, result):
        if name in adapters:
            delta, adapter_caches[name] = adapters[name].forward(inp)
            result += delta

    project(x2, lw.qkv_w, lw.qkv_b, out=ws.qkv, backend=backend)                                  # [M, 3H]
    add_adapter("qkv", x2, ws.qkv)
    attention(ws.qkv.reshape(B, T, 3 * H), mask_add, cfg.n_heads, pos_bias,
              out=ws.ctx.reshape(B, T, H), scratch=ws.attn)                      # [B, T, H]
    project(ws.ctx, lw.attn_out_w, lw.attn_out_b, out=ws.proj, backend=backend)                   # [M, H]
    add_adapter("attn_out", ws.ctx, ws.proj)
    layer_norm(ws.proj, lw.ln1_gamma, lw.ln1_beta, cfg.layer_norm_eps, residual=x2, out=ws.a)
    cache = None
    if keep or "ffn_in" in adapters:
        pre = project(ws.a, lw.ffn_in_w, lw.ffn_in_b, backend=backend)                            # [M, F] before GELU
        add_adapter("ffn_in", ws.a, pre)
        gelu(pre, out=ws.h)
        if keep:
            cache = {"x": x2, "qkv": ws.qkv.copy(), "ctx": ws.ctx.copy(), "proj": ws.proj.copy(),
                     "a": ws.a.copy(), "ffn_pre": pre}
    else:
        project(ws.a, lw.ffn_in_w, lw.ffn_in_b, gelu=True, out=ws.h, backend=backend)             # [M, F], GELU fused
    project(ws.h, lw.ffn_out_w, lw.ffn_out_b, out=ws.f, backend=backend)                          # [M, H]
    add_adapter("ffn_out", ws.h, ws.f)
    out2 = out.reshape(M, H)
    layer_norm(ws.f, lw.ln2_gamma, lw.ln2_beta, cfg.layer_norm_eps, residual=ws.a, out=out2)
    if keep:
        cache["f"] = ws.f.copy()
        cache["y"] = out2
        cache["adapters"] = adapter_caches
    return cache


class Encoder:
    """Embeddings and L layers of one pretrained expert, ready to run."""

    def __init__(self, config, embeddings, layers, matmul_backend=None):
        self.config = config          # EncoderConfig
        self.embeddings = embeddings  # EmbeddingWeights
        self.layers = layers          # list of L LayerWeights
        self.matmul_backend = matmul_backend  # "numba", "blas", "auto", or None = MINISLM_MATMUL / "numba"

    @property
    def precision(self):
        """"int8" when the layers' linears hold Int8Weights (quantize.py), else "float32"."""
        return "int8" if self.layers and isinstance(self.layers[0].qkv_w, Int8Weight) else "float32"

    def with_backend(self, matmul_backend):
        """The same weights (shared, not copied) run with another matmul backend."""
        return Encoder(self.config, self.embeddings, self.layers, matmul_backend)

    @classmethod
    def from_params(cls, cfg, params):
        """Hugging Face tensor dict (as checked by hf_folder.load_folder) -> Encoder."""
        return cls(cfg, embedding_weights(cfg, params), [layer_weights(cfg, params, i) for i in range(cfg.n_layers)])

    def check_ids(self, ids, mask):
        cfg = self.config
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"ids and mask must both be [B, T]; got {ids.shape} and {mask.shape}")
        if ids.shape[1] > cfg.max_tokens:
            raise ValueError(f"{ids.shape[1]} tokens exceed this model's limit of {cfg.max_tokens}; "
                             f"truncate with the model's tokenizer (Tokenizer.encode_batch does)")
        if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}); found {ids.min()}..{ids.max()}: "
                             f"the ids come from another model's tokenizer")

    def forward(self, ids, mask, keep=False, adapters=None):
        """ids [B, T] int, mask [B, T] bool -> hidden states [L+1, B, T, H] (index 0 = embeddings).

        keep: False, True (every layer) or a collection of layer indices; when not False also returns a list of
        L entries, each layer's intermediates (see layer_forward) or None for a layer not kept. A backward needs
        the layers from the lowest trained one up (backward.py says what that costs in memory).
        adapters: None, or a list of L dicts of per-layer adapters (see layer_forward), e.g. LoRA branches.
        """
        cfg = self.config
        ids = np.asarray(ids, dtype=np.int64)
        mask = np.asarray(mask, dtype=bool)
        self.check_ids(ids, mask)
        if keep is not False and self.precision == "int8":
            raise ValueError("an int8 encoder runs inference only: its integer weights have no gradient; train "
                             "(keep=...) on the float32 encoder and quantize the result")
        B, T = ids.shape
        kept = set(range(cfg.n_layers)) if keep is True else set(keep or ())
        hidden = np.empty((cfg.n_layers + 1, B, T, cfg.hidden), dtype=np.float32)
        caches = []
        if B and T:
            hidden[0] = embed(cfg, self.embeddings, ids)
            mask_add = additive_mask(mask)
            pos_bias = None
            if self.embeddings.relative_bias is not None:
                pos_bias = relative_position_bias(cfg, self.embeddings.relative_bias, T)
            ws = Workspace.allocate(cfg, B, T)
            for i, lw in enumerate(self.layers):
                caches.append(layer_forward(cfg, lw, hidden[i], mask_add, pos_bias, hidden[i + 1], ws, i in kept,
                                            self.matmul_backend, adapters[i] if adapters else None))
        else:
            caches = [None] * cfg.n_layers
        return (hidden, caches) if keep is not False else hidden
