"""Backward of the embeddings (the forward is minislm.encoder.embed): x = LN(word[ids] + position[pos] (+ type[0])).

The word table is [V, H] with V ~ 30k and a batch touches a few thousand rows, so its gradient is sparse:
the ids that occur (sorted, unique) and, per id, the sum of the gradients of every token carrying it. The
position table (at most 514 rows) and token-type row 0 get dense gradients. Plain NumPy: this is one pass
over [B, T, H], next to which the encoder's matmuls are everything.
"""
import numpy as np

from minislm.kernels.norm import layer_norm_backward, layer_norm_backward_reference


def row_gradient(ids, d_rows):
    """ids [S] int, d_rows [S, H] -> (unique [U] sorted, summed [U, H]): summed[u] = sum of d_rows[s] with
    ids[s] == unique[u], the gradient of the table rows a lookup table[ids] read."""
    ids = np.asarray(ids).reshape(-1)
    if ids.size == 0:
        return ids.copy(), np.zeros((0, d_rows.shape[-1]), dtype=d_rows.dtype)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])  # where each run of one id begins
    return sorted_ids[starts], np.add.reduceat(d_rows[order], starts, axis=0)


def embedding_backward(ids, positions, d_sum, n_positions, token_type=True):
    """Gradient of word[ids] + position[positions] (+ token_type[0]) for each table.

    ids, positions [B, T] int, d_sum [B, T, H] (the gradient of that sum) ->
        (word_ids [U], d_word [U, H], d_position [n_positions, H], d_token_type0 [H] or None).
    Rows of the word table not in word_ids get zero gradient; d_token_type0 is None when token_type is False
    (MPNet has no token types).
    """
    H = d_sum.shape[-1]
    rows = d_sum.reshape(-1, H)
    word_ids, d_word = row_gradient(ids, rows)
    used, d_used = row_gradient(positions, rows)
    d_position = np.zeros((n_positions, H), dtype=d_sum.dtype)
    d_position[used] = d_used
    d_type = rows.sum(axis=0) if token_type else None
    return word_ids, d_word, d_position, d_type


def embed_backward(ids, positions, word, position, token_type, gamma, eps, d_out):
    """Backward of encoder.embed: ids, positions [B, T] int, tables word [V, H], position [P, H], token_type
    [types, H] or None, LN gamma [H], d_out [B, T, H] (the gradient of embed's output) -> dict with
    "word": (ids [U], d_rows [U, H]), "position": [P, H], "token_type": [types, H] or None (row 0 only is used),
    "ln_gamma": [H], "ln_beta": [H].

    The layer norm's backward is layer_norm_backward for float32 (the Numba kernel) and its NumPy reference for
    any other dtype (float64 for gradient checks); the sum it normalised is recomputed from the tables.
    """
    B, T = ids.shape
    H = word.shape[1]
    extra = position[positions]
    if token_type is not None:
        extra = extra + token_type[0]
    x, residual, dy = word[ids].reshape(B * T, H), extra.reshape(B * T, H), d_out.reshape(B * T, H)
    if d_out.dtype == np.float32:
        d_sum, d_gamma, d_beta = layer_norm_backward(x, gamma, eps, np.ascontiguousarray(dy), residual=residual)
    else:
        d_sum, d_gamma, d_beta = layer_norm_backward_reference(x, gamma, eps, dy, residual=residual)
    word_ids, d_word, d_position, d_type0 = embedding_backward(ids, positions, d_sum.reshape(B, T, H),
                                                               position.shape[0], token_type is not None)
    d_type = None
    if token_type is not None:
        d_type = np.zeros_like(token_type, dtype=d_sum.dtype)
        d_type[0] = d_type0
    return {"word": (word_ids, d_word), "position": d_position, "token_type": d_type,
            "ln_gamma": d_gamma, "ln_beta": d_beta}
