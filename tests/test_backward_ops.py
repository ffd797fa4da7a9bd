"""Every encoder op's backward: the NumPy reference against torch.autograd and central finite differences
(both float64), then the float32 Numba kernel against the reference.

The finite differences perturb torch's float64 forward, so they check the references against nothing but the
forward's definition. Odd shapes, T = 1, rows with a single real token and MPNet's position bias are covered on
purpose; every shape is small, so the file runs in seconds once Numba's cache is warm.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minislm.encoder.pooling import pool_cls_backward, pool_mean_backward
from minislm.kernels.activations import gelu_backward, gelu_backward_reference
from minislm.kernels.attention import attention_backward, attention_backward_reference
from minislm.kernels.embedding import embed_backward, embedding_backward, row_gradient
from minislm.kernels.matmul import (GROUP_MIN_ROWS, NR, TransposedWeight, linear, linear_backward,
                                    linear_backward_reference, pack_weight)
from minislm.kernels.norm import layer_norm_backward, layer_norm_backward_reference
from tests.gradcheck import numeric_grad
from tests.tolerances import (ATTENTION_BACKWARD_RTOL, BACKWARD_KERNEL_ATOL, BACKWARD_KERNEL_RTOL, FD_ATOL, FD_RTOL,
                              GRAD_ATOL, GRAD_RTOL, MATMUL_ATOL, MATMUL_RTOL)

F32_MIN = np.finfo(np.float32).min


def rand(rng, *shape, scale=1.0, dtype=np.float64):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def leaf(a):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=True)


def assert_close(got, want, atol, rtol, what):
    """assert_allclose that shows the first values side by side and the largest difference."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    diff = np.abs(got - want)
    head = f"{what}: first got {got.ravel()[:4]}, want {want.ravel()[:4]}, max |diff| {diff.max(initial=0):.3g}"
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=head)


def torch_grads(forward, inputs, dy):
    """d(sum(forward(*inputs) * dy)) / d(each input) by torch.autograd in float64; None inputs stay None."""
    leaves = [None if a is None else leaf(a) for a in inputs]
    (forward(*leaves) * torch.from_numpy(dy)).sum().backward()
    return [None if t is None else t.grad.numpy() for t in leaves]


def fd_grads(forward, inputs, dy, which):
    """Central differences of sum(forward(*inputs) * dy) in torch float64, for the inputs numbered in `which`."""
    def loss(i):
        def f(a):
            args = [None if v is None else torch.from_numpy(a if j == i else v) for j, v in enumerate(inputs)]
            return float((forward(*args) * torch.from_numpy(dy)).sum())
        return f
    return {i: numeric_grad(loss(i), inputs[i].copy()) for i in which}


def padding_mask(lengths, T, fill, dtype=np.float64):
    """[B] real-token counts -> [B, T] additive mask: 0 on real tokens, `fill` on padding."""
    return np.where(np.arange(T)[None, :] < np.asarray(lengths)[:, None], 0.0, fill).astype(dtype)


# ---------------------------------------------------------------- linear

def torch_linear(x, w, b):
    return x @ w.T + b


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (5, 7, 3), (33, 40, 65), (2, 70, 33)])
def test_linear_backward_reference_matches_autograd(M, K, N):
    rng = np.random.default_rng(M + K + N)
    x, w, b, dy = rand(rng, M, K), rand(rng, N, K), rand(rng, N), rand(rng, M, N)
    got = linear_backward_reference(x, w, dy)
    for g, want, name in zip(got, torch_grads(torch_linear, (x, w, b), dy), ("dx", "dw", "db")):
        assert_close(g, want, GRAD_ATOL, GRAD_RTOL, f"linear {name} vs autograd")


def test_linear_backward_reference_matches_finite_differences():
    rng = np.random.default_rng(0)
    x, w, b, dy = rand(rng, 3, 5), rand(rng, 4, 5), rand(rng, 4), rand(rng, 3, 4)
    got = linear_backward_reference(x, w, dy)
    for i, num in fd_grads(torch_linear, (x, w, b), dy, (0, 1, 2)).items():
        assert_close(got[i], num, FD_ATOL, FD_RTOL, f"linear input {i} vs finite differences")


