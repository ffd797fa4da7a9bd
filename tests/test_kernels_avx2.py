"""The AVX2 kernels (8-lane SIMD, the 6 x 16 tile, panels of 16) against NumPy, on any x86 machine; and the
serial kernels that small inputs (one short text) run on, against the parallel ones.

A process compiles one path, chosen by its CPU (tiles.py). On an AVX-512 machine the AVX2 path is checked
by `test_avx2_path_compiled_for_haswell`, which runs the AVX2-only tests below, and the linear and
attention tests of test_kernels.py, in a child process that Numba compiles for a Haswell
(numba_setup.AVX2_TARGET, with its own cache folder). On an AVX2 machine they run directly.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from numba import njit

from minislm.kernels import tiles
from minislm.kernels.attention import attention, attention_reference
from minislm.kernels.matmul import NR, linear, pack_weight
from minislm.numba_setup import AVX2_TARGET
from tests.test_kernels import assert_close, check_linear, padding_mask, rand
from tests.tolerances import KERNEL_ATOL, KERNEL_RTOL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tests of the AVX2 path run where it is compiled: on an AVX2 host here, on an AVX-512 host in the child
# process below. conftest.py deselects (never skips) them where this process compiled the other path.
avx2_only = pytest.mark.avx2_only


def run_compiled_for_haswell(pytest_args, timeout=900):
    """Run pytest with `pytest_args` in a child process whose kernels are compiled for a Haswell."""
    env = dict(os.environ, **AVX2_TARGET)
    env.pop("MINISLM_PREFER_256", None)
    cache = os.environ.get("NUMBA_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "minislm", "numba"))
    env["NUMBA_CACHE_DIR"] = os.path.join(cache, "haswell")  # its own cache: other CPU, other machine code
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *pytest_args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_this_process_tile_follows_its_cpu():
    from minislm.numba_setup import vector_width_bits

    if vector_width_bits() >= 512:
        assert (tiles.TILE, tiles.PANEL, NR) == ("8x32", 32, 32)
    else:
        assert (tiles.TILE, tiles.PANEL, NR) == ("6x16", 16, 16)


@pytest.mark.avx512_only
def test_avx2_path_compiled_for_haswell():
    run = run_compiled_for_haswell([
        "tests/test_kernels_avx2.py", "tests/test_kernels.py",
        "-k", "(avx2 or linear or attention or packed or simd or tiles_keep) and not compiled_for_haswell",
    ])
    assert run.returncode == 0, f"compiled for Haswell:\n{run.stdout[-3000:]}\n{run.stderr[-2000:]}"
    summary = run.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, summary


# ---------------------------------------------------------------- 8-lane SIMD, on every CPU

def test_simd8_load_store_fma_add():
    from minislm.kernels.simd import add8, fma8, load8, splat8, store8

    @njit
    def run(a, b, c, out):
        store8(out, 0, fma8(load8(a, 0), load8(b, 0), load8(c, 0)))
        store8(out, 8, add8(load8(a, 3), splat8(np.float32(2.5))))

    rng = np.random.default_rng(1)
    a, b, c = rand(rng, 12), rand(rng, 8), rand(rng, 8)
    out = np.full(17, np.nan, np.float32)
    run(a, b, c, out)
    want_fma = (a[:8].astype(np.float64) * b + c).astype(np.float32)  # rounded once, as the FMA does
    np.testing.assert_array_equal(out[:8], want_fma)
    np.testing.assert_array_equal(out[8:16], a[3:11] + np.float32(2.5))
    assert np.isnan(out[16]), "store8 wrote past its 8 lanes"


def test_simd8_max_and_horizontal_max():
    from minislm.kernels.simd import hmax8, load8, max8

    @njit
    def row_max(row):
        peak = load8(row, 0)
        for j in range(8, row.shape[0], 8):
            peak = max8(peak, load8(row, j))
        return hmax8(peak)

    rng = np.random.default_rng(2)
    for _ in range(5):
        row = rand(rng, 40)
        assert row_max(row) == row.max()
    row = np.full(16, -np.inf, np.float32)
    assert row_max(row) == -np.inf
    row[11] = -3.0
    assert row_max(row) == -3.0


def test_simd16_min_and_horizontal_min():
    from minislm.kernels.simd import hmin16, load16, min16

    @njit
    def row_min(row):
        low = load16(row, 0)
        for j in range(16, row.shape[0], 16):
            low = min16(low, load16(row, j))
        return hmin16(low)

    rng = np.random.default_rng(3)
    for _ in range(5):
        row = rand(rng, 48)
        assert row_min(row) == row.min()
    row = np.full(32, np.inf, np.float32)
    assert row_min(row) == np.inf
    row[20] = 5.0
    assert row_min(row) == 5.0


@pytest.mark.parametrize("tile_rows", [6, 2, 1])
def test_avx2_register_tiles_match_numpy(tile_rows):
    """tile_6x16, 2x16 and 1x16 (compiled on any CPU): out[i:i+R, j0:j0+16] = x[i:i+R] @ panel [K, 16]."""
    tile = {6: tiles.tile_6x16, 2: tiles.tile_2x16, 1: tiles.tile_1x16}[tile_rows]

    @njit
    def run(x, panel, out, i, j0, accumulate):
        tile(x, panel, out, i, j0, accumulate)

    rng = np.random.default_rng(tile_rows)
    x, panel = rand(rng, 11, 37), rand(rng, 37, 16)
    out = np.full((11, 48), np.nan, dtype=np.float32)
    block = (slice(3, 3 + tile_rows), slice(16, 32))
    run(x, panel, out, 3, 16, False)
    np.testing.assert_allclose(out[block], x[3:3 + tile_rows] @ panel, rtol=1e-5, atol=1e-5)
    untouched = np.ones(out.shape, bool)
    untouched[block] = False
    assert np.isnan(out[untouched]).all(), "a tile wrote outside its block"
    run(x, panel, out, 3, 16, True)
    np.testing.assert_allclose(out[block], 2 * (x[3:3 + tile_rows] @ panel), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the AVX2 path (compiled for AVX2 only)

AVX2_LINEAR_SHAPES = [  # (M, K, N): M=1, rows left over after 6-row tiles, K odd, N not whole panels
    (1, 1, 1), (1, 384, 1536), (5, 7, 3), (7, 13, 17), (11, 9, 20), (13, 101, 16), (32, 384, 1152), (49, 385, 47),
    (97, 1031, 33), (300, 64, 130),
]


@avx2_only
@pytest.mark.parametrize("M,K,N", AVX2_LINEAR_SHAPES)
@pytest.mark.parametrize("bias,act", [(False, False), (True, False), (True, True)])
def test_avx2_linear_matches_reference(M, K, N, bias, act):
    rng = np.random.default_rng(M * 7 + K * 3 + N)
    x, w = rand(rng, M, K), rand(rng, N, K, scale=K ** -0.5)
    b = rand(rng, N) if bias else None
    packed = pack_weight(w)
    assert packed.panels.shape == (-(-N // 16), K, 16)
    np.testing.assert_array_equal(packed.unpack(), w)
    check_linear(x, w, b, act, linear(x, packed, b, gelu=act), f"avx2 linear {M}x{K}x{N}")


@avx2_only
def test_avx2_gemm_uses_ymm_fmas_only():
    """Compiled for AVX2 the GEMM's k loop is 12 FMAs on ymm registers, with no AVX-512 instruction."""
    from minislm.kernels.matmul import _linear_kernel

    fresh = njit(fastmath=True, parallel=True)(_linear_kernel.py_func)  # uncached, so its assembly is inspectable
    fresh(np.ones((12, 8), np.float32), np.ones((1, 8, NR), np.float32), NR, np.zeros(0, np.float32), False,
          np.empty((12, NR), np.float32))
    asm = next(iter(fresh.inspect_asm().values()))
    per_block = [len(re.findall(r"vfmadd\d+ps\s[^\n]*ymm", block)) for block in asm.split(".LBB")]
    assert max(per_block) >= 12, f"at most {max(per_block)} ymm FMAs in a block of the GEMM kernel"
    assert "zmm" not in asm


