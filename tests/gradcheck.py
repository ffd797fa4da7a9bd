"""Central finite differences, the model-free reference every hand-written backward is checked against."""
import numpy as np

from tests.tolerances import FD_EPS


def numeric_grad(f, x, eps=FD_EPS):
    """Scalar function f of array x (float64) -> df/dx by central differences, same shape as x."""
    x = np.asarray(x, dtype=np.float64)
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = f(x)
        flat[i] = old - eps
        down = f(x)
        flat[i] = old
        gflat[i] = (up - down) / (2 * eps)
    return g