def check_linear_grads(x, w, dy, got, what):
    """float32 gradients vs the float64 reference, the error bound relative to the magnitudes summed (as forward)."""
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
    want = linear_backward_reference(x64, w64, dy64)
    bounds = (np.abs(dy64) @ np.abs(w64), np.abs(dy64).T @ np.abs(x64), np.abs(dy64).sum(axis=0))
    for name, g, ref, bound in zip(("dx", "dw", "db"), got, want, bounds):
        if g is None:
            continue
        err = np.abs(g - ref)
        assert g.dtype == np.float32 and g.shape == ref.shape, f"{what} {name}: {g.dtype} {g.shape}"
        assert np.all(err <= MATMUL_ATOL + MATMUL_RTOL * bound), f"{what} {name}: max |diff| {err.max():.3g}"


LINEAR_KERNEL_SHAPES = [  # (M, K, N): tails of panels on either side, one row, many rows (grouped panels)
    (1, 5, 7), (33, 17, 9), (37, 100, 65), (8, 64, 32), (GROUP_MIN_ROWS + 9, 40, 3 * NR + 5)]


@pytest.mark.parametrize("M,K,N", LINEAR_KERNEL_SHAPES)
@pytest.mark.parametrize("backend", ["numba", "blas"])
def test_linear_backward_kernel_matches_reference(M, K, N, backend):
    rng = np.random.default_rng(M * 7 + K + N)
    x, w, dy = (rand(rng, *s, dtype=np.float32) for s in ((M, K), (N, K), (M, N)))
    check_linear_grads(x, w, dy, linear_backward(x, w, dy, backend=backend), f"linear_backward {M}x{K}x{N}")


def test_linear_backward_packed_weight_accumulate_and_no_dx():
    rng = np.random.default_rng(1)
    x, w, dy = rand(rng, 19, 45, dtype=np.float32), rand(rng, 70, 45, dtype=np.float32), rand(rng, 19, 70,
                                                                                            dtype=np.float32)
    plain = linear_backward(x, w, dy)
    packed = linear_backward(x, pack_weight(w), dy)
    for a, b in zip(plain, packed):
        np.testing.assert_array_equal(a, b)
    dw0, db0 = rand(rng, 70, 45, dtype=np.float32), rand(rng, 70, dtype=np.float32)
    dw, db = dw0.copy(), db0.copy()
    dx, dw_out, db_out = linear_backward(x, w, dy, need_dx=False, dw=dw, db=db, accumulate=True)
    assert dx is None and dw_out is dw and db_out is db
    assert_close(dw, dw0 + plain[1], BACKWARD_KERNEL_ATOL, BACKWARD_KERNEL_RTOL, "accumulated dw")
    assert_close(db, db0 + plain[2], BACKWARD_KERNEL_ATOL, BACKWARD_KERNEL_RTOL, "accumulated db")
    dw_stale = np.full((70, 45), np.nan, np.float32)  # written, not added to
    assert linear_backward(x, w, dy, dw=dw_stale)[1] is dw_stale
    np.testing.assert_array_equal(dw_stale, plain[1])


@pytest.mark.parametrize("R,C", [(5, 1), (7, NR), (3, 2 * NR + 3)])
def test_transposed_weight_computes_y_times_a(R, C):
    rng = np.random.default_rng(R + C)
    a, y = rand(rng, R, C, dtype=np.float32), rand(rng, 4, R, dtype=np.float32)
    ta = TransposedWeight(a)
    assert ta.shape == (C, R)
    np.testing.assert_array_equal(ta.unpack(), a.T)
    assert_close(linear(y, ta), y.astype(np.float64) @ a, MATMUL_ATOL, MATMUL_RTOL, "linear(y, a^T)")


