"""What answering costs, per row: an encoder on a row's real tokens with its pooling, and a tier's head.

Each formula comes from the op that spends it (encoder/flops.py, encoder/pooling.py, collab/model.py);
this file only adds them up the way the team runs them.
"""
import numpy as np

from minislm.collab import model as collab
from minislm.encoder import flops as encoder_flops
from minislm.encoder.pooling import pool_layers_flops

STANDARDIZE_FLOPS_PER_ELEM = 2  # (x - mean) / std


def encoder_row_flops(config, lengths):
    """FLOPs per row [B] of one encoder on each row's real tokens, plus pooling (mean + CLS) and
    standardising every layer's 2H features."""
    lengths = np.asarray(lengths, dtype=np.int64)
    L1, H = config.n_layers + 1, config.hidden
    pool = pool_layers_flops(L1, lengths, H) + STANDARDIZE_FLOPS_PER_ELEM * L1 * 2 * H
    return encoder_flops.encoder_per_sample(config, lengths) + pool


def head_flops(c):
    """FLOPs per row of a collaboration's trainable part (layer mixes, projections, fusion, head)."""
    return collab.flops(c)
