"""Backward through the encoder: the chain rule over model.layer_forward, layer by layer from the top down.

Shapes: B batch, T tokens, M = B T rows, H hidden, N heads, D head dim, F feed-forward width, L layers.
One layer, forward on the left, backward on the right (dy the gradient of y; LN' and Attn' are the kernels'
layer_norm_backward and attention_backward, s1 = proj + x and s2 = f + a the sums the layer norms read):
    qkv  = x Wqkv^T + bqkv      dx   = dqkv Wqkv + ds1     dWqkv = dqkv^T x     (query, key, value stacked)
    ctx  = Attn(qkv)            dqkv = Attn'(dctx)         (and dpos_bias, MPNet)
    proj = ctx Wo^T + bo        dctx = ds1 Wo              dWo = ds1^T ctx
    a    = LN1(proj + x)        ds1  = LN1'(da),  da = dpre W1 + ds2
    pre  = a W1^T + b1          dpre = GELU'(pre) dh       dW1 = dpre^T a
    h    = GELU(pre)            dh   = ds2 W2              dW2 = ds2^T h
    f    = h W2^T + b2
    y    = LN2(f + a)           ds2  = LN2'(dy)
Every bias gets the column sums of its output's gradient. A frozen weight costs only dx (one GEMM), a trained
one dx and dW (two); the lowest trained layer skips dx, and layers below it are never visited.

Memory: a trained step keeps, per layer from the lowest trained one up, qkv (3MH), ctx, proj, a, f (MH each)
and GELU's input (MF): 7 M H + M F floats (`kept_bytes`), besides the L+1 hidden states [L+1, M, H] that every
forward returns. At B32 x T128 (M = 4096), float32:
    paraphrase-MiniLM-L3-v2 (H 384, F 1536, L 3)    69.2 MB per layer, 208 MB for all 3 (+ 25 MB hidden states)
    all-MiniLM-L6-v2        (H 384, F 1536, L 6)    69.2 MB per layer, 415 MB for all 6 (+ 44 MB hidden states)
    all-mpnet-base-v2       (H 768, F 3072, L 12)  138.4 MB per layer, 1.66 GB for all 12 (+ 164 MB hidden states)
Top-k fine-tuning keeps k layers; LoRA and full fine-tuning keep them all. The backward itself adds a few
[M, F] and [M, 3H] temporaries and, with a trained weight, its gradient (and AdamW's two moments).
"""
from dataclasses import dataclass

import numpy as np

from minislm.encoder.folder import attention_names, expected_shapes
from minislm.encoder.model import additive_mask, position_ids, relative_position_bias, relative_position_bias_backward
from minislm.kernels.activations import gelu, gelu_backward
from minislm.kernels.attention import attention_backward
from minislm.kernels.embedding import embed_backward
from minislm.kernels.matmul import linear, linear_backward, transposed_weight
from minislm.kernels.norm import layer_norm_backward

FLOAT_BYTES = 4
WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"
RELATIVE_BIAS = "encoder.relative_attention_bias.weight"
# LayerWeights' fields with a gradient, in backward order; the matrices' own names are "<linear>_w" / "<linear>_b"
LAYER_FIELDS = ("ln2_gamma", "ln2_beta", "ffn_out_w", "ffn_out_b", "ffn_in_w", "ffn_in_b", "ln1_gamma", "ln1_beta",
                "attn_out_w", "attn_out_b", "qkv_w", "qkv_b")


@dataclass
class SparseRows:
    """The gradient of a lookup table that a batch read a few rows of: only those rows."""
    ids: np.ndarray   # [U] sorted unique row ids
    rows: np.ndarray  # [U, H] their gradients (every other row's is 0)

    def dense(self, n_rows):
        """-> [n_rows, H] with zeros elsewhere."""
        out = np.zeros((n_rows, self.rows.shape[1]), dtype=self.rows.dtype)
        out[self.ids] = self.rows
        return out


def kept_bytes(cfg, B, T, n_layers_kept):
    """Bytes a forward with keep= keeps for the backward of n_layers_kept layers at [B, T] (see the module doc)."""
    M, H, F = B * T, cfg.hidden, cfg.ffn
    return n_layers_kept * (7 * M * H + M * F) * FLOAT_BYTES


def layer_param_names(cfg, i):
    """LayerWeights field -> the Hugging Face names it holds: three (query, key, value) for qkv_w and qkv_b,
    one for every other field."""
    a = attention_names(cfg, i)
    p = f"encoder.layer.{i}."
    return {
        "qkv_w": [a[part] + ".weight" for part in ("query", "key", "value")],
        "qkv_b": [a[part] + ".bias" for part in ("query", "key", "value")],
        "attn_out_w": [a["out"] + ".weight"], "attn_out_b": [a["out"] + ".bias"],
        "ln1_gamma": [a["ln"] + ".weight"], "ln1_beta": [a["ln"] + ".bias"],
        "ffn_in_w": [p + "intermediate.dense.weight"], "ffn_in_b": [p + "intermediate.dense.bias"],
        "ffn_out_w": [p + "output.dense.weight"], "ffn_out_b": [p + "output.dense.bias"],
        "ln2_gamma": [p + "output.LayerNorm.weight"], "ln2_beta": [p + "output.LayerNorm.bias"],
    }


