"""One AdamW update (Loshchilov & Hutter 2019, torch.optim.AdamW's rule) as a single pass over memory.

Per element, step t, learning rate lr, decay wd (0 for parameters that do not decay):
    p <- p (1 - lr wd)
    m <- b1 m + (1 - b1) g          v <- b2 v + (1 - b2) g^2
    p <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
Written as NumPy statements this is about ten passes over four arrays of the size of the model (23 M floats
for all-MiniLM-L6-v2), each with its own temporary; fused, it reads p, g, m, v once and writes p, m, v once.
"""
import numpy as np
from numba import njit, prange

from minislm.kernels.checks import check_array


def adamw_update_reference(p, g, m, v, lr, b1, b2, eps, wd, t):
    """The update in NumPy, in place on p, m, v (float32 arrays of one shape)."""
    p *= 1 - lr * wd
    m *= b1
    m += (1 - b1) * g
    v *= b2
    v += (1 - b2) * g * g
    m_hat = m / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    p -= (lr * m_hat / (np.sqrt(v_hat) + eps)).astype(p.dtype)


@njit(cache=True, parallel=True, fastmath=False)
def _adamw_kernel(p, g, m, v, lr, b1, b2, omb1, omb2, eps, decay, c1, c2):
    # p, g, m, v flat float32 [n]; omb = 1 - b and c1 = 1 / (1 - b1^t), c2 = 1 / (1 - b2^t) come computed in
    # float64 (1 - 0.999 in float32 is off by 1.3e-5 relative, which v would carry)
    for i in prange(p.shape[0]):
        gi = g[i]
        mi = b1 * m[i] + omb1 * gi
        vi = b2 * v[i] + omb2 * gi * gi
        m[i], v[i] = mi, vi
        p[i] = p[i] * decay - lr * (mi * c1) / (np.sqrt(vi * c2) + eps)


def adamw_update(p, g, m, v, lr, b1, b2, eps, wd, t):
    """p, g, m, v float32 C-contiguous arrays of one shape; updated in place (p, m, v). t: the step, from 1."""
    for name, a in (("p", p), ("g", g), ("m", m), ("v", v)):
        check_array("adamw_update", name, a, shape=p.shape)
    f = np.float32
    _adamw_kernel(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1), f(lr), f(b1), f(b2), f(1 - b1), f(1 - b2), f(eps),
                  f(1 - lr * wd), f(1 / (1 - b1 ** t)), f(1 / (1 - b2 ** t)))
