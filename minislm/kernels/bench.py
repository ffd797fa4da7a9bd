"""Kernel benchmark: GFLOP/s of `linear` against NumPy's BLAS (`x @ w.T`) on the encoder's shapes.

    python -m minislm.kernels.bench [--quick]

M = 4096 is a batch of 32 x 128 tokens, M = 32 one sequence of 32; K, N are MiniLM's (H 384, fused QKV 1152,
FFN 1536) and MPNet's (768, 2304, 3072). Each timing is the best of several runs, numpy and Numba
interleaved so both see the same machine load; after each numpy block the script sleeps 0.3 s, because
OpenBLAS's threads keep spinning for a while after a call and would steal the cores from Numba's. Not a test: numbers depend on the machine and its load.
"""
import argparse
import os
import platform
import time

import numba
import numpy as np

from minislm.kernels.activations import gelu
from minislm.kernels.attention import attention
from minislm.kernels.matmul import linear, pack_weight
from minislm.kernels.norm import layer_norm

SHAPES = [(m, k, n) for m in (4096, 32) for k, n in
          ((384, 1152), (384, 384), (384, 1536), (1536, 384), (768, 2304), (768, 768), (768, 3072), (3072, 768))]


def best_time(fn, reps):
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    reps = 3 if args.quick else 7
    try:
        from threadpoolctl import threadpool_info
        blas = ", ".join(f"{i['internal_api']} {i.get('architecture', '')} x{i['num_threads']}"
                         for i in threadpool_info() if i["user_api"] == "blas")
    except ImportError:
        blas = "unknown (pip install threadpoolctl)"
    print(f"CPU {cpu_name()}; numba {numba.__version__} x{numba.get_num_threads()} threads; numpy "
          f"{np.__version__} BLAS {blas}; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
    rng = np.random.default_rng(0)
    print(f"{'M':>5} {'K':>5} {'N':>5} | {'numpy':>7} {'linear':>7} {'ratio':>5} | {'+bias+gelu':>10}  (GFLOP/s)")
    for M, K, N in SHAPES:
        x = rng.standard_normal((M, K), dtype=np.float32)
        w = rng.standard_normal((N, K), dtype=np.float32)
        b = rng.standard_normal(N, dtype=np.float32)
        out = np.empty((M, N), np.float32)
        flop = 2.0 * M * K * N
        w = pack_weight(w)  # packed once, as the encoder does when it loads
        w_blas = w.torch_layout()
        linear(x, w, b, gelu=True, out=out)
        r = max(reps, 3 if M > 1000 else 50)
        t_np, t_nb, t_fused = float("inf"), float("inf"), float("inf")
        for _ in range(3):
            t_np = min(t_np, best_time(lambda: np.matmul(x, w_blas.T, out=out), r))
            time.sleep(0.3)
            t_nb = min(t_nb, best_time(lambda: linear(x, w, out=out), r))
            t_fused = min(t_fused, best_time(lambda: linear(x, w, b, gelu=True, out=out), r))
        print(f"{M:5d} {K:5d} {N:5d} | {flop / t_np / 1e9:7.0f} {flop / t_nb / 1e9:7.0f} {t_np / t_nb:5.2f} | "
              f"{flop / t_fused / 1e9:10.0f}")
    B, T, H, N = 32, 128, 384, 12
    qkv = rng.standard_normal((B, T, 3 * H), dtype=np.float32)
    mask = np.zeros((B, T), np.float32)
    y = np.empty((B, T, H), np.float32)
    h = rng.standard_normal((B * T, H), dtype=np.float32)
    g = np.ones(H, np.float32)
    ffn = rng.standard_normal((B * T, 4 * H), dtype=np.float32)
    ffn_out = np.empty_like(ffn)
    attention(qkv, mask, N, out=y)
    layer_norm(h, g, g, 1e-12, h, out=y.reshape(B * T, H))
    gelu(ffn, out=ffn_out)
    time.sleep(0.3)
    t_att = best_time(lambda: attention(qkv, mask, N, out=y), reps)
    t_ln = best_time(lambda: layer_norm(h, g, g, 1e-12, h, out=y.reshape(B * T, H)), reps)
    t_gelu = best_time(lambda: gelu(ffn, out=ffn_out), reps)
    att_flop = 2 * 2.0 * B * T * T * H
    print(f"attention B{B} T{T} H{H} N{N}: {t_att * 1e3:.2f} ms ({att_flop / t_att / 1e9:.0f} GFLOP/s); "
          f"layer_norm+residual [{B * T}, {H}]: {t_ln * 1e3:.2f} ms; gelu [{B * T}, {4 * H}]: {t_gelu * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
