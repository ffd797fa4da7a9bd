"""The encoder's theoretical FLOPs, summed from the formulas its kernels own (FLOP = 2 x multiply-add).

Matmul counts are exact and equal `torch.utils.flop_counter.FlopCounterMode` on the same model and input;
the element-wise ops (softmax, layer norm, GELU, adds) are counted by each kernel's own per-element formula,
which torch does not count at all.
"""
import numpy as np

from minislm.kernels.attention import attention_flops
from minislm.kernels.matmul import linear_flops
from minislm.kernels.norm import layer_norm_flops


def _add(*parts):
    return {"matmul": sum(p["matmul"] for p in parts), "other": sum(p["other"] for p in parts)}


def embeddings(cfg, B, T):
    """Gathers are free; the adds of word + position (+ token type) and the layer norm are not."""
    adds = (2 if cfg.family == "bert" else 1) * B * T * cfg.hidden
    return _add({"matmul": 0, "other": adds},
                {"matmul": 0, "other": layer_norm_flops(B * T, cfg.hidden, residual=False)})


def encoder_layer(cfg, B, T):
    """One post-norm transformer layer on a [B, T] batch -> {"matmul", "other"}."""
    M, H, F = B * T, cfg.hidden, cfg.ffn
    ln = {"matmul": 0, "other": layer_norm_flops(M, H)}
    return _add(linear_flops(M, H, 3 * H),                                   # fused q, k, v
                attention_flops(B, T, cfg.n_heads, cfg.head_dim, cfg.family == "mpnet"),
                linear_flops(M, H, H), ln,                                   # output projection, LN(x + attn)
                linear_flops(M, H, F, gelu=True), linear_flops(M, F, H), ln)


def encoder(cfg, B, T):
    """The whole encoder on a padded [B, T] batch -> {"embeddings", "layers": [L], "matmul", "other", "total"}."""
    emb = embeddings(cfg, B, T)
    layer = encoder_layer(cfg, B, T)
    tot = _add(emb, *[layer] * cfg.n_layers)
    return {"embeddings": emb, "layers": [layer] * cfg.n_layers, **tot, "total": tot["matmul"] + tot["other"]}


def encoder_per_sample(cfg, lengths, padded_to=None):
    """FLOPs of each row [B]: on its real tokens alone, or (padded_to=T) as one row of a padded batch."""
    lengths = np.asarray(lengths)
    if padded_to is not None:
        return np.full(len(lengths), encoder(cfg, 1, int(padded_to))["total"], dtype=np.float64)
    return np.array([encoder(cfg, 1, int(n))["total"] for n in lengths], dtype=np.float64)
