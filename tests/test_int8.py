"""int8 linear: the Numba kernel against its NumPy reference (exactly: same integers, same rounding), the
reference against float32 linear, vpmaddubsw's saturation, and the AVX2 path compiled for a Haswell."""
import numpy as np
import pytest
from numba import njit

from minislm.kernels import int8
from minislm.kernels.int8 import (GROUP8_MIN_ROWS, MAX_K, NR8, WEIGHT_MAX, Int8Weight, int8_accumulators_reference,
                                  linear_int8, linear_int8_reference, quantize_rows_reference, quantize_weight)
from minislm.kernels.matmul import linear_reference
from minislm.numba_setup import has_feature
from tests.test_kernels import assert_close, rand
from tests.test_kernels_avx2 import run_compiled_for_haswell
from tests.tolerances import INT8_REL_ERR, KERNEL_ATOL, KERNEL_RTOL

INT8_SHAPES = [  # (M, K, N): M=1, K=1, K not a multiple of 4, rows left over, partial panels, grouped panels
    (1, 1, 1), (1, 384, 1536), (3, 5, 7), (9, 13, 32), (37, 385, 65), (70, 1539, 66),
    (GROUP8_MIN_ROWS + 13, 40, 5 * NR8 + 7),
]


def test_int8_path_follows_the_cpu():
    want = "vnni" if has_feature("avx512vnni") else "avx2" if has_feature("avx2") else "numpy"
    assert int8.PATH == want


def test_quantize_weight_codes_scales_and_layout():
    rng = np.random.default_rng(1)
    w = rand(rng, 45, 37)
    w[3] = 0.0  # an all-zero output channel
    w8 = quantize_weight(w)
    codes = w8.codes()
    assert codes.dtype == np.int8 and codes.shape == (45, 37) and np.abs(codes).max() == WEIGHT_MAX
    np.testing.assert_array_equal(codes[3], 0)
    np.testing.assert_allclose(w8.scales[:3], np.abs(w[:3]).max(axis=1) / WEIGHT_MAX, rtol=1e-6)
    assert np.all(np.abs(w8.dequantize() - w) <= w8.scales[:, None] / 2 * (1 + 1e-6))
    np.testing.assert_array_equal(w8.colsums, codes.astype(np.int64).sum(axis=1))
    assert w8.panels.shape == (2, 10, 4 * NR8)  # 45 columns -> 2 panels of 32, K 37 -> 10 groups of 4
    p, g, c, t = 1, 7, 5, 2  # panel p, group g, column c of the panel, byte t of the group
    assert w8.panels[p, g, 4 * c + t] == codes[NR8 * p + c, 4 * g + t]
    np.testing.assert_array_equal(w8.panels[1, :, 4 * 13:], 0)  # columns 45.. are zero padding
    np.testing.assert_array_equal(w8.panels[:, 9, 1::4], 0)      # k = 37 .. 39 are zero padding


