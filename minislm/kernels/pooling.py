"""Backward of the sentence poolings (the forwards are minislm.encoder.pool_mean and pool_cls). Plain NumPy."""
import numpy as np

POOL_MIN_COUNT = 1e-9  # the forward's floor on the number of real tokens (a row with none pools to zeros)


def pool_mean_backward(d_pooled, mask):
    """d_pooled [B, H], mask [B, T] bool -> dh [B, T, H]: pooled = sum_t m_t h_t / max(sum_t m_t, 1e-9), so
    every real token gets d_pooled / count and padding gets 0."""
    m = mask.astype(d_pooled.dtype)[:, :, None]
    count = np.maximum(m.sum(axis=1), d_pooled.dtype.type(POOL_MIN_COUNT))  # [B, 1]
    return m * (d_pooled / count)[:, None, :]


def pool_cls_backward(d_pooled, T):
    """d_pooled [B, H], T -> dh [B, T, H]: the first token gets d_pooled, every other token 0."""
    B, H = d_pooled.shape
    dh = np.zeros((B, T, H), dtype=d_pooled.dtype)
    dh[:, 0] = d_pooled
    return dh
