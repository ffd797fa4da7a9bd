"""Element-wise activations: exact GELU (erf form) and a numerically stable softmax.

GELU(x) = x * Phi(x) = 0.5 x (1 + erf(x / sqrt(2))), the exact form BERT/MPNet checkpoints were trained with
(not the tanh approximation). libm's `erff` is a scalar call that stops LLVM from vectorising the loop and
costs about as much as the matmul it follows, so the kernel uses `erf32`: a rational approximation
erf(x) ~ x P(x^2) / Q(x^2) on |x| <= 4 (erf(4) rounds to 1 in float32), fitted for this project by linear
least squares on Chebyshev points, max abs error 3.5e-7 over the float32 line. It is only mul/add/div/min/max,
so the whole GELU loop becomes AVX-512 code. Softmax uses `exp32` for the same reason (libm's `expf` is a
scalar call): exp(x) = 2^n e^r with n = round(x / ln 2), |r| <= ln(2)/2, e^r by its Taylor series to r^7
(relative error 3e-7), and 2^n built directly in the float's exponent bits. GELU's backward,
GELU'(x) = Phi(x) + x phi(x), uses both: erf32 for Phi, exp32 for the density phi.
"""
import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from minislm.kernels.checks import check_array, output_array

# Coefficients of P and Q in t = x^2, lowest degree first (Q[0] = 1); see the module docstring.
_ERF_P = (1.1283791065216064, 0.19436879456043243, 0.05321471020579338, 0.003921372815966606,
          0.0002858951920643449, 1.985672497539781e-06)
_ERF_Q = (1.0, 0.5055867433547974, 0.11569499969482422, 0.015280752442777157,
          0.001195811084471643, 3.748038216144778e-05)
_ERF_CLIP = 4.0
# Flags without `nnan`/`ninf`: softmax must keep -inf (masked scores) meaningful; reassociation is what lets
# the max/sum reductions vectorise.
SOFTMAX_FASTMATH = {"reassoc", "contract", "nsz", "arcp", "afn"}

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693359375  # ln 2 split in two so n * _LN2_HI is exact for |n| < 2^9 (Cody-Waite reduction)
_LN2_LO = -2.12194440e-4
_EXP_MIN = -87.0  # below this e^x leaves float32's normal range: exp32 returns exactly 0 there
_EXP_MAX = 88.0

_erf64 = np.vectorize(math.erf, otypes=[np.float64])


def gelu_reference(x):
    """[...] -> [...]: x * Phi(x) with the exact erf form, computed in float64."""
    x64 = x.astype(np.float64)
    return (0.5 * x64 * (1.0 + _erf64(x64 / math.sqrt(2.0)))).astype(np.float32)


@njit(cache=True, fastmath=True, parallel=False, inline="always")
def erf32(x):
    """float32 -> float32 erf, max abs error 3.5e-7; vectorisable (no libm call, no branch)."""
    x = min(max(x, np.float32(-_ERF_CLIP)), np.float32(_ERF_CLIP))
    t = x * x
    p = np.float32(_ERF_P[5])
    p = p * t + np.float32(_ERF_P[4])
    p = p * t + np.float32(_ERF_P[3])
    p = p * t + np.float32(_ERF_P[2])
    p = p * t + np.float32(_ERF_P[1])
    p = p * t + np.float32(_ERF_P[0])
    q = np.float32(_ERF_Q[5])
    q = q * t + np.float32(_ERF_Q[4])
    q = q * t + np.float32(_ERF_Q[3])
    q = q * t + np.float32(_ERF_Q[2])
    q = q * t + np.float32(_ERF_Q[1])
    q = q * t + np.float32(_ERF_Q[0])
    return min(max(x * p / q, np.float32(-1.0)), np.float32(1.0))


@njit(cache=True, fastmath=True, parallel=False, inline="always")
def gelu32(x):
    """float32 -> float32 exact-erf GELU, used by this kernel and the matmul epilogue."""
    return np.float32(0.5) * x * (np.float32(1.0) + erf32(x * np.float32(0.7071067811865476)))


