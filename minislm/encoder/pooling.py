"""Pooling hidden states into one vector per text: the masked mean over real tokens, and the CLS vector.

The masked mean is the one sentence-transformers trained these experts with; the layered integration pools
every layer (embeddings included) both ways and lets the layer mix choose.
"""
import numpy as np


def masked_mean(h, mask, axis):
    """Mean of h over its token axis `axis`, counting only real tokens (mask broadcast against h).
    A row with no real token gives zeros (its count is clamped to 1)."""
    m = mask.astype(h.dtype)
    return (h * m).sum(axis=axis) / np.maximum(m.sum(axis=axis), 1)


def pool_mean(h, mask):
    """h [B, T, H], mask [B, T] bool -> [B, H]: mean over real tokens."""
    return masked_mean(h, mask[:, :, None], axis=1)


def pool_mean_backward(d_pooled, mask):
    """d_pooled [B, H], mask [B, T] bool -> dh [B, T, H]: pooled = sum_t m_t h_t / count, so every real token
    gets d_pooled / count and padding gets 0 (a row with no real token gets zeros whatever the count's floor)."""
    m = mask.astype(d_pooled.dtype)[:, :, None]
    count = np.maximum(m.sum(axis=1), d_pooled.dtype.type(1))  # [B, 1], clamped as the forward does
    return m * (d_pooled / count)[:, None, :]


def pool_cls(h):
    """h [B, T, H] -> [B, H]: the first token's vector ([CLS] / <s>)."""
    return np.ascontiguousarray(h[:, 0, :])


def pool_cls_backward(d_pooled, T):
    """d_pooled [B, H], T -> dh [B, T, H]: the first token gets d_pooled, every other token 0."""
    B, H = d_pooled.shape
    dh = np.zeros((B, T, H), dtype=d_pooled.dtype)
    dh[:, 0] = d_pooled
    return dh


def pool_layers(hidden, mask):
    """[L+1, B, T, H], [B, T] -> [B, L+1, 2H]: per layer the masked mean over real tokens, then CLS."""
    mean = masked_mean(hidden, mask[None, :, :, None], axis=2)         # [L+1, B, H]
    cls = hidden[:, :, 0, :]                                            # [L+1, B, H]
    return np.concatenate([mean, cls], axis=-1).transpose(1, 0, 2)      # [B, L+1, 2H]


def pool_layers_backward(d_pooled, mask, layers=None):
    """d_pooled [B, L+1, 2H] (the gradient of pool_layers' output), mask [B, T] -> {l: dh_l [B, T, H]} for
    every layer l in `layers` (default all): the mean half's backward plus the CLS half's."""
    B, n_layers, H2 = d_pooled.shape
    H = H2 // 2
    out = {}
    for layer in range(n_layers) if layers is None else layers:
        dh = pool_mean_backward(d_pooled[:, layer, :H], mask)
        dh[:, 0] += d_pooled[:, layer, H:]
        out[layer] = dh
    return out


def pool_layers_flops(n_layers_plus_1, T, H):
    """FLOPs per text of pool_layers on T real tokens: T adds and one divide per dimension and layer
    (CLS is a copy)."""
    return n_layers_plus_1 * (T + 1) * H
