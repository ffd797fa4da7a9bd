"""Multinomial logistic regression on sparse rows, fitted full-batch by a hand-written Newton-CG.

Shape letters: B rows, F features (columns), C classes, nnz stored entries. A sparse matrix X [B, F] is CSR:
indptr [B+1], cols [nnz], vals [nnz] (row i holds cols[indptr[i]:indptr[i+1]]). Weights W [F, C], bias b [C].

    logits Z = X W + b                                                                [B, C]
    loss   f(W, b) = -(1/B) sum_i log softmax(Z_i)[y_i] + (lam/2) ||W||^2           (b is not penalised)
    grad   dZ = (P - Y) / B,  dW = X^T dZ + lam W,  db = sum_i dZ_i                 P = softmax(Z), Y one-hot
    Hessian-vector product along (V [F, C], v [C]):
           S = X V + v;  R = P * (S - sum_c P S) / B;  HV = X^T R + lam V,  Hv = sum_i R_i

The solver is truncated Newton (Nocedal and Wright 2006, Algorithm 7.1): each step solves H d = -g by
conjugate gradients only to a relative accuracy min(0.5, sqrt(|g|)), then backtracks from a first step until
the Armijo condition holds. It stops at |g| <= 0.01 |g(0)|: the relative-gradient test of Lin, Weng and
Keerthi (2008) at LIBLINEAR's default tolerance. Each CG step costs one pass of X and one of X^T, so a fit is some dozens of passes over
the data, not the thousands of a first-order method at weak penalties. The loss is convex and, with lam > 0,
strictly convex in W, so the optimum is unique and warm starts along a penalty path are safe.
"""
import numpy as np
from numba import njit, prange

from minislm.kernels.activations import log_softmax_np


def csr_matmul_reference(indptr, cols, vals, w):
    """CSR X [B, F], w [F, C] -> X w [B, C] in plain NumPy."""
    B = len(indptr) - 1
    seg = np.repeat(np.arange(B), np.diff(indptr))
    out = np.zeros((B, w.shape[1]), dtype=np.result_type(vals, w))
    np.add.at(out, seg, vals[:, None] * w[cols])
    return out


# w is [F, C] so each stored entry gathers its C weights from one cache line (w [C, F] would miss C times).
# fastmath off: each row's sum runs in one fixed order, so results repeat bit for bit and match the
# reference to rounding; parallel over rows, which write disjoint outputs.
@njit(cache=True, fastmath=False, parallel=True)
def _csr_matmul_kernel(indptr, cols, vals, w, out):
    # CSR [B, F], w [F, C] -> out [B, C]
    B, C = out.shape
    for i in prange(B):
        for c in range(C):
            out[i, c] = 0.0
        for k in range(indptr[i], indptr[i + 1]):
            v, j = vals[k], cols[k]
            for c in range(C):
                out[i, c] += v * w[j, c]


def csr_matmul(indptr, cols, vals, w):
    """CSR X [B, F], w [F, C] -> X w [B, C] (dtype of vals)."""
    _check_csr(indptr, cols, vals, w.shape[0])
    w = np.ascontiguousarray(w, dtype=vals.dtype)
    out = np.empty((len(indptr) - 1, w.shape[1]), dtype=vals.dtype)
    _csr_matmul_kernel(indptr, cols, vals, w, out)
    return out


def csr_transpose(indptr, cols, vals, n_features):
    """CSR X [B, F] -> CSR X^T [F, B] (indptr [F+1], cols [nnz], vals [nnz]): entries regrouped by column, rows
    kept in order within each column by a stable sort."""
    _check_csr(indptr, cols, vals, n_features)
    order = np.argsort(cols, kind="stable")
    t_indptr = np.zeros(n_features + 1, dtype=np.int64)
    t_indptr[1:] = np.cumsum(np.bincount(cols, minlength=n_features))
    rows = np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))
    return t_indptr, rows[order], vals[order]


def csr_rmatmul_reference(indptr, cols, vals, g, n_features):
    """CSR X [B, F], g [B, C] -> X^T g [F, C] in plain NumPy."""
    B = len(indptr) - 1
    seg = np.repeat(np.arange(B), np.diff(indptr))
    out = np.zeros((n_features, g.shape[1]), dtype=np.result_type(vals, g))
    np.add.at(out, cols, vals[:, None] * g[seg])
    return out


def csr_rmatmul(indptr, cols, vals, g, n_features):
    """CSR X [B, F], g [B, C] -> X^T g [F, C] (dtype of vals): the row kernel on X^T. A scatter over X's rows
    would race when run in parallel; X^T's rows each own one output row. A solver transposes once."""
    if g.shape[0] != len(indptr) - 1:
        raise ValueError(f"g has {g.shape[0]} rows, X has {len(indptr) - 1}")
    return csr_matmul(*csr_transpose(indptr, cols, vals, n_features), g)


