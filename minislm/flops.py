"""FLOP accounting: the convention, and the ledger a prediction fills.

Convention, once for the whole package: one multiply-add = 2 FLOPs (a matmul [M, K] x [K, N] costs 2 M K N).
Each op owns its formula beside its code: the kernels (matmul_flops, linear_flops, attention_flops,
layer_norm_flops, the per-element constants), the encoder (encoder/flops.py sums them), pooling
(encoder/pooling.py), the lexical expert (LexicalModel.flops) and the collaboration's head (collab/model.py).
"""
from dataclasses import dataclass, field

import numpy as np


@dataclass
class FlopLedger:
    """What a call actually ran: FLOPs per (expert, op), and per input row."""
    n_rows: int
    per_row: np.ndarray = None                       # [B] FLOPs spent on each row
    by_part: dict = field(default_factory=dict)      # "expert/op" -> FLOPs executed

    def __post_init__(self):
        if self.per_row is None:
            self.per_row = np.zeros(self.n_rows, dtype=np.float64)

    def add(self, part, rows, flops_each):
        """Charge `flops_each` (scalar or [len(rows)]) to each of `rows` under `part`."""
        rows = np.asarray(rows, dtype=np.int64)
        cost = np.broadcast_to(np.asarray(flops_each, dtype=np.float64), rows.shape)
        np.add.at(self.per_row, rows, cost)
        self.by_part[part] = self.by_part.get(part, 0.0) + float(cost.sum())

    @property
    def total(self):
        return float(self.per_row.sum())
