"""Numba kernels of the encoder, each beside a plain NumPy reference of the same function.

All arrays are float32. Weights use torch's `Linear` layout [out, in], so both matmul operands are
read along the contraction axis.
"""
from minislm.kernels.activations import gelu, softmax
from minislm.kernels.attention import attention
from minislm.kernels.matmul import PackedWeight, linear, pack_weight
from minislm.kernels.norm import layer_norm

__all__ = ["PackedWeight", "attention", "gelu", "layer_norm", "linear", "pack_weight", "softmax"]
