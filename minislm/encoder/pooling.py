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


def pool_cls(h):
    """h [B, T, H] -> [B, H]: the first token's vector ([CLS] / <s>)."""
    return np.ascontiguousarray(h[:, 0, :])


def pool_layers(hidden, mask):
    """[L+1, B, T, H], [B, T] -> [B, L+1, 2H]: per layer the masked mean over real tokens, then CLS."""
    mean = masked_mean(hidden, mask[None, :, :, None], axis=2)         # [L+1, B, H]
    cls = hidden[:, :, 0, :]                                            # [L+1, B, H]
    return np.concatenate([mean, cls], axis=-1).transpose(1, 0, 2)      # [B, L+1, 2H]


def pool_layers_flops(n_layers_plus_1, T, H):
    """FLOPs per text of pool_layers on T real tokens: T adds and one divide per dimension and layer
    (CLS is a copy)."""
    return n_layers_plus_1 * (T + 1) * H