@pytest.mark.parametrize("N,K", [(5, 1), (NR, 7), (2 * NR + 3, NR + 1), (3 * NR, 2 * NR)])
def test_packed_weight_transposed_equals_a_fresh_pack_and_is_kept(N, K):
    # dx = dy @ w reads w^T's panels: re-packed from the forward panels once per weight, not at every backward
    rng = np.random.default_rng(N * K)
    w = rand(rng, N, K, dtype=np.float32)
    packed = pack_weight(w)
    t = packed.transposed()
    assert t is packed.transposed()
    assert t.shape == (K, N)
    np.testing.assert_array_equal(t.panels, TransposedWeight(w).panels)
    np.testing.assert_array_equal(t.unpack(), w.T)
    dy = rand(rng, 9, N, dtype=np.float32)
    assert_close(linear(dy, t), dy.astype(np.float64) @ w, MATMUL_ATOL, MATMUL_RTOL, "linear(dy, w^T)")


def test_linear_backward_rejects_bad_input():
    x = np.zeros((4, 6), np.float32)
    with pytest.raises(ValueError, match=r"dy has shape \(4, 3\), expected \(4, 5\)"):
        linear_backward(x, np.zeros((5, 6), np.float32), np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="accumulate=True needs the dw and db"):
        linear_backward(x, np.zeros((5, 6), np.float32), np.zeros((4, 5), np.float32), accumulate=True)


# ---------------------------------------------------------------- GELU

GELU_EXTREMES = np.array([-1e4, -40.0, -13.5, -5.0, -1e-30, 0.0, 1e-30, 0.7, 3.9, 4.1, 13.5, 40.0, 1e4])


@pytest.mark.parametrize("shape", [(1,), (3, 5, 7)])
def test_gelu_backward_reference_matches_autograd_and_finite_differences(shape):
    rng = np.random.default_rng(len(shape))
    x, dy = rand(rng, *shape, scale=3.0), rand(rng, *shape)
    got = gelu_backward_reference(x, dy)
    assert got.dtype == np.float64
    forward = lambda a: F.gelu(a, approximate="none")  # noqa: E731
    assert_close(got, torch_grads(forward, (x,), dy)[0], GRAD_ATOL, GRAD_RTOL, "gelu' vs autograd")
    assert_close(got, fd_grads(forward, (x,), dy, (0,))[0], FD_ATOL, FD_RTOL, "gelu' vs finite differences")
    dy_ext = np.ones_like(GELU_EXTREMES)
    assert_close(gelu_backward_reference(GELU_EXTREMES, dy_ext), torch_grads(forward, (GELU_EXTREMES,), dy_ext)[0],
                 GRAD_ATOL, GRAD_RTOL, "gelu' extremes vs autograd")


@pytest.mark.parametrize("shape", [(1,), (3, 5, 7), (100_003,)])
def test_gelu_backward_kernel_matches_reference(shape):
    rng = np.random.default_rng(sum(shape))
    x, dy = rand(rng, *shape, scale=4.0, dtype=np.float32), rand(rng, *shape, dtype=np.float32)
    want = gelu_backward_reference(x.astype(np.float64), dy.astype(np.float64))
    assert_close(gelu_backward(x, dy), want, BACKWARD_KERNEL_ATOL, BACKWARD_KERNEL_RTOL, "gelu_backward")
    assert gelu_backward(x, dy, out=dy) is dy  # in place over the incoming gradient
    assert_close(dy, want, BACKWARD_KERNEL_ATOL, BACKWARD_KERNEL_RTOL, "gelu_backward out=dy")


def test_gelu_backward_kernel_extremes():
    x = GELU_EXTREMES.astype(np.float32)
    dy = np.full_like(x, 3.0)
    want = gelu_backward_reference(GELU_EXTREMES, dy.astype(np.float64))
    assert_close(gelu_backward(x, dy), want, BACKWARD_KERNEL_ATOL, BACKWARD_KERNEL_RTOL, "gelu_backward extremes")


# ---------------------------------------------------------------- residual + layer norm

def torch_layer_norm(eps):
    def forward(x, residual, gamma, beta):
        h = x if residual is None else x + residual
        return F.layer_norm(h, (h.shape[-1],), gamma, beta, eps)
    return forward


