"""Fused multi-head scaled-dot-product attention over a packed QKV projection."""
import numpy as np

from minislm.kernels.activations import softmax_reference


def attention_reference(qkv, mask_add, n_heads, pos_bias=None):
    """Multi-head attention.

    qkv      [B, T, 3H]  queries, keys, values side by side (H = N * D)
    mask_add [B, T]      added to every score of a key column: 0 for real tokens, large negative for padding
    pos_bias [N, T, T]   optional additive bias per head (MPNet's relative positions), shared over the batch
    returns  [B, T, H]   softmax(q k^T / sqrt(D) + bias + mask) v, heads concatenated
    """
    B, T, H3 = qkv.shape
    H = H3 // 3
    D = H // n_heads
    q, k, v = (qkv[:, :, i * H:(i + 1) * H].reshape(B, T, n_heads, D).transpose(0, 2, 1, 3) for i in range(3))
    scores = q @ k.transpose(0, 1, 3, 2) / np.float32(np.sqrt(D))  # [B, N, T, T]
    if pos_bias is not None:
        scores = scores + pos_bias[None]
    scores = scores + mask_add[:, None, None, :]
    p = softmax_reference(scores)
    return (p @ v).transpose(0, 2, 1, 3).reshape(B, T, H).astype(np.float32)


def attention(qkv, mask_add, n_heads, pos_bias=None, out=None):
    y = attention_reference(qkv, mask_add, n_heads, pos_bias)
    if out is None:
        return y
    out[...] = y
    return out