def embedding_param_names(cfg):
    """EmbeddingWeights field -> Hugging Face name, for the fields this config has."""
    names = {"word": WORD_EMBEDDINGS, "position": "embeddings.position_embeddings.weight",
             "ln_gamma": "embeddings.LayerNorm.weight", "ln_beta": "embeddings.LayerNorm.bias"}
    if cfg.family == "bert":
        names["token_type"] = "embeddings.token_type_embeddings.weight"
    else:
        names["relative_bias"] = RELATIVE_BIAS
    return names


def layer_of(name):
    """Hugging Face name -> its layer index, -1 for the embeddings (MPNet's shared relative bias counts as
    layer 0: every layer reads it, so the backward must reach the first)."""
    if name.startswith("encoder.layer."):
        return int(name.split(".")[2])
    return 0 if name == RELATIVE_BIAS else -1


def encoder_params(encoder, names=None):
    """Encoder -> {Hugging Face name: float32 array} (copies; the packed matrices unpacked, q, k, v split), for
    every tensor or only `names`."""
    cfg, ew = encoder.config, encoder.embeddings
    want = set(expected_shapes(cfg)) if names is None else set(names)
    out = {}
    for field, name in embedding_param_names(cfg).items():
        if name in want:
            out[name] = np.array(getattr(ew, field), dtype=np.float32)
    for i, lw in enumerate(encoder.layers):
        for field, hf_names in layer_param_names(cfg, i).items():
            if not want.intersection(hf_names):
                continue
            value = getattr(lw, field)
            value = value.unpack() if hasattr(value, "unpack") else np.array(value)
            for name, part in zip(hf_names, np.split(value, len(hf_names))):
                if name in want:
                    out[name] = np.ascontiguousarray(part, dtype=np.float32)
    return out


def _linear_backward(name, x, w, dy, need_dx, want, grads, adapters, adapter_caches, adapter_grads):
    # one linear's share of the layer backward: dx always unless the layer is the lowest, dW and db only if
    # trained, and the adapter's own gradients (and its part of dx) when one sits on this linear
    if name + "_w" in want:
        dx, grads[name + "_w"], db = linear_backward(x, w, dy, need_dx=need_dx)
    else:
        dx = linear(dy, transposed_weight(w)) if need_dx else None
        db = dy.sum(axis=0, dtype=np.float64).astype(np.float32) if name + "_b" in want else None
    if name + "_b" in want:
        grads[name + "_b"] = db
    if name in adapters:
        dx_adapter, g = adapters[name].backward(adapter_caches[name], x, dy, need_dx)
        adapter_grads.update(g)
        if need_dx:
            dx += dx_adapter
    return dx


def layer_backward(cfg, lw, cache, dy, mask_add, pos_bias, want=LAYER_FIELDS, need_dx=True, adapters=None):
    """Backward of model.layer_forward (the math is in the module doc).

    lw LayerWeights, cache the dict layer_forward(keep=True) returned, dy [B, T, H] the gradient of its output,
    mask_add [B, T] and pos_bias [N, T, T] or None as the forward had them, want: the LayerWeights fields to
    return gradients for, adapters the forward's (or None) ->
        (dx [B, T, H] or None when not need_dx, {field: gradient}, dpos_bias [N, T, T] or None,
         {adapter parameter name: gradient}).
    """
    B, T, H = dy.shape
    M, eps = B * T, cfg.layer_norm_eps
    adapters, adapter_caches = adapters or {}, cache.get("adapters", {})
    grads, adapter_grads = {}, {}
    lin = lambda name, x, w, d, nd=True: _linear_backward(  # noqa: E731
        name, x, w, d, nd, want, grads, adapters, adapter_caches, adapter_grads)
    dy = np.ascontiguousarray(dy.reshape(M, H), dtype=np.float32)
    ds2, dg, db = layer_norm_backward(cache["f"], lw.ln2_gamma, eps, dy, residual=cache["a"])    # [M, H]
    grads.update(ln2_gamma=dg, ln2_beta=db)
    h = gelu(cache["ffn_pre"])                                                                   # [M, F]
    dh = lin("ffn_out", h, lw.ffn_out_w, ds2)                                                    # [M, F]
    dpre = gelu_backward(cache["ffn_pre"], dh, out=dh)
    da = lin("ffn_in", cache["a"], lw.ffn_in_w, dpre)                                           # [M, H]
    da += ds2
    ds1, dg, db = layer_norm_backward(cache["proj"], lw.ln1_gamma, eps, da, residual=cache["x"], out=da)
    grads.update(ln1_gamma=dg, ln1_beta=db)
    dctx = lin("attn_out", cache["ctx"], lw.attn_out_w, ds1)                                     # [M, H]
    dqkv, dpos_bias = attention_backward(cache["qkv"].reshape(B, T, 3 * H), mask_add, cfg.n_heads, pos_bias,
                                         dctx.reshape(B, T, H))                                 # [B, T, 3H]
    dx = lin("qkv", cache["x"], lw.qkv_w, dqkv.reshape(M, 3 * H), need_dx)                      # [M, H]
    if need_dx:
        dx += ds1
        dx = dx.reshape(B, T, H)
    grads = {k: v for k, v in grads.items() if k in want}
    return dx, grads, dpos_bias, adapter_grads


