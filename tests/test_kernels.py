"""Every Numba kernel against its plain NumPy reference (run in float64) and against PyTorch (float32).

Odd sizes, T=1, heavy padding, extreme magnitudes, in-place `out=` and the wrappers' error messages are all
covered on purpose; shapes stay small so the file runs in seconds once Numba's cache is warm.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minislm.kernels.activations import gelu, gelu_reference, softmax, softmax_reference
from minislm.kernels.attention import attention, attention_reference
from minislm.kernels.matmul import GROUP_MIN_ROWS, NR, PackedWeight, linear, linear_reference, pack_weight
from minislm.kernels.norm import layer_norm, layer_norm_reference
from minislm.kernels.tiles import K_CHUNK, TILE_ROWS
from tests.tolerances import KERNEL_ATOL, KERNEL_RTOL, MATMUL_ATOL, MATMUL_RTOL

F32_MIN = np.finfo(np.float32).min


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def assert_close(got, want, atol, rtol, what):
    """assert_allclose that shows the first values side by side and the largest difference."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    diff = np.abs(got - want)
    head = f"{what}: first got {got.ravel()[:4]}, want {want.ravel()[:4]}, max |diff| {diff.max(initial=0):.3g}"
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=head)


# ---------------------------------------------------------------- linear

LINEAR_SHAPES = [  # (M, K, N): tile-aligned, odd rows and columns, M=1, K=1, long K, grouped panels
    (1, 5, 7), (4, 8, 4), (33, 17, 9), (32, 384, 1152), (37, 800, 65), (70, 1539, 66), (3, 1, 130),
    (19, 2 * K_CHUNK + 5, 40),  # three chunks of K
    (GROUP_MIN_ROWS + 13, 40, 5 * NR + 7),
]


def check_linear(x, w, b, act, got, label):
    """got vs float64 reference and vs torch, error bound relative to |x| |w|^T (it grows with K)."""
    bound = MATMUL_ATOL + MATMUL_RTOL * (np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T)
    want = linear_reference(x.astype(np.float64), w.astype(np.float64), None if b is None else b.astype(np.float64),
                            act)
    assert np.all(np.abs(got - want) <= bound), f"{label} vs reference: max |diff| {np.abs(got - want).max():.3g}"
    y = F.linear(t(x), t(w), None if b is None else t(b))
    ref_torch = (F.gelu(y) if act else y).numpy()
    assert np.all(np.abs(got - ref_torch) <= 2 * bound), \
        f"{label} vs torch: max |diff| {np.abs(got - ref_torch).max():.3g}"


