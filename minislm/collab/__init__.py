"""The collaboration's trainable parts, each a pair of pure functions with a hand-written backward.

Convention, for every module in this package:
    params = init(rng, ...)                         dict of name -> float array
    y, cache = forward(params, x, ...)              cache holds what backward needs
    dx, grads = backward(params, cache, dy)         grads has the same keys as params
Inputs that are data (frozen features) get dx = None. Everything is plain NumPy; float32 in training, and
float64 works too, which is how the tests check every gradient against torch.autograd and finite differences.
"""