@pytest.mark.parametrize("K", [1, 3, 8, 16, 40, 385])  # the row range: no 16-lane step, only those, both
def test_quantize_rows_kernel_matches_reference_exactly(K):
    rng = np.random.default_rng(K)
    x = rand(rng, 6, K, scale=3.0)
    x[1] = np.abs(x[1]) + 1.0   # all positive: zero point 0
    x[2] = -np.abs(x[2]) - 1.0  # all negative: zero point 255
    x[3] = 0.0                  # all zero: scale 1
    x[4, 0] = 1e4               # one outlier
    Kp = -(-K // 4) * 4
    xq = np.full((6, Kp), 77, np.uint8)
    zero, scale = np.empty(6, np.int32), np.empty(6, np.float32)
    int8._quantize_rows_kernel(x, xq, zero, scale)
    want_q, want_zero, want_scale = quantize_rows_reference(x)
    np.testing.assert_array_equal(xq[:, :K], want_q)
    np.testing.assert_array_equal(xq[:, K:], 0)
    np.testing.assert_array_equal(zero, want_zero)
    np.testing.assert_array_equal(scale, want_scale)
    assert want_zero[1] == 0 and want_zero[2] == 255 and want_scale[3] == 1.0
    recon = scale[:, None] * (xq[:, :K].astype(np.float32) - zero[:, None])
    assert np.all(np.abs(recon - x) <= scale[:, None] * 0.5 * (1 + 1e-5) + 1e-6)


@pytest.mark.parametrize("M,K,N", INT8_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_int8_equals_reference_exactly(M, K, N, bias):
    rng = np.random.default_rng(M * 31 + K + N)
    x, w = rand(rng, M, K), rand(rng, N, K, scale=K ** -0.5)
    b = rand(rng, N) if bias else None
    w8 = quantize_weight(w)
    np.testing.assert_array_equal(linear_int8(x, w8, b), linear_int8_reference(x, w8, b))


@pytest.mark.parametrize("M,K,N", [(1, 384, 1536), (37, 385, 65)])
def test_linear_int8_gelu_matches_reference(M, K, N):
    rng = np.random.default_rng(M + K)
    x, w, b = rand(rng, M, K), rand(rng, N, K, scale=K ** -0.5), rand(rng, N)
    w8 = quantize_weight(w)
    out = np.full((M, N), np.nan, np.float32)
    assert linear_int8(x, w8, b, gelu=True, out=out) is out
    assert_close(out, linear_int8_reference(x, w8, b, gelu=True), KERNEL_ATOL, KERNEL_RTOL, "int8 GELU")


@pytest.mark.parametrize("M,K,N", [(5, 8, 40), (37, 385, 65), (70, 1031, 66)])
def test_int8_kernel_accumulators_equal_reference_integers(M, K, N):
    """With unit scales and no bias the kernel's float32 output is its int32 accumulator (|acc| < 2^24)."""
    rng = np.random.default_rng(K)
    w8 = quantize_weight(rand(rng, N, K))
    xq = rng.integers(0, 256, size=(M, w8.panels.shape[1] * 4), dtype=np.uint8)
    xq[:, K:] = 0
    zero = rng.integers(0, 256, size=M).astype(np.int32)
    acc_want = int8_accumulators_reference(np.ascontiguousarray(xq[:, :K]), zero, w8)
    assert np.abs(acc_want).max() < 2 ** 24
    ones = Int8Weight(w8.codes(), np.ones(N, np.float32))
    out = np.empty((M, N), np.float32)
    int8._linear_int8_kernel(xq, zero, np.ones(M, np.float32), ones.panels, ones.colsums, ones.scales,
                             np.zeros(0, np.float32), False, np.empty((8, int8.MB8, 128), np.int32), out)
    np.testing.assert_array_equal(out.astype(np.int64), acc_want)


@pytest.mark.parametrize("M,K,N", [(32, 384, 1152), (32, 384, 384), (32, 384, 1536), (32, 1536, 384)])
def test_int8_reference_close_to_float_linear(M, K, N):
    rng = np.random.default_rng(N)
    x, w, b = rand(rng, M, K), rand(rng, N, K, scale=K ** -0.5), rand(rng, N, scale=0.1)
    want = linear_reference(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64))
    got = linear_int8_reference(x, quantize_weight(w), b)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    print(f"int8 vs float {M}x{K}x{N}: relative error {rel:.4f}")
    assert rel < INT8_REL_ERR


@pytest.mark.needs_avx2
def test_vpmaddubsw_saturates_and_seven_bit_weights_do_not():
    """The AVX2 instruction itself: 255 x 127 + 255 x 127 = 64770 saturates to 32767 in int16; with the
    weights' 7-bit range, 255 x 63 + 255 x 63 = 32130 does not."""
    from minislm.kernels.simd_int8 import bcast4x8, load_i32x8, madd_u8s8_8, store_i32x8, zeros_i32x8

    @njit
    def madd(a, b, out):
        store_i32x8(out, 0, madd_u8s8_8(zeros_i32x8(), bcast4x8(a, 0), load_i32x8(b, 0)))

    a, out = np.full(4, 255, np.uint8), np.empty(8, np.int32)
    madd(a, np.full(32, 127, np.int8), out)
    np.testing.assert_array_equal(out, 2 * 32767)  # not 4 x 255 x 127 = 129540: both pairs saturated
    madd(a, np.full(32, -128, np.int8), out)
    np.testing.assert_array_equal(out, 2 * -32768)
    madd(a, np.full(32, WEIGHT_MAX, np.int8), out)
    np.testing.assert_array_equal(out, 4 * 255 * WEIGHT_MAX)
    madd(a, np.full(32, -WEIGHT_MAX, np.int8), out)
    np.testing.assert_array_equal(out, -4 * 255 * WEIGHT_MAX)


def test_linear_int8_worst_case_products_are_exact():
    """Every activation code 255 against every weight code +-63: the largest pairs vpmaddubsw ever sees."""
    K, N = 1000, 40
    x = np.full((9, K), 2.0, np.float32)  # a positive constant row: zero point 0, every code 255
    x[4] = -2.0                           # a negative one: zero point 255, every code 0
    w = np.where(np.arange(N * K).reshape(N, K) % 3 == 0, -1.0, 1.0).astype(np.float32)  # codes +-63
    w8 = quantize_weight(w)
    assert np.abs(w8.codes()).min() == WEIGHT_MAX
    got = linear_int8(x, w8)
    np.testing.assert_array_equal(got, linear_int8_reference(x, w8))
    assert_close(got, x @ w.T, 1e-4, 1e-6, "worst case vs exact product")


def test_linear_int8_empty_contraction_and_rows():
    w8, b = quantize_weight(np.zeros((5, 0), np.float32)), np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(linear_int8(np.zeros((3, 0), np.float32), w8, b), np.broadcast_to(b, (3, 5)))
    assert linear_int8(np.zeros((0, 4), np.float32), quantize_weight(np.ones((2, 4), np.float32))).shape == (0, 2)


def test_linear_int8_rejects_bad_input_with_a_remedy():
    x, w = np.zeros((4, 6), np.float32), np.zeros((3, 6), np.float32)
    w8 = quantize_weight(w)
    for call, message in [
        (lambda: linear_int8(x, w), "w8 must be an Int8Weight, got ndarray; make one with quantize_weight(w)"),
        (lambda: linear_int8(x[:, :5].copy(), w8), "w8 has shape (3, 6) but x has K=5"),
        (lambda: linear_int8(x, w8, np.zeros(4, np.float32)), "b has shape (4,), expected (3,)"),
        (lambda: linear_int8(x.astype(np.float64), w8), "x must be float32"),
        (lambda: quantize_weight(w.T), "w must be C-contiguous"),
        (lambda: linear_int8(np.zeros((1, MAX_K + 1), np.float32), quantize_weight(np.zeros((1, MAX_K + 1),
                                                                                            np.float32))),
         "the int32 sums could overflow"),
    ]:
        with pytest.raises(ValueError) as err:
            call()
        assert message in str(err.value)


@pytest.mark.avx512_only
def test_int8_avx2_path_compiled_for_haswell():
    run = run_compiled_for_haswell(["tests/test_int8.py", "-k", "not compiled_for_haswell"])
    assert run.returncode == 0, f"compiled for Haswell:\n{run.stdout[-3000:]}\n{run.stderr[-2000:]}"
    summary = run.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, summary