@intrinsic
def _float32_from_bits(typingctx, bits):
    """integer -> float32 with the same low 32 bits: a bare LLVM bitcast, so loops around it vectorise."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        low = args[0] if bits.bitwidth == 32 else builder.trunc(args[0], ir.IntType(32))
        return builder.bitcast(low, ir.FloatType())

    return types.float32(bits), codegen


@njit(cache=True, fastmath=SOFTMAX_FASTMATH, parallel=False, inline="always")
def exp32(x):
    """float32 -> float32 e^x, relative error 3e-7; x < -87 (e^x < 2e-38) and -inf give exactly 0."""
    xc = min(max(x, np.float32(_EXP_MIN)), np.float32(_EXP_MAX))
    n = np.floor(xc * np.float32(_LOG2E) + np.float32(0.5))
    r = xc - n * np.float32(_LN2_HI) - n * np.float32(_LN2_LO)
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    # 2^n: biased exponent in bits 23..30, in int32 so a vector holds 16 lanes (int64 would halve it)
    y = p * _float32_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))
    return y if x >= np.float32(_EXP_MIN) else np.float32(0.0)


_CHUNK = 16384  # elements per parallel task: large enough that thread start-up is amortised


@njit(cache=True, fastmath=True, parallel=True)
def _gelu_kernel(x, out):
    # [S] -> [S], flat views of the caller's arrays
    n = x.shape[0]
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        for i in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
            out[i] = gelu32(x[i])


def gelu(x, out=None):
    """[...] -> [...] float32 exact-erf GELU; `out` (same shape) is written in place when given."""
    check_array("gelu", "x", x)
    out = output_array("gelu", out, x.shape)
    _gelu_kernel(x.reshape(-1), out.reshape(-1))
    return out


_INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi), the normal density's constant


def gelu_backward_reference(x, dy):
    """x, dy [...] -> dx [...]: dy * GELU'(x), GELU'(x) = Phi(x) + x phi(x) with phi the standard normal
    density. Plain NumPy, computed in float64 and returned in the inputs' dtype (float64 stays float64)."""
    x64 = x.astype(np.float64)
    cdf = 0.5 * (1.0 + _erf64(x64 / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * x64 * x64) * _INV_SQRT_2PI
    return (dy * (cdf + x64 * pdf)).astype(np.result_type(x, dy))


@njit(cache=True, fastmath=True, parallel=True)
def _gelu_backward_kernel(x, dy, out):
    # [S], [S] -> [S], flat views; out may be dy (each element is read before it is written)
    n = x.shape[0]
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        for i in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
            v = x[i]
            cdf = np.float32(0.5) * (np.float32(1.0) + erf32(v * np.float32(0.7071067811865476)))
            pdf = exp32(np.float32(-0.5) * v * v) * np.float32(_INV_SQRT_2PI)  # exactly 0 for |v| > 13
            out[i] = dy[i] * (cdf + v * pdf)


def gelu_backward(x, dy, out=None):
    """x, dy [...] -> dx [...] float32: dy * (Phi(x) + x phi(x)), the backward of `gelu`.

    x is GELU's input (the encoder keeps it as ffn_pre); the bias of the linear before it gets the sum of dx
    over rows from `linear_backward`. `out` (same shape) is written in place when given; it may be dy.
    """
    check_array("gelu_backward", "x", x)
    check_array("gelu_backward", "dy", dy, shape=x.shape)
    out = output_array("gelu_backward", out, x.shape)
    _gelu_backward_kernel(x.reshape(-1), dy.reshape(-1), out.reshape(-1))
    return out


# FLOPs per element (FLOP = 2 x multiply-add, counted as in flops.py): what each op spends.
GELU_FLOPS_PER_ELEM = 8      # x/sqrt(2), erf (polynomial counted as 5), 1 +, * 0.5 x
SOFTMAX_FLOPS_PER_ELEM = 5   # max-compare, subtract, exp, add to the sum, divide


def log_softmax_np(x, axis=-1):
    """[..., K] -> [..., K] log-softmax in plain NumPy, any float dtype: max-subtracted for stability.
    The one softmax of the package's NumPy code (heads, gates, losses, the lexical expert)."""
    z = x - x.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def softmax_np(x, axis=-1):
    """[..., K] -> [..., K] softmax in plain NumPy, any float dtype."""
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def softmax_reference(x):
    """[..., K] -> [..., K] float32: the reference the Numba kernel is tested against."""
    return softmax_np(x).astype(np.float32)


@njit(cache=True, fastmath=SOFTMAX_FASTMATH, parallel=True)
def _softmax_kernel(x, out):
    # [R, K] -> [R, K], one row per task
    R, K = x.shape
    for r in prange(R):
        m = x[r, 0]
        for k in range(1, K):
            m = max(m, x[r, k])
        s = np.float32(0.0)
        for k in range(K):
            e = exp32(x[r, k] - m)
            out[r, k] = e
            s += e
        inv = np.float32(1.0) / s
        for k in range(K):
            out[r, k] *= inv


def softmax(x, out=None):
    """[..., K] -> [..., K] float32 softmax along the last axis; `out` is written in place when given.

    A row that is all -inf gives NaN, as in torch.
    """
    check_array("softmax", "x", x)
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"softmax: x needs a non-empty last axis, got shape {x.shape}")
    out = output_array("softmax", out, x.shape)
    _softmax_kernel(x.reshape(-1, x.shape[-1]), out.reshape(-1, x.shape[-1]))
    return out