@pytest.mark.parametrize("M,H", [(1, 1), (7, 5), (33, 64)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_layer_norm_backward_reference_matches_autograd(M, H, with_residual):
    rng = np.random.default_rng(M + H)
    x, gamma, beta, dy = rand(rng, M, H), rand(rng, H), rand(rng, H), rand(rng, M, H)
    residual = rand(rng, M, H) if with_residual else None
    dh, dgamma, dbeta = layer_norm_backward_reference(x, gamma, 1e-5, dy, residual)
    want = torch_grads(torch_layer_norm(1e-5), (x, residual, gamma, beta), dy)
    assert_close(dh, want[0], GRAD_ATOL, GRAD_RTOL, "layer norm dx vs autograd")
    if with_residual:
        assert_close(dh, want[1], GRAD_ATOL, GRAD_RTOL, "layer norm dresidual vs autograd")
    assert_close(dgamma, want[2], GRAD_ATOL, GRAD_RTOL, "layer norm dgamma vs autograd")
    assert_close(dbeta, want[3], GRAD_ATOL, GRAD_RTOL, "layer norm dbeta vs autograd")


def test_layer_norm_backward_reference_matches_finite_differences():
    rng = np.random.default_rng(2)
    x, residual, gamma, beta, dy = rand(rng, 4, 6), rand(rng, 4, 6), rand(rng, 6), rand(rng, 6), rand(rng, 4, 6)
    dh, dgamma, dbeta = layer_norm_backward_reference(x, gamma, 1e-5, dy, residual)
    num = fd_grads(torch_layer_norm(1e-5), (x, residual, gamma, beta), dy, (0, 1, 2, 3))
    for got, i, name in ((dh, 0, "dx"), (dh, 1, "dresidual"), (dgamma, 2, "dgamma"), (dbeta, 3, "dbeta")):
        assert_close(got, num[i], FD_ATOL, FD_RTOL, f"layer norm {name} vs finite differences")


def check_layer_norm_kernel(x, residual, gamma, eps, dy, got, what):
    h = x if residual is None else x + residual  # the kernel normalises the float32 sum, as the forward
    want = layer_norm_backward_reference(*(a.astype(np.float64) for a in (h, gamma)), eps, dy.astype(np.float64))
    for name, g, ref in zip(("dh", "dgamma", "dbeta"), got, want):
        assert g.dtype == np.float32
        scale = np.abs(ref).max(initial=1.0)  # dgamma, dbeta sum M rows: bound relative to their size
        assert_close(g, ref, BACKWARD_KERNEL_ATOL * scale, BACKWARD_KERNEL_RTOL, f"{what} {name}")


@pytest.mark.parametrize("M,H", [(1, 1), (7, 5), (100, 384), (3, 768)])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("eps", [1e-12, 1e-5])
def test_layer_norm_backward_kernel_matches_reference(M, H, with_residual, eps):
    rng = np.random.default_rng(M * 3 + H)
    x, gamma, dy = rand(rng, M, H, dtype=np.float32), rand(rng, H, dtype=np.float32), rand(rng, M, H,
                                                                                          dtype=np.float32)
    residual = rand(rng, M, H, dtype=np.float32) if with_residual else None
    check_layer_norm_kernel(x, residual, gamma, eps, dy, layer_norm_backward(x, gamma, eps, dy, residual),
                            f"layer_norm_backward {M}x{H}")


@pytest.mark.parametrize("mean", [1e4, -3e4])
def test_layer_norm_backward_kernel_large_mean_rows(mean):
    rng = np.random.default_rng(3)
    x = rand(rng, 40, 384, dtype=np.float32) + np.float32(mean)
    residual, gamma, dy = rand(rng, 40, 384, dtype=np.float32), rand(rng, 384, dtype=np.float32), \
        rand(rng, 40, 384, dtype=np.float32)
    check_layer_norm_kernel(x, residual, gamma, 1e-12, dy, layer_norm_backward(x, gamma, 1e-12, dy, residual),
                            "layer_norm_backward large mean")


def test_layer_norm_backward_kernel_in_place_and_accumulate():
    rng = np.random.default_rng(4)
    x, residual, gamma = rand(rng, 70, 33, dtype=np.float32), rand(rng, 70, 33, dtype=np.float32), \
        rand(rng, 33, dtype=np.float32)
    dy = rand(rng, 70, 33, dtype=np.float32)
    fresh = layer_norm_backward(x, gamma, 1e-5, dy, residual)
    dgamma0, dbeta0 = rand(rng, 33, dtype=np.float32), rand(rng, 33, dtype=np.float32)
    dgamma, dbeta = dgamma0.copy(), dbeta0.copy()
    got = layer_norm_backward(x, gamma, 1e-5, dy, residual, out=dy, dgamma=dgamma, dbeta=dbeta, accumulate=True)
    assert got[0] is dy and got[1] is dgamma and got[2] is dbeta
    np.testing.assert_array_equal(dy, fresh[0])
    assert_close(dgamma, dgamma0 + fresh[1], BACKWARD_KERNEL_ATOL, BACKWARD_KERNEL_RTOL, "accumulated dgamma")
    assert_close(dbeta, dbeta0 + fresh[2], BACKWARD_KERNEL_ATOL, BACKWARD_KERNEL_RTOL, "accumulated dbeta")


# ---------------------------------------------------------------- attention

def torch_attention(n_heads):
    def forward(qkv, mask_add, pos_bias):
        B, T, H3 = qkv.shape
        q, k, v = (qkv[:, :, i * H3 // 3:(i + 1) * H3 // 3].reshape(B, T, n_heads, -1).transpose(1, 2)
                   for i in range(3))
        s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + mask_add[:, None, None, :]
        if pos_bias is not None:
            s = s + pos_bias[None]
        return (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, T, H3 // 3)
    return forward


ATTENTION_GRAD_CASES = [  # (B, T, N, D, lengths, with pos_bias)
    (2, 5, 2, 3, [5, 2], False),
    (1, 1, 2, 4, [1], True),           # T = 1
    (3, 6, 2, 2, [1, 6, 1], True),     # rows with one real token
    (2, 7, 3, 2, [7, 4], True),        # odd T, three heads
]


def attention_inputs(rng, B, T, N, D, lengths, with_bias, fill, dtype):
    qkv, dctx = rand(rng, B, T, 3 * N * D, dtype=dtype), rand(rng, B, T, N * D, dtype=dtype)
    pos_bias = rand(rng, N, T, T, dtype=dtype) if with_bias else None
    return qkv, padding_mask(lengths, T, fill, dtype), pos_bias, dctx


@pytest.mark.parametrize("B,T,N,D,lengths,with_bias", ATTENTION_GRAD_CASES)
@pytest.mark.parametrize("fill", [F32_MIN, -1e4])
def test_attention_backward_reference_matches_autograd(B, T, N, D, lengths, with_bias, fill):
    rng = np.random.default_rng(B * 10 + T)
    qkv, mask, pos_bias, dctx = attention_inputs(rng, B, T, N, D, lengths, with_bias, fill, np.float64)
    dqkv, dbias = attention_backward_reference(qkv, mask, N, pos_bias, dctx)
    want_qkv, _, want_bias = torch_grads(torch_attention(N), (qkv, mask, pos_bias), dctx)
    assert_close(dqkv, want_qkv, GRAD_ATOL, GRAD_RTOL, "attention dqkv vs autograd")  # padding query rows too
    if with_bias:
        assert_close(dbias, want_bias, GRAD_ATOL, GRAD_RTOL, "attention dpos_bias vs autograd")
    else:
        assert dbias is None


@pytest.mark.parametrize("B,T,N,D,lengths,with_bias", ATTENTION_GRAD_CASES)
def test_attention_backward_reference_matches_finite_differences(B, T, N, D, lengths, with_bias):
    rng = np.random.default_rng(B * 10 + T + 1)
    qkv, mask, pos_bias, dctx = attention_inputs(rng, B, T, N, D, lengths, with_bias, F32_MIN, np.float64)
    dqkv, dbias = attention_backward_reference(qkv, mask, N, pos_bias, dctx)
    num = fd_grads(torch_attention(N), (qkv, mask, pos_bias), dctx, (0, 2) if with_bias else (0,))
    assert_close(dqkv, num[0], FD_ATOL, FD_RTOL, "attention dqkv vs finite differences")
    if with_bias:
        assert_close(dbias, num[2], FD_ATOL, FD_RTOL, "attention dpos_bias vs finite differences")


ATTENTION_KERNEL_CASES = ATTENTION_GRAD_CASES + [
    (3, 64, 4, 16, [1, 64, 30], True),
    (2, 33, 12, 32, [33, 20], True),   # MiniLM's head size, odd T
    (2, 40, 2, 64, [40, 17], True),    # MPNet's head size
    (5, 9, 3, 8, [9, 1, 2, 9, 5], True),  # more batch rows than threads share each head's bias gradient
]


def check_attention_kernel(got, want, what):
    for name, g, ref in zip(("dqkv", "dpos_bias"), got, want):
        if ref is None:
            assert g is None, f"{what}: {name} should be None"
            continue
        assert g.dtype == np.float32 and g.shape == ref.shape
        assert_close(g, ref, ATTENTION_BACKWARD_RTOL * np.abs(ref).max(initial=1.0), ATTENTION_BACKWARD_RTOL,
                     f"{what} {name}")


@pytest.mark.parametrize("B,T,N,D,lengths,with_bias", ATTENTION_KERNEL_CASES)
@pytest.mark.parametrize("fill", [F32_MIN, -1e4])
def test_attention_backward_kernel_matches_reference(B, T, N, D, lengths, with_bias, fill):
    rng = np.random.default_rng(B * 100 + T + N)
    qkv, mask, pos_bias, dctx = attention_inputs(rng, B, T, N, D, lengths, with_bias, fill, np.float32)
    got = attention_backward(qkv, mask, N, pos_bias, dctx)
    want = attention_backward_reference(qkv.astype(np.float64), mask.astype(np.float64), N,
                                        None if pos_bias is None else pos_bias.astype(np.float64),
                                        dctx.astype(np.float64))
    check_attention_kernel(got, want, f"attention_backward B{B} T{T} N{N} D{D}")
    H = N * D
    for b, length in enumerate(lengths):  # padding keys: exactly zero, not merely small
        assert np.all(got[0][b, length:, H:] == 0.0), f"row {b}: padding keys got a nonzero dk or dv"


def test_attention_backward_all_keys_masked_gives_zeros_and_writes_out():
    rng = np.random.default_rng(9)
    qkv, dctx = rand(rng, 2, 3, 12, dtype=np.float32), rand(rng, 2, 3, 4, dtype=np.float32)
    mask = np.zeros((2, 3), np.float32)
    mask[1] = -np.inf  # the forward gives zeros for row 1, so every gradient through it is zero
    out = np.full((2, 3, 12), np.nan, np.float32)
    dqkv, dbias = attention_backward(qkv, mask, 2, np.zeros((2, 3, 3), np.float32), dctx, out=out)
    assert dqkv is out
    np.testing.assert_array_equal(out[1], 0.0)
    want = attention_backward_reference(qkv[:1].astype(np.float64), mask[:1].astype(np.float64), 2,
                                        np.zeros((2, 3, 3)), dctx[:1].astype(np.float64))
    check_attention_kernel((out[:1], dbias), want, "attention_backward with a fully masked row")


def test_attention_backward_rejects_bad_input():
    qkv, mask, dctx = np.zeros((2, 3, 12), np.float32), np.zeros((2, 3), np.float32), np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match=r"dctx has shape \(2, 3, 5\), expected \(2, 3, 4\)"):
        attention_backward(qkv, mask, 2, None, np.zeros((2, 3, 5), np.float32))
    with pytest.raises(ValueError, match=r"pos_bias has shape \(2, 3, 4\), expected \(2, 3, 3\)"):
        attention_backward(qkv, mask, 2, np.zeros((2, 3, 4), np.float32), dctx)
    with pytest.raises(ValueError, match="out overlaps qkv or dctx"):
        attention_backward(qkv, mask, 2, None, dctx, out=qkv)


# ---------------------------------------------------------------- embeddings and pooling

V, P, H_EMB, PAD = 11, 9, 6, 1
IDS = np.array([[0, 5, 7, 5, 2], [0, 3, PAD, PAD, PAD], [0, PAD, PAD, PAD, PAD]])  # repeats, heavy padding


def embedding_case(family, dtype):
    rng = np.random.default_rng(5)
    if family == "bert":
        positions = np.broadcast_to(np.arange(IDS.shape[1]), IDS.shape)
        token_type = rand(rng, 2, H_EMB, dtype=dtype)
    else:  # MPNet: positions counted over real tokens from PAD + 1, padding at PAD
        real = (IDS != PAD).astype(np.int64)
        positions = np.cumsum(real, axis=1) * real + PAD
        token_type = None
    tables = rand(rng, V, H_EMB, dtype=dtype), rand(rng, P, H_EMB, dtype=dtype), token_type
    return positions, tables, rand(rng, H_EMB, dtype=dtype), rand(rng, H_EMB, dtype=dtype), \
        rand(rng, *IDS.shape, H_EMB, dtype=dtype)


def torch_embed(ids, positions, eps):
    def forward(word, position, token_type, gamma, beta):
        h = word[torch.from_numpy(ids)] + position[torch.from_numpy(np.ascontiguousarray(positions))]
        if token_type is not None:
            h = h + token_type[0]
        return F.layer_norm(h, (h.shape[-1],), gamma, beta, eps)
    return forward


def dense_word_grad(word_ids, d_rows):
    dense = np.zeros((V, H_EMB))
    dense[word_ids] = d_rows
    return dense


@pytest.mark.parametrize("family", ["bert", "mpnet"])
def test_embed_backward_matches_autograd_and_finite_differences(family):
    positions, (word, position, token_type), gamma, beta, d_out = embedding_case(family, np.float64)
    got = embed_backward(IDS, positions, word, position, token_type, gamma, 1e-5, d_out)
    assert list(got["word"][0]) == sorted(set(IDS.ravel()))
    forward = torch_embed(IDS, positions, 1e-5)
    inputs = (word, position, token_type, gamma, beta)
    want = torch_grads(forward, inputs, d_out)
    assert_close(dense_word_grad(*got["word"]), want[0], GRAD_ATOL, GRAD_RTOL, "d word vs autograd")
    assert_close(got["position"], want[1], GRAD_ATOL, GRAD_RTOL, "d position vs autograd")
    if family == "bert":
        assert_close(got["token_type"], want[2], GRAD_ATOL, GRAD_RTOL, "d token type vs autograd")
    else:
        assert got["token_type"] is None
    assert_close(got["ln_gamma"], want[3], GRAD_ATOL, GRAD_RTOL, "d ln gamma vs autograd")
    assert_close(got["ln_beta"], want[4], GRAD_ATOL, GRAD_RTOL, "d ln beta vs autograd")
    num = fd_grads(forward, inputs, d_out, (0, 1))
    assert_close(dense_word_grad(*got["word"]), num[0], FD_ATOL, FD_RTOL, "d word vs finite differences")
    assert_close(got["position"], num[1], FD_ATOL, FD_RTOL, "d position vs finite differences")


def test_embed_backward_float32_kernel_path_matches_float64():
    positions, tables, gamma, beta, d_out = embedding_case("bert", np.float32)
    got = embed_backward(IDS, positions, *tables, gamma, 1e-5, d_out)
    want = embed_backward(IDS, positions, *(a.astype(np.float64) for a in tables), gamma.astype(np.float64), 1e-5,
                          d_out.astype(np.float64))
    np.testing.assert_array_equal(got["word"][0], want["word"][0])
    for name, g, ref in (("word", got["word"][1], want["word"][1]), ("position", got["position"], want["position"]),
                         ("token_type", got["token_type"], want["token_type"]),
                         ("ln_gamma", got["ln_gamma"], want["ln_gamma"])):
        assert g.dtype == np.float32
        assert_close(g, ref, BACKWARD_KERNEL_ATOL, BACKWARD_KERNEL_RTOL, f"embed_backward float32 {name}")


def test_row_gradient_sums_repeated_ids():
    ids = np.array([4, 2, 4, 9, 2, 4])
    rows = np.arange(12, dtype=np.float64).reshape(6, 2)
    unique, summed = row_gradient(ids, rows)
    np.testing.assert_array_equal(unique, [2, 4, 9])
    np.testing.assert_array_equal(summed, [rows[1] + rows[4], rows[0] + rows[2] + rows[5], rows[3]])
    unique, summed = row_gradient(np.zeros(0, int), np.zeros((0, 3)))
    assert unique.shape == (0,) and summed.shape == (0, 3)
    _, _, d_position, d_type = embedding_backward(ids[None], ids[None] % 3, rows[None], 5, token_type=False)
    assert d_type is None and np.all(d_position[3:] == 0.0)


def test_pool_mean_backward_matches_autograd_and_finite_differences():
    rng = np.random.default_rng(6)
    mask = np.arange(5)[None, :] < np.array([5, 1, 0, 3])[:, None]  # one real token, and none at all
    h, d_pooled = rand(rng, 4, 5, 3), rand(rng, 4, 3)
    m = torch.from_numpy(mask.astype(np.float64))[:, :, None]

    def forward(h_):
        return (h_ * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)

    got = pool_mean_backward(d_pooled, mask)
    assert_close(got, torch_grads(forward, (h,), d_pooled)[0], GRAD_ATOL, GRAD_RTOL, "mean pooling vs autograd")
    assert_close(got, fd_grads(forward, (h,), d_pooled, (0,))[0], FD_ATOL, FD_RTOL, "mean pooling vs finite diff")
    assert np.all(got[~mask] == 0.0)


def test_pool_cls_backward_matches_autograd():
    rng = np.random.default_rng(7)
    h, d_pooled = rand(rng, 3, 4, 2), rand(rng, 3, 2)
    got = pool_cls_backward(d_pooled, 4)
    assert_close(got, torch_grads(lambda h_: h_[:, 0], (h,), d_pooled)[0], GRAD_ATOL, GRAD_RTOL, "CLS vs autograd")


def test_attention_backward_tiled_kernel_matches_its_readable_version():
    """The tiled kernel against _attention_backward_kernel_reference, the same math one query row at a time."""
    import numba

    from minislm.kernels.attention import _attention_backward_kernel_reference

    rng = np.random.default_rng(10)
    B, T, N, D = 3, 45, 3, 40
    qkv, mask, pos_bias, dctx = attention_inputs(rng, B, T, N, D, [45, 1, 30], True, F32_MIN, np.float32)
    want = np.empty_like(qkv), np.empty((N, T, T), np.float32)
    _attention_backward_kernel_reference(qkv, mask, N, pos_bias, dctx, numba.config.NUMBA_NUM_THREADS, *want)
    check_attention_kernel(attention_backward(qkv, mask, N, pos_bias, dctx), want, "tiled vs one-row kernel")


# ---------------------------------------------------------------- FLOPs

def test_backward_flop_formulas_match_torch_counter():
    """torch.utils.flop_counter counts the products autograd runs; attention_backward runs one more, the
    recomputed scores q k^T, which the forward's count has."""
    from torch.utils.flop_counter import FlopCounterMode

    from minislm.kernels.attention import attention_backward_flops, attention_flops
    from minislm.kernels.matmul import linear_backward_flops

    M, K, N = 6, 10, 7
    x, w, b = leaf(np.ones((M, K))), leaf(np.ones((N, K))), leaf(np.ones(N))
    y = F.linear(x, w, b)
    with FlopCounterMode(display=False) as counter:
        y.sum().backward()
    assert linear_backward_flops(M, K, N)["matmul"] == counter.get_total_flops()
    B, T, Nh, D = 2, 5, 3, 4
    qkv = leaf(np.ones((B, T, 3 * Nh * D)))
    out = torch_attention(Nh)(qkv, torch.zeros(B, T, dtype=torch.float64), None)
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    scores = attention_flops(B, T, Nh, D)["matmul"] // 2  # q k^T, half of the forward's two products
    assert attention_backward_flops(B, T, Nh, D)["matmul"] == counter.get_total_flops() + scores
