"""Theoretical FLOPs of every op minislm runs, and a ledger of what a call actually executed.

Convention, once for the whole package: one multiply-add = 2 FLOPs (a matmul [M, K] x [K, N] costs
2 M K N). Matmul counts are exact and match `torch.utils.flop_counter.FlopCounterMode` on the same model and
input; the other ops (softmax, layer norm, GELU, adds, pooling, hashing) are counted by the hand formulas
below, per element, and torch does not count them at all.
"""
from dataclasses import dataclass, field

import numpy as np

# FLOPs per element of the non-matmul ops (each formula states what it counts).
SOFTMAX_PER_SCORE = 5     # max-compare, subtract, exp, add to the sum, divide
SCORE_SCALE_MASK = 2      # scale by 1/sqrt(D), add the mask (MPNet adds its position bias too: +1)
LAYER_NORM_PER_ELEM = 8   # mean (add), centre (sub), square, variance (add), rsqrt-scale (mul), gamma, beta, residual
GELU_PER_ELEM = 8         # x/sqrt(2), erf (polynomial counted as 5), 1 +, * 0.5 x
BIAS_PER_ELEM = 1


def matmul(M, K, N):
    """[M, K] x [K, N]: 2 M K N."""
    return 2 * M * K * N


def linear(M, K, N, bias=True, gelu=False):
    """y = x W^T (+ b) (then GELU) on M rows -> {"matmul": ..., "other": ...}."""
    other = (BIAS_PER_ELEM * M * N if bias else 0) + (GELU_PER_ELEM * M * N if gelu else 0)
    return {"matmul": matmul(M, K, N), "other": other}


def attention(B, T, n_heads, head_dim, position_bias=False):
    """Scores q k^T [T, D] x [D, T] and the weighted sum p v [T, T] x [T, D] per (row, head), plus the
    softmax and the score scaling / masking (and MPNet's position bias)."""
    scores = B * n_heads * T * T
    return {"matmul": B * n_heads * (matmul(T, head_dim, T) + matmul(T, T, head_dim)),
            "other": scores * (SOFTMAX_PER_SCORE + SCORE_SCALE_MASK + (1 if position_bias else 0))}


def layer_norm(M, H, residual=True):
    return {"matmul": 0, "other": LAYER_NORM_PER_ELEM * M * H + (M * H if residual else 0)}


def _add(*parts):
    return {"matmul": sum(p["matmul"] for p in parts), "other": sum(p["other"] for p in parts)}


def embeddings(cfg, B, T):
    """Gathers are free; the adds of word + position (+ token type) and the layer norm are not."""
    adds = (2 if cfg.family == "bert" else 1) * B * T * cfg.hidden
    return _add({"matmul": 0, "other": adds}, layer_norm(B * T, cfg.hidden, residual=False))


def encoder_layer(cfg, B, T):
    """One post-norm transformer layer on a [B, T] batch."""
    M, H, F = B * T, cfg.hidden, cfg.ffn
    return _add(linear(M, H, 3 * H),                                    # fused q, k, v
                attention(B, T, cfg.n_heads, cfg.head_dim, cfg.family == "mpnet"),
                linear(M, H, H), layer_norm(M, H),                      # output projection, LN(x + attn)
                linear(M, H, F, gelu=True), linear(M, F, H), layer_norm(M, H))


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


def pooling(B, T, H, n_layers_pooled):
    """Masked mean (T adds and a divide per dimension) and CLS (free) of every pooled layer."""
    return n_layers_pooled * B * (T + 1) * H


def mlp_head(B, widths):
    """A chain of linear layers widths[0] -> widths[1] -> ... with bias (activation counted as GELU)."""
    total = 0
    for i, (k, n) in enumerate(zip(widths[:-1], widths[1:])):
        part = linear(B, k, n, gelu=i < len(widths) - 2)
        total += part["matmul"] + part["other"]
    return total


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
