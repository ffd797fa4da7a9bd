"""Argument checks shared by the kernel wrappers: a wrong array gets a message naming it and the fix.

The jitted kernels index raw float32 buffers without bounds checks, so every public wrapper validates
dtype, memory layout and shapes here first.
"""
import numpy as np


def check_array(op, name, a, shape=None, ndim=None):
    """Raise ValueError unless `a` is a C-contiguous float32 ndarray with the given shape (None = any size)."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{op}: {name} must be a numpy array, got {type(a).__name__}; "
                         f"wrap it with np.asarray({name}, dtype=np.float32)")
    if a.dtype != np.float32:
        raise ValueError(f"{op}: {name} must be float32, got {a.dtype}; convert with {name}.astype(np.float32)")
    if not a.flags.c_contiguous:
        raise ValueError(f"{op}: {name} must be C-contiguous; copy it with np.ascontiguousarray({name})")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {a.shape}")
    if shape is not None and any(want is not None and got != want for got, want in zip(a.shape, shape)):
        want = tuple("any" if s is None else s for s in shape)
        raise ValueError(f"{op}: {name} has shape {a.shape}, expected {want}")


def output_array(op, out, shape):
    """A fresh [shape] float32 array when `out` is None, else `out` after checking it fits."""
    if out is None:
        return np.empty(shape, dtype=np.float32)
    check_array(op, "out", out, shape=shape)
    return out