@avx2_only
@pytest.mark.parametrize("B,T,N,D,lengths", [(1, 1, 2, 8, [1]), (2, 17, 3, 24, [17, 5]), (1, 32, 12, 32, [32]),
                                             (2, 50, 2, 64, [50, 9])])
def test_avx2_attention_matches_reference(B, T, N, D, lengths):
    rng = np.random.default_rng(B + T + D)
    qkv, mask, pos_bias = rand(rng, B, T, 3 * N * D), padding_mask(lengths, T, -1e4), rand(rng, N, T, T)
    want = attention_reference(qkv.astype(np.float64), mask.astype(np.float64), N, pos_bias.astype(np.float64))
    assert_close(attention(qkv, mask, N, pos_bias), want, KERNEL_ATOL, KERNEL_RTOL, "avx2 attention")


# ---------------------------------------------------------------- one text at a time: the serial kernels

SMALL_SHAPES = [(1, 1, 1), (1, 384, 1152), (1, 7, 40), (5, 33, 17), (32, 384, 384), (32, 1536, 384), (33, 64, 70)]


@pytest.mark.parametrize("M,K,N", SMALL_SHAPES)
@pytest.mark.parametrize("bias,act", [(False, False), (True, True)])
def test_serial_linear_kernel_matches_parallel_and_reference(M, K, N, bias, act):
    """The same tiles in the same order on one thread: bit-identical to the parallel kernel before GELU
    (GELU's vectorised and scalar code paths round differently, well within the kernel tolerance)."""
    from minislm.kernels.matmul import _NO_BIAS, _linear_kernel, _linear_kernel_serial

    rng = np.random.default_rng(M + K + N)
    x, w = rand(rng, M, K), rand(rng, N, K, scale=K ** -0.5)
    b = rand(rng, N) if bias else None
    panels = pack_weight(w).panels
    serial, parallel = (np.full((M, N), np.nan, np.float32) for _ in range(2))
    _linear_kernel_serial(x, panels, N, _NO_BIAS if b is None else b, act, serial)
    _linear_kernel(x, panels, N, _NO_BIAS if b is None else b, act, parallel)
    if act:
        assert_close(serial, parallel, KERNEL_ATOL, KERNEL_RTOL, "serial vs parallel linear with GELU")
    else:
        np.testing.assert_array_equal(serial, parallel)
    check_linear(x, w, b, act, serial, f"serial linear {M}x{K}x{N}")