def _check_csr(indptr, cols, vals, n_features):
    if indptr.dtype != np.int64 or cols.dtype != np.int64 or vals.dtype not in (np.float32, np.float64):
        raise TypeError(f"CSR arrays must be int64, int64, float32/64; got {indptr.dtype}, {cols.dtype}, {vals.dtype}")
    if len(cols) != len(vals) or indptr[0] != 0 or indptr[-1] != len(cols) or np.any(np.diff(indptr) < 0):
        raise ValueError(f"malformed CSR: indptr ends at {indptr[-1]}, {len(cols)} cols, {len(vals)} vals")
    if len(cols) and (cols.min() < 0 or cols.max() >= n_features):
        raise ValueError(f"CSR columns must lie in 0..{n_features - 1}")


class Problem:
    """One penalised fit over theta [F+1, C] = W stacked on b: CSR X [B, F] gets a constant column F of ones
    so the bias rides in the same sparse product, and the penalty skips that row."""

    def __init__(self, X, y, n_classes, n_features, lam):
        indptr, cols, vals = X
        _check_csr(indptr, cols, vals, n_features)
        B = len(indptr) - 1
        ends = indptr[1:]                                               # one more entry per row: the bias
        X = (indptr + np.arange(B + 1), np.insert(cols, ends, n_features),
             np.insert(vals.astype(np.float64), ends, 1.0))
        self.X = X                                                      # [B, F+1]
        self.XT = csr_transpose(*X, n_features + 1)                     # [F+1, B], for X^T g
        self.y = np.asarray(y, dtype=np.int64)
        self.C, self.F = n_classes, n_features + 1
        self.Y = np.eye(n_classes)[self.y]                              # [B, C]
        self.pen = np.full((self.F, 1), float(lam))                     # [F+1, 1]: lam on W, 0 on b
        self.pen[-1] = 0.0

    def matmul(self, theta):
        """theta [F+1, C] -> logits X theta [B, C]."""
        out = np.empty((len(self.y), self.C))
        _csr_matmul_kernel(*self.X, theta, out)
        return out

    def rmatmul(self, g):
        """g [B, C] -> X^T g [F+1, C]."""
        out = np.empty((self.F, self.C))
        _csr_matmul_kernel(*self.XT, np.ascontiguousarray(g), out)
        return out

    def loss(self, theta):
        """theta [F+1, C] -> the penalised mean cross-entropy."""
        logp = log_softmax_np(self.matmul(theta))
        return float(-(logp * self.Y).sum() / len(self.y) + 0.5 * (self.pen * theta * theta).sum())

    def loss_grad(self, theta):
        """theta [F+1, C] -> (loss, gradient [F+1, C], softmax P [B, C])."""
        logp = log_softmax_np(self.matmul(theta))
        P = np.exp(logp)
        loss = float(-(logp * self.Y).sum() / len(self.y) + 0.5 * (self.pen * theta * theta).sum())
        return loss, self.rmatmul((P - self.Y) / len(self.y)) + self.pen * theta, P

    def hvp(self, P, v):
        """P [B, C] softmax at the current point, direction v [F+1, C] -> H v [F+1, C]."""
        S = self.matmul(v)
        R = P * (S - (P * S).sum(axis=1, keepdims=True)) / len(self.y)
        return self.rmatmul(R) + self.pen * v

def newton_cg(prob, theta, max_newton=10, step0=1.0, tol=1e-2, max_cg=100):
    """Truncated Newton from theta [F+1, C] -> (theta, info): at most max_newton outer steps, stopping once
    |g| <= tol |g(0)|, g(0) the gradient at theta = 0 (so a warm start is held to the bar of a cold one);
    CG inner solves of at most max_cg steps; Armijo backtracking from step0."""
    theta = theta.copy()
    g_zero = prob.loss_grad(np.zeros_like(theta))[1]
    bar = tol * float(np.sqrt(np.vdot(g_zero, g_zero)))
    cg_steps, it = 0, 0
    for it in range(max_newton):
        f, g, P = prob.loss_grad(theta)
        gnorm = float(np.sqrt(np.vdot(g, g)))
        if gnorm <= bar:
            break
        # CG on H d = -g: H is positive semi-definite, and its one flat direction (every bias + t) is
        # orthogonal to g, since the softmax's gradient sums to zero over classes
        d = np.zeros_like(theta)
        r = -g
        p = r.copy()
        rr = gnorm ** 2
        eta = min(0.5, np.sqrt(gnorm)) * gnorm
        for _ in range(max_cg):
            hp = prob.hvp(P, p)
            php = float(np.vdot(p, hp))
            cg_steps += 1
            if php <= 1e-30:
                break
            alpha = rr / php
            d += alpha * p
            r -= alpha * hp
            rr_new = float(np.vdot(r, r))
            if np.sqrt(rr_new) <= eta:
                break
            p *= rr_new / rr
            p += r
            rr = rr_new
        # Armijo backtracking: f(theta + t d) <= f(theta) + 1e-4 t g.d, halving t from step0
        slope = float(np.vdot(g, d))
        t = step0
        while t > 1e-10 and prob.loss(theta + t * d) > f + 1e-4 * t * slope:
            t *= 0.5
        theta += t * d
    else:
        it = max_newton
    f, g, _ = prob.loss_grad(theta)
    return theta, {"newton_steps": it, "cg_steps": cg_steps, "loss": f, "grad_norm": float(np.sqrt(np.vdot(g, g)))}