@pytest.mark.parametrize("M,K,N", LINEAR_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("act", [False, True])
@pytest.mark.parametrize("backend", ["numba", "blas"])
def test_linear_matches_reference_and_torch(M, K, N, bias, act, backend):
    rng = np.random.default_rng(M * 1000 + K + N)
    x, w = rand(rng, M, K), rand(rng, N, K, scale=K ** -0.5)
    b = rand(rng, N) if bias else None
    check_linear(x, w, b, act, linear(x, w, b, gelu=act, backend=backend), f"linear {M}x{K}x{N} {backend}")


def test_linear_backend_choice():
    from minislm.kernels.matmul import BLAS_MIN_ROWS, resolve_backend

    assert resolve_backend(BLAS_MIN_ROWS, "auto") == "blas" and resolve_backend(BLAS_MIN_ROWS - 1, "auto") == "numba"
    assert resolve_backend(10_000, "numba") == "numba"
    with pytest.raises(ValueError, match="matmul backend 'gpu' is unknown; use one of numba, blas, auto"):
        resolve_backend(4, "gpu")


def test_linear_large_magnitudes():
    rng = np.random.default_rng(1)
    x, w, b = rand(rng, 9, 300, scale=1e3), rand(rng, 11, 300, scale=1e2), rand(rng, 11, scale=1e4)
    check_linear(x, w, b, True, linear(x, w, b, gelu=True), "linear 1e3 x 1e2")


def test_linear_writes_into_out():
    rng = np.random.default_rng(2)
    x, w, b = rand(rng, 37, 800), rand(rng, 65, 800), rand(rng, 65)
    out = np.full((37, 65), np.nan, dtype=np.float32)  # stale contents must not leak into the K accumulation
    got = linear(x, w, b, gelu=True, out=out)
    assert got is out
    check_linear(x, w, b, True, out, "linear out=")


def test_linear_empty_contraction_gives_bias():
    x, w, b = np.zeros((3, 0), np.float32), np.zeros((5, 0), np.float32), np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(linear(x, w, b), np.broadcast_to(b, (3, 5)))


@pytest.mark.parametrize("N", [1, NR, 3 * NR + 5])
def test_packed_weight_round_trip_and_same_result(N):
    rng = np.random.default_rng(N)
    x, w, b = rand(rng, 19, 45), rand(rng, N, 45), rand(rng, N)
    packed = pack_weight(w)
    assert isinstance(packed, PackedWeight) and packed.shape == (N, 45) and pack_weight(packed) is packed
    assert packed.panels.shape == (-(-N // NR), 45, NR)
    np.testing.assert_array_equal(packed.unpack(), w)
    np.testing.assert_array_equal(packed.panels.transpose(0, 2, 1).reshape(-1, 45)[N:], 0)  # zero padding
    for backend in ("numba", "blas"):
        np.testing.assert_array_equal(linear(x, packed, b, backend=backend), linear(x, w, b, backend=backend))


def test_linear_accepts_read_only_inputs():
    rng = np.random.default_rng(5)
    x, w, b = rand(rng, 10, 33), rand(rng, 40, 33), rand(rng, 40)
    read_only = [a.copy() for a in (x, w, b)]
    for a in read_only:
        a.flags.writeable = False
    check_linear(x, w, b, True, linear(*read_only, gelu=True), "linear read-only")


def test_linear_rejects_mismatched_packed_weight():
    rng = np.random.default_rng(6)
    with pytest.raises(ValueError, match=r"w has shape \(40, 33\) but x has K=32"):
        linear(rand(rng, 10, 32), pack_weight(rand(rng, 40, 33)))


def test_tiles_keep_accumulators_in_vector_registers():
    """The 8 x 32 tile's k loop is one basic block of 16 FMAs on 16-wide (or 32 on 8-wide) registers."""
    import re

    from numba import njit

    from minislm.kernels.matmul import _linear_kernel

    fresh = njit(fastmath=True, parallel=True)(_linear_kernel.py_func)  # uncached, so its assembly is inspectable
    fresh(*(np.ones(s, np.float32) for s in [(16, 8), (1, 8, NR)]), NR, np.zeros(0, np.float32), False,
          np.empty((16, NR), np.float32))
    asm = next(iter(fresh.inspect_asm().values()))
    per_block = [len(re.findall(r"vfmadd\d+ps\s[^\n]*[yz]mm", block)) for block in asm.split(".LBB")]
    assert max(per_block) >= 2 * TILE_ROWS, f"at most {max(per_block)} vector FMAs in a block of the GEMM kernel"


@pytest.mark.parametrize("tile_rows", [8, 2, 1])
def test_each_register_tile_matches_numpy(tile_rows):
    """Every tile, whichever one this CPU's kernel uses: out[i:i+R, j0:j0+32] = x[i:i+R] @ panel."""
    from numba import njit

    from minislm.kernels import tiles

    tile = {8: tiles.tile_8x32, 2: tiles.tile_2x32, 1: tiles.tile_1x32}[tile_rows]

    @njit
    def run(x, panel, out, i, j0, accumulate):
        tile(x, panel, out, i, j0, accumulate)

    W = 32  # these tiles are 32 columns wide whatever PANEL this CPU's kernel uses (16 on AVX2 hosts)
    rng = np.random.default_rng(tile_rows)
    x, panel = rand(rng, 11, 37), rand(rng, 37, W)
    out = np.full((11, 3 * W), np.nan, dtype=np.float32)
    block = (slice(2, 2 + tile_rows), slice(W, 2 * W))
    run(x, panel, out, 2, W, False)
    np.testing.assert_allclose(out[block], x[2:2 + tile_rows] @ panel, rtol=1e-5, atol=1e-5)
    untouched = np.ones(out.shape, bool)
    untouched[block] = False
    assert np.isnan(out[untouched]).all(), "a tile wrote outside its block"
    run(x, panel, out, 2, W, True)  # a second chunk of K adds to the first
    np.testing.assert_allclose(out[block], 2 * (x[2:2 + tile_rows] @ panel), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- attention

def attention_torch(qkv, mask_add, n_heads, pos_bias):
    B, T, H3 = qkv.shape
    q, k, v = (t(qkv[:, :, i * H3 // 3:(i + 1) * H3 // 3]).reshape(B, T, n_heads, -1).transpose(1, 2)
               for i in range(3))
    bias = t(mask_add)[:, None, None, :]
    if pos_bias is not None:
        bias = bias + t(pos_bias)[None]
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return y.transpose(1, 2).reshape(B, T, H3 // 3).numpy()


def padding_mask(lengths, T, fill):
    """[B] real-token counts -> [B, T] additive mask: 0 on real tokens, `fill` on padding."""
    return np.where(np.arange(T)[None, :] < np.asarray(lengths)[:, None], 0.0, fill).astype(np.float32)


ATTENTION_CASES = [  # (B, T, N, D, lengths, with pos_bias)
    (2, 7, 3, 4, [7, 3], False),
    (1, 1, 2, 8, [1], True),          # T = 1
    (3, 64, 4, 16, [1, 64, 30], True),  # heavy padding: one real token of 64
    (2, 33, 12, 32, [33, 20], True),   # MiniLM's head size, odd T
    (2, 40, 2, 64, [40, 17], True),    # MPNet's head size: two panels of head dims
    (1, 70, 2, 48, [70], False),       # head dims and keys both padded to whole panels
]


@pytest.mark.parametrize("B,T,N,D,lengths,with_bias", ATTENTION_CASES)
@pytest.mark.parametrize("fill", [F32_MIN, -1e4])
def test_attention_matches_reference_and_torch(B, T, N, D, lengths, with_bias, fill):
    rng = np.random.default_rng(B * 100 + T)
    qkv, mask = rand(rng, B, T, 3 * N * D), padding_mask(lengths, T, fill)
    pos_bias = rand(rng, N, T, T) if with_bias else None
    got = attention(qkv, mask, N, pos_bias)
    want = attention_reference(qkv.astype(np.float64), mask.astype(np.float64), N,
                               None if pos_bias is None else pos_bias.astype(np.float64))
    assert_close(got, want, KERNEL_ATOL, KERNEL_RTOL, "attention vs reference")
    assert_close(got, attention_torch(qkv, mask, N, pos_bias), KERNEL_ATOL, KERNEL_RTOL, "attention vs torch")


@pytest.mark.parametrize("fill", [F32_MIN, -1e4, -np.inf])
def test_attention_padding_gets_exactly_zero_weight(fill):
    """Real queries see what they would see without the padding: values of 1e30 in the padded slots would
    show through any weight above ~1e-35, so the padding weights must be exactly zero."""
    rng = np.random.default_rng(3)
    B, T, N, D, length = 2, 64, 4, 8, 5
    qkv = rand(rng, B, T, 3 * N * D)
    qkv[:, length:, 2 * N * D:] = 1e30  # garbage values in the padding
    pos_bias = rand(rng, N, T, T)
    got = attention(qkv, padding_mask([length, length], T, fill), N, pos_bias)
    alone = attention(np.ascontiguousarray(qkv[:, :length]), np.zeros((B, length), np.float32), N,
                      np.ascontiguousarray(pos_bias[:, :length, :length]))
    assert_close(got[:, :length], alone, KERNEL_ATOL, KERNEL_RTOL, "attention with vs without padding")
    assert np.all(np.isfinite(got)), "padded query rows must still produce finite output"


def test_attention_extreme_scores():
    """Scores near +-1e4 (integer q, k so q k^T / sqrt(D) is exact in float32): softmax must not overflow."""
    rng = np.random.default_rng(4)
    B, T, N, D = 2, 9, 2, 4  # scale 1/sqrt(4) = 0.5 is exact
    qkv = rng.integers(-50, 51, size=(B, T, 3 * N * D)).astype(np.float32)
    mask = padding_mask([9, 6], T, F32_MIN)
    got = attention(qkv, mask, N)
    assert np.abs(qkv[..., :N * D] @ qkv[..., N * D:2 * N * D].transpose(0, 2, 1)).max() * 0.5 > 1e3
    want = attention_reference(qkv.astype(np.float64), mask.astype(np.float64), N)
    assert_close(got, want, KERNEL_ATOL, KERNEL_RTOL, "attention extreme vs reference")
    assert_close(got, attention_torch(qkv, mask, N, None), KERNEL_ATOL, KERNEL_RTOL, "attention extreme vs torch")


def test_attention_writes_into_out():
    rng = np.random.default_rng(5)
    qkv, mask = rand(rng, 2, 10, 3 * 4 * 8), padding_mask([10, 2], 10, F32_MIN)
    out = np.full((2, 10, 32), np.nan, dtype=np.float32)
    assert attention(qkv, mask, 4, out=out) is out
    assert_close(out, attention_reference(qkv.astype(np.float64), mask.astype(np.float64), 4),
                 KERNEL_ATOL, KERNEL_RTOL, "attention out=")


def test_attention_kernel_matches_its_readable_version():
    """The tiled kernel against _attention_kernel_reference, the same computation one query at a time."""
    import numba

    from minislm.kernels.attention import _attention_kernel_reference

    rng = np.random.default_rng(6)
    B, T, N, D = 3, 45, 3, 32
    qkv, mask, pos_bias = rand(rng, B, T, 3 * N * D), padding_mask([45, 9, 30], T, F32_MIN), rand(rng, N, T, T)
    want = np.empty((B, T, N * D), np.float32)
    _attention_kernel_reference(qkv, mask, N, pos_bias, numba.config.NUMBA_NUM_THREADS, want)
    assert_close(attention(qkv, mask, N, pos_bias), want, KERNEL_ATOL, KERNEL_RTOL, "tiled vs one-query kernel")


def test_simd_max_and_horizontal_max():
    from numba import njit

    from minislm.kernels.simd import hmax16, load16, max16

    @njit
    def row_max(row):
        peak = load16(row, 0)
        for j in range(16, row.shape[0], 16):
            peak = max16(peak, load16(row, j))
        return hmax16(peak)

    rng = np.random.default_rng(7)
    for _ in range(5):
        row = rand(rng, 64)
        assert row_max(row) == row.max()
    row = np.full(32, -np.inf, np.float32)
    assert row_max(row) == -np.inf
    row[17] = -3.0
    assert row_max(row) == -3.0


def test_attention_all_keys_masked_gives_zeros():
    qkv = np.ones((1, 3, 6), np.float32)
    np.testing.assert_array_equal(attention(qkv, np.full((1, 3), -np.inf, np.float32), 1), 0.0)


# ---------------------------------------------------------------- layer norm

@pytest.mark.parametrize("M,H", [(1, 1), (7, 5), (33, 384), (4, 768)])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("eps", [1e-12, 1e-5])
def test_layer_norm_matches_reference_and_torch(M, H, with_residual, eps):
    rng = np.random.default_rng(M + H)
    x, gamma, beta = rand(rng, M, H), rand(rng, H), rand(rng, H)
    residual = rand(rng, M, H) if with_residual else None
    got = layer_norm(x, gamma, beta, eps, residual)
    h = x if residual is None else x + residual  # the kernel normalises the float32 sum
    want = layer_norm_reference(h.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64), eps)
    assert_close(got, want, KERNEL_ATOL, KERNEL_RTOL, "layer_norm vs reference")
    ref_torch = F.layer_norm(t(h), (H,), t(gamma), t(beta), eps).numpy()
    assert_close(got, ref_torch, KERNEL_ATOL, KERNEL_RTOL, "layer_norm vs torch")


@pytest.mark.parametrize("mean", [1e4, -3e4])
def test_layer_norm_large_mean_rows(mean):
    """|mean| >> std: a one-pass E[h^2] - E[h]^2 in float32 would lose every digit of the variance."""
    rng = np.random.default_rng(6)
    x, residual = rand(rng, 16, 384) + np.float32(mean), rand(rng, 16, 384)
    gamma, beta = rand(rng, 384), rand(rng, 384)
    got = layer_norm(x, gamma, beta, 1e-12, residual)
    h64 = (x + residual).astype(np.float64)
    want = layer_norm_reference(h64, gamma.astype(np.float64), beta.astype(np.float64), 1e-12)
    assert_close(got, want, KERNEL_ATOL, KERNEL_RTOL, "layer_norm large mean vs reference")
    ref_torch = F.layer_norm(t(h64), (384,), t(gamma).double(), t(beta).double(), 1e-12).numpy()
    assert_close(got, ref_torch, KERNEL_ATOL, KERNEL_RTOL, "layer_norm large mean vs torch float64")


def test_layer_norm_in_place_over_residual():
    rng = np.random.default_rng(7)
    x, residual, gamma, beta = rand(rng, 5, 64), rand(rng, 5, 64), rand(rng, 64), rand(rng, 64)
    want = layer_norm_reference((x + residual).astype(np.float64), gamma, beta, 1e-5)
    assert layer_norm(x, gamma, beta, 1e-5, residual, out=residual) is residual
    assert_close(residual, want, KERNEL_ATOL, KERNEL_RTOL, "layer_norm out=residual")


# ---------------------------------------------------------------- activations

@pytest.mark.parametrize("shape", [(1,), (3, 5, 7), (100_003,)])
def test_gelu_matches_reference_and_torch(shape):
    rng = np.random.default_rng(len(shape))
    x = rand(rng, *shape, scale=4.0)
    got = gelu(x)
    assert_close(got, gelu_reference(x), KERNEL_ATOL, KERNEL_RTOL, "gelu vs reference")
    assert_close(got, F.gelu(t(x), approximate="none").numpy(), KERNEL_ATOL, KERNEL_RTOL, "gelu vs torch")


def test_gelu_extremes_and_out():
    x = np.array([-1e4, -40.0, -5.0, -1e-30, 0.0, 1e-30, 3.9, 4.1, 40.0, 1e4], np.float32)
    out = np.empty_like(x)
    assert gelu(x, out=out) is out
    assert_close(out, gelu_reference(x), KERNEL_ATOL, KERNEL_RTOL, "gelu extremes vs reference")
    assert_close(out, F.gelu(t(x)).numpy(), KERNEL_ATOL, KERNEL_RTOL, "gelu extremes vs torch")


@pytest.mark.parametrize("shape", [(1,), (3, 1), (4, 7), (2, 3, 129)])
def test_softmax_matches_reference_and_torch(shape):
    rng = np.random.default_rng(sum(shape))
    x = rand(rng, *shape, scale=3.0)
    got = softmax(x)
    assert_close(got, softmax_reference(x.astype(np.float64)), KERNEL_ATOL, KERNEL_RTOL, "softmax vs reference")
    assert_close(got, torch.softmax(t(x), -1).numpy(), KERNEL_ATOL, KERNEL_RTOL, "softmax vs torch")


def test_softmax_extremes():
    """Integer inputs near +-1e4 (so x - max is exact), masked -inf entries, and an all -inf row (NaN, as torch)."""
    rng = np.random.default_rng(8)
    x = rng.integers(-10_000, 10_001, size=(6, 50)).astype(np.float32)
    x[1, ::2] = -np.inf
    x[2, :] = 1e4
    x[3, :] = -np.inf
    out = np.empty_like(x)
    assert softmax(x, out=out) is out
    want = torch.softmax(t(x), -1).numpy()
    np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
    keep = ~np.isnan(want)
    with np.errstate(invalid="ignore"):  # the all -inf row: -inf - -inf
        want64 = softmax_reference(x.astype(np.float64))
    assert_close(out[keep], want64[keep], KERNEL_ATOL, KERNEL_RTOL,
                 "softmax extremes vs reference")
    assert_close(out[keep], want[keep], KERNEL_ATOL, KERNEL_RTOL, "softmax extremes vs torch")
    assert np.all(out[1, ::2] == 0.0)


# ---------------------------------------------------------------- wrapper errors

F32 = np.zeros((4, 6), np.float32)
QKV = np.zeros((2, 3, 12), np.float32)
MASK = np.zeros((2, 3), np.float32)
SQUARE = np.zeros((4, 4), np.float32)

BAD_CALLS = [
    (lambda: linear(F32.astype(np.float64), F32), "x must be float32, got float64; convert with x.astype"),
    (lambda: linear(F32, np.zeros((6, 4), np.float32).T), "w must be C-contiguous; copy it with np.ascontiguousarray"),
    (lambda: linear(F32, np.zeros((5, 7), np.float32)), "w must be [N, K]"),
    (lambda: linear(F32, F32, np.zeros(3, np.float32)), "b has shape (3,), expected (4,)"),
    (lambda: linear(F32, F32, out=np.zeros((4, 5), np.float32)), "out has shape (4, 5), expected (4, 4)"),
    (lambda: linear(F32, F32, out=np.zeros((4, 8), np.float32)[:, :4]), "out must be C-contiguous"),
    (lambda: linear(SQUARE, SQUARE, out=SQUARE), "out overlaps x or w"),
    (lambda: linear([[1.0]], F32), "x must be a numpy array, got list"),
    (lambda: attention(QKV, MASK, 3), "must be 3 * H with H divisible by n_heads=3"),
    (lambda: attention(QKV, MASK[:1], 2), "mask_add has shape (1, 3), expected (2, 3)"),
    (lambda: attention(QKV, MASK, 2, np.zeros((2, 3, 4), np.float32)),
     "pos_bias has shape (2, 3, 4), expected (2, 3, 3)"),
    (lambda: attention(QKV[0], MASK, 2), "qkv must have 3 dimensions"),
    (lambda: attention(QKV, MASK, 0), "n_heads must be a positive int"),
    (lambda: layer_norm(F32, np.zeros(5, np.float32), np.zeros(6, np.float32), 1e-5), "gamma has shape (5,)"),
    (lambda: layer_norm(F32, F32[0], F32[0], 1e-5, residual=F32[:2]), "residual has shape (2, 6), expected (4, 6)"),
    (lambda: layer_norm(F32, F32[0], F32[0], 0.0), "eps must be a positive float"),
    (lambda: gelu(F32.astype(np.float16)), "x must be float32, got float16"),
    (lambda: softmax(np.zeros((3, 0), np.float32)), "softmax: x needs a non-empty last axis"),
]


@pytest.mark.parametrize("call,message", BAD_CALLS)
def test_wrappers_reject_bad_input_with_a_remedy(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value)


# ---------------------------------------------------------------- numba set-up

def test_vector_width_follows_the_cpu_features(monkeypatch):
    import numba

    from minislm import numba_setup

    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx2,+fma,+avx512f,-prefer-256-bit")
    assert numba_setup.vector_width_bits() == 512
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx2,+fma,+avx512f")  # LLVM's default preference
    assert numba_setup.vector_width_bits() == 256
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx2,+fma,-avx512f")
    assert numba_setup.vector_width_bits() == 256


def test_user_cpu_features_are_left_alone(monkeypatch):
    import numba

    from minislm import numba_setup

    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+avx2,+fma")
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx2,+fma")
    assert numba_setup.prefer_512_bit_vectors() is False
    assert numba.config.CPU_FEATURES == "+avx2,+fma"
    monkeypatch.delenv("NUMBA_CPU_FEATURES")
    assert numba_setup.prefer_512_bit_vectors() is False  # Numba's code generator exists by now: too late
    assert numba.config.CPU_FEATURES == "+avx2,+fma"


def test_attention_scratch_is_reused_and_checked():
    from minislm.kernels.attention import AttentionScratch

    rng = np.random.default_rng(8)
    scratch = AttentionScratch(20, 16)
    for lengths in ([20, 5], [3, 20]):  # two calls through the same buffers, as two layers do
        qkv, mask = rand(rng, 2, 20, 3 * 2 * 16), padding_mask(lengths, 20, F32_MIN)
        want = attention_reference(qkv.astype(np.float64), mask.astype(np.float64), 2)
        assert_close(attention(qkv, mask, 2, scratch=scratch), want, KERNEL_ATOL, KERNEL_RTOL, "reused scratch")
    with pytest.raises(ValueError, match=r"scratch was made for T=20, head dim 16.*AttentionScratch\(21, 16\)"):
        attention(rand(rng, 1, 21, 96), np.zeros((1, 21), np.float32), 2, scratch=scratch)