def test_linear_runs_small_products_on_one_thread(monkeypatch):
    from minislm.kernels import matmul

    def parallel_kernel_called(*args):
        raise AssertionError("a small product went to the parallel kernel")

    monkeypatch.setattr(matmul, "_linear_kernel", parallel_kernel_called)
    rng = np.random.default_rng(3)
    x, w, b = rand(rng, 4, 60), rand(rng, 50, 60), rand(rng, 50)
    assert matmul.matmul_flops(4, 60, 50) < matmul.SERIAL_MAX_FLOP
    check_linear(x, w, b, True, linear(x, w, b, gelu=True), "small linear")
    with pytest.raises(AssertionError, match="parallel kernel"):
        linear(rand(rng, 64, 384), w=rand(rng, 384, 384))


@pytest.mark.parametrize("B,T,N,D,lengths", [(1, 32, 12, 32, [32]), (1, 9, 2, 64, [7]), (2, 5, 3, 16, [5, 2])])
def test_serial_attention_kernel_matches_parallel_and_reference(B, T, N, D, lengths):
    from minislm.kernels.attention import AttentionScratch, _attention_kernel, _attention_kernel_serial

    rng = np.random.default_rng(T + D)
    qkv, mask, pos_bias = rand(rng, B, T, 3 * N * D), padding_mask(lengths, T, -1e4), rand(rng, N, T, T)
    serial, parallel = (np.full((B, T, N * D), np.nan, np.float32) for _ in range(2))
    _attention_kernel_serial(qkv, mask, N, pos_bias, serial, *AttentionScratch(T, D).arrays)
    _attention_kernel(qkv, mask, N, pos_bias, parallel, *AttentionScratch(T, D).arrays)
    np.testing.assert_array_equal(serial, parallel)
    want = attention_reference(qkv.astype(np.float64), mask.astype(np.float64), N, pos_bias.astype(np.float64))
    assert_close(serial, want, KERNEL_ATOL, KERNEL_RTOL, "serial attention vs reference")