def lowest_layer(names, adapters=None):
    """The lowest layer a backward must reach for these trained names and adapters (-1: the embeddings)."""
    layers = [layer_of(n) for n in names]
    if adapters:
        layers += [i for i, a in enumerate(adapters) if a]
    if not layers:
        raise ValueError("nothing to train: name at least one tensor (Hugging Face name) or pass adapters")
    return min(layers)


def encoder_backward(encoder, ids, mask, caches, d_hidden, trainable, adapters=None):
    """Gradients of a loss for the trained tensors, from the gradients of the hidden states the loss read.

    ids [B, T], mask [B, T]: the batch; caches: what encoder.forward(ids, mask, keep=..., adapters=adapters)
    returned for every layer from lowest_layer(trainable, adapters) up; d_hidden: {l: [B, T, H]} the gradients
    of hidden state l (0 = the embeddings' output, L = the last layer) for each layer the loss read;
    trainable: Hugging Face names (e.g. "encoder.layer.5.attention.self.query.weight").
    -> {name: gradient} for exactly the trainable names, the word embeddings as SparseRows, plus the adapters'
    own gradients under their names. The relative bias table (MPNet) gets every layer's dpos_bias, scattered
    back into its buckets.
    """
    cfg = encoder.config
    names = set(trainable)
    unknown = sorted(names - set(expected_shapes(cfg)))
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a tensor of this {cfg.family} encoder; use Hugging Face names "
                         f"such as 'encoder.layer.0.attention.{'self.query' if cfg.family == 'bert' else 'attn.q'}"
                         f".weight'")
    ids = np.asarray(ids, dtype=np.int64)
    mask = np.asarray(mask, dtype=bool)
    B, T = ids.shape
    L, H = cfg.n_layers, cfg.hidden
    lowest = lowest_layer(names, adapters)
    missing = [i for i in range(max(lowest, 0), L) if caches[i] is None]
    if missing:
        raise ValueError(f"layer {missing[0]}'s intermediates were not kept; run forward with keep= covering "
                         f"layers {max(lowest, 0)}..{L - 1}")
    mask_add = additive_mask(mask)
    pos_bias = None
    if encoder.embeddings.relative_bias is not None:
        pos_bias = relative_position_bias(cfg, encoder.embeddings.relative_bias, T)
    grads = {}
    d_pos_total = np.zeros((cfg.n_heads, T, T), dtype=np.float32) if RELATIVE_BIAS in names else None
    g = np.zeros((B, T, H), dtype=np.float32)
    if L in d_hidden:
        g += d_hidden[L]
    for i in reversed(range(max(lowest, 0), L)):
        fields = layer_param_names(cfg, i)
        want = [f for f in LAYER_FIELDS if names.intersection(fields[f])]
        dx, layer_grads, d_pos, adapter_grads = layer_backward(
            cfg, encoder.layers[i], caches[i], g, mask_add, pos_bias, want, need_dx=i > lowest,
            adapters=adapters[i] if adapters else None)
        grads.update(adapter_grads)
        for field, value in layer_grads.items():
            for name, part in zip(fields[field], np.split(value, len(fields[field]))):
                if name in names:
                    grads[name] = np.ascontiguousarray(part)
        if d_pos_total is not None:
            d_pos_total += d_pos
        g = dx
        if g is not None and i in d_hidden:
            g += d_hidden[i]
    if d_pos_total is not None:
        grads[RELATIVE_BIAS] = relative_position_bias_backward(cfg, d_pos_total)
    embedding_names = {f: n for f, n in embedding_param_names(cfg).items() if f != "relative_bias" and n in names}
    if embedding_names:
        ew = encoder.embeddings
        d = embed_backward(ids, np.ascontiguousarray(position_ids(cfg, ids)), ew.word, ew.position, ew.token_type,
                           ew.ln_gamma, cfg.layer_norm_eps, np.ascontiguousarray(g, dtype=np.float32))
        for field, name in embedding_names.items():
            grads[name] = SparseRows(*d["word"]) if field == "word" else d[field]
    return grads
