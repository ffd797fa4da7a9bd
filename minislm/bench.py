"""`python -m minislm.bench`: minislm's encoder and kernels against the references a user would pick instead.

In one run: (a) the Numba matmul vs numpy's BLAS on the encoder's shapes; (b) the attention kernel vs torch's
scaled_dot_product_attention; (c) each expert's encoder throughput at batch 32 x 128 and latency at batch
1 x 32 for minislm, transformers (eager) and ONNX Runtime (the transformers model exported at bench time);
(d) peak resident memory of each engine at batch 32 x 128, each measured in a fresh process; (e) the CPU,
its vector extensions, thread counts and library versions; with --workload, (f) docs/s extracting pooled
features of the AG News test split with real lengths, minislm vs transformers; (g) all-MiniLM-L6-v2 on int8
weights at both shapes: minislm int8 vs minislm float32 and vs ONNX Runtime's `quantize_dynamic` model of the
same export, with each int8 engine's cosine to float32 (`--int8-only` runs just this part). Medians of several timed
runs after a warm-up; every ratio uses references measured in the same run. torch, transformers,
onnxruntime and onnxscript come from the `bench` extra; the output says which references are missing.

Some machines set OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, which slow numpy's BLAS down; the bench removes
them for its own process (and says so) so that numpy runs the BLAS a user gets by default.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
REPO = Path(__file__).resolve().parent.parent
SHAPES = {"b32_t128": (32, 128), "b1_t32": (1, 32)}


def cpu_info():
    """CPU model and the vector extensions that matter for float32 GEMM."""
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        model = platform.processor() or "unknown"
    ext = [f for f in ("sse4_2", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags]
    return {"model": model, "vector_extensions": ext, "logical_cpus": os.cpu_count()}


def median_seconds(fn, runs, warmup=2):
    import numpy as np

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def interleaved(engines, runs):
    """Time each engine once per round, rounds repeated `runs` times, letting the cores settle before every
    timing: every engine sees the same spells of a noisy machine. -> median seconds per engine."""
    import numpy as np

    for fn in engines.values():  # warm-up: compile, allocate, fill caches
        fn()
        fn()
    times = {name: [] for name in engines}
    for _ in range(runs):
        for name, fn in engines.items():
            settle(0.5)
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: float(np.median(ts)) for name, ts in times.items()}


def references():
    """Which reference engines are importable -> {name: module or None}."""
    found = {}
    for name in ("torch", "transformers", "onnxruntime", "onnxscript"):
        try:
            found[name] = __import__(name)
        except ImportError:
            found[name] = None
    return found


def settle(seconds=1.5):
    """Let other thread pools (OpenBLAS, torch, ONNX Runtime) stop spinning before the next timing: their
    idle threads busy-wait for a while after a call and would steal the cores from whatever runs next."""
    time.sleep(seconds)


def gemm_rows(runs, rounds=3):
    """Numba `linear` vs numpy BLAS (x @ w.T + b) on every matmul shape of the three experts.

    Shape by shape, in `rounds` passes: Numba timed, BLAS timed, then a pause so BLAS's spinning threads
    never overlap a Numba timing. Alternating in rounds spreads the shared machine's slow and fast spells
    over both engines; each figure is the median over all rounds' runs."""
    import numpy as np

    from minislm.kernels import linear, pack_weight

    rng = np.random.default_rng(0)
    shapes = [(32 * 128, K, N) for K, N in ((384, 1152), (384, 384), (384, 1536), (1536, 384),
                                            (768, 2304), (768, 768), (768, 3072), (3072, 768))]
    rows = []
    for M, K, N in shapes:
        x, w = rng.standard_normal((M, K), dtype=np.float32), rng.standard_normal((N, K), dtype=np.float32)
        b, out = rng.standard_normal(N, dtype=np.float32), np.empty((M, N), dtype=np.float32)
        packed = pack_weight(w)  # packed once, as the encoder does when it loads
        t_numba, t_blas = [], []
        for _ in range(rounds):
            t_numba.append(median_seconds(lambda: linear(x, packed, b, out=out, backend="numba"), runs))
            t_blas.append(median_seconds(lambda: np.add(np.matmul(x, w.T, out=out), b, out=out), runs))
            settle()
        tn, tb = float(np.median(t_numba)), float(np.median(t_blas))
        gf = 2 * M * K * N / 1e9
        rows.append({"M": M, "K": K, "N": N, "numba_gflops": gf / tn, "blas_gflops": gf / tb, "ratio": tb / tn})
    return rows


def attention_rows(runs, torch):
    import numpy as np

    from minislm.kernels import attention

    rng = np.random.default_rng(0)
    rows = []
    for B, T, N, D in ((32, 128, 12, 32), (32, 128, 12, 64)):
        H = N * D
        qkv = rng.standard_normal((B, T, 3 * H), dtype=np.float32)
        mask = np.zeros((B, T), dtype=np.float32)
        mask[::2, T // 2:] = np.finfo(np.float32).min  # half the rows half padding
        out = np.empty((B, T, H), dtype=np.float32)
        row = {"B": B, "T": T, "heads": N, "head_dim": D}
        if torch is not None:  # torch first: its OpenMP pool must be up before Numba's parallel regions run
            q, k, v = (torch.from_numpy(qkv[:, :, i * H:(i + 1) * H]).reshape(B, T, N, D).transpose(1, 2)
                       .contiguous() for i in range(3))  # [B, N, T, D], the layout sdpa is made for
            m = torch.from_numpy(mask == 0)[:, None, None, :]  # boolean: True = attend
            with torch.no_grad():
                row["torch_sdpa_ms"] = 1000 * median_seconds(
                    lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m), runs)
            settle()
        row["minislm_ms"] = 1000 * median_seconds(lambda: attention(qkv, mask, N, out=out), runs)
        if torch is not None:
            row["ratio"] = row["torch_sdpa_ms"] / row["minislm_ms"]
        rows.append(row)
    return rows


class TorchEncoder:
    """The transformers model as the reference: last hidden state of (ids, mask)."""

    def __init__(self, folder, torch):
        from transformers import AutoModel

        self.torch = torch
        self.model = AutoModel.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()

    def wrapper(self):
        torch, model = self.torch, self.model

        class LastHidden(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = model

            def forward(self, ids, mask):
                return self.m(input_ids=ids, attention_mask=mask).last_hidden_state
        return LastHidden()

    def __call__(self, ids, mask):
        with self.torch.no_grad():
            return self.model(input_ids=self.torch.from_numpy(ids),
                              attention_mask=self.torch.from_numpy(mask.astype("int64"))).last_hidden_state


def onnx_model(enc, folder_sha, name, B, T):
    """Export the transformers model for a fixed [B, T] (torch.onnx, dynamo exporter), cached -> its path."""
    import numpy as np

    path = REPO / "cache" / "onnx" / f"{name}-{folder_sha[:12]}-b{B}-t{T}.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        ids = enc.torch.from_numpy(np.full((B, T), 1000, dtype=np.int64))
        prog = enc.torch.onnx.export(enc.wrapper(), (ids, enc.torch.ones_like(ids)),
                                     input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                                     dynamo=True, verbose=False)
        tmp = path.with_suffix(".tmp.onnx")
        prog.save(str(tmp))
        os.replace(tmp, path)
    return path


def onnx_int8_model(fp32_path, per_channel=False):
    """ONNX Runtime's dynamic quantization of an exported model, cached beside it -> its path. Defaults: int8
    weights per tensor (the Gather of the embeddings quantized too), uint8 activations quantized on every call.
    per_channel: weights per output channel in 7 bits (reduce_range), minislm's own weight scheme."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = fp32_path.with_name(fp32_path.stem + ("-int8-per-channel.onnx" if per_channel else "-int8-dynamic.onnx"))
    if not path.is_file():
        tmp = path.with_suffix(".tmp.onnx")
        quantize_dynamic(str(fp32_path), str(tmp), weight_type=QuantType.QInt8, per_channel=per_channel,
                         reduce_range=per_channel)
        os.replace(tmp, path)
    return path


def ort_session(path, threads, ort):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def onnx_session(enc, folder_sha, name, B, T, threads, ort):
    """The exported model for a fixed [B, T] (onnx_model), opened."""
    return ort_session(onnx_model(enc, folder_sha, name, B, T), threads, ort)


def encoder_rows(names, runs, refs, threads, log):
    import numpy as np

    from minislm.experts import load_expert
    from minislm.kernels import matmul

    torch, ort = refs["torch"], refs["onnxruntime"]
    can_torch = torch is not None and refs["transformers"] is not None
    can_ort = can_torch and ort is not None and refs["onnxscript"] is not None
    rng = np.random.default_rng(0)
    rows = []
    for name in names:
        expert = load_expert(name)
        row = {"expert": name}
        ref = TorchEncoder(expert.folder, torch) if can_torch else None
        for label, (B, T) in SHAPES.items():
            ids = rng.integers(1000, 20000, size=(B, T))
            mask = np.ones((B, T), dtype=bool)
            engines = {"minislm": lambda: expert.encoder.forward(ids, mask)}
            ours = expert.encoder.forward(ids, mask)[-1]
            if ref is not None:
                engines["torch"] = lambda: ref(ids, mask)
                row[f"max_abs_diff_vs_torch_{label}"] = float(np.abs(ref(ids, mask).numpy() - ours).max())
            if can_ort:
                log(f"  {name}: ONNX Runtime session for B{B} x T{T}")
                sess = onnx_session(ref, expert.weights_sha256, name, B, T, threads, ort)
                feed = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}
                engines["onnxruntime"] = lambda: sess.run(None, feed)
                row[f"max_abs_diff_vs_onnxruntime_{label}"] = float(np.abs(sess.run(None, feed)[0] - ours).max())
            blas_encoder = expert.encoder.with_backend("auto")  # large products on numpy's BLAS, for comparison
            engines["minislm_blas_dispatch"] = lambda: blas_encoder.forward(ids, mask)
            for eng, secs in interleaved(engines, runs).items():
                row[f"{eng}_{label}_s"] = secs
        row["matmul_backend"] = matmul.resolve_backend(32 * 128, expert.encoder.matmul_backend)
        row["minislm_seq_per_s"] = 32 / row["minislm_b32_t128_s"]
        row["minislm_blas_dispatch_seq_per_s"] = 32 / row["minislm_blas_dispatch_b32_t128_s"]
        for eng in ("torch", "onnxruntime"):
            if f"{eng}_b32_t128_s" in row:
                row[f"{eng}_seq_per_s"] = 32 / row[f"{eng}_b32_t128_s"]
                row[f"vs_{eng}"] = row["minislm_seq_per_s"] / row[f"{eng}_seq_per_s"]
                row[f"latency_vs_{eng}"] = row[f"{eng}_b1_t32_s"] / row["minislm_b1_t32_s"]
                row[f"blas_dispatch_vs_{eng}"] = row["minislm_blas_dispatch_seq_per_s"] / row[f"{eng}_seq_per_s"]
        log(f"  {name}: minislm {row['minislm_seq_per_s']:.1f} seq/s"
            + "".join(f", {e} {row[e + '_seq_per_s']:.1f}" for e in ("torch", "onnxruntime") if e + "_seq_per_s" in row))
        rows.append(row)
    return rows


INT8_EXPERT = "all-MiniLM-L6-v2"


def ctranslate2_int8(folder, folder_sha, name, threads):
    """CTranslate2's int8 encoder of a Hugging Face folder (converted once, cached) -> ctranslate2.Encoder, or
    None when ctranslate2 (an optional reference, not in any extra) is not installed."""
    try:
        import ctranslate2
        from ctranslate2.converters import TransformersConverter
    except ImportError:
        return None
    path = REPO / "cache" / "ct2" / f"{name}-{folder_sha[:12]}-int8"
    if not path.is_dir():
        tmp = path.with_name(path.name + ".tmp")
        TransformersConverter(str(folder)).convert(str(tmp), quantization="int8", force=True)
        os.replace(tmp, path)
    return ctranslate2.Encoder(str(path), device="cpu", compute_type="int8", intra_threads=threads, inter_threads=1)


def int8_rows(name, runs, refs, threads, log):
    """One expert on int8 weights at each shape: minislm int8 (encoder/quantize.py) against minislm float32 and,
    with the references installed, ONNX Runtime's float32 model of the export and two `quantize_dynamic` models
    of it (its defaults, and per channel in 7 bits), CTranslate2's int8 encoder when ctranslate2 is installed,
    timed interleaved; and each int8 engine's cosine to float32,
    per token (mean, min) on the timed random ids (minislm's for every hidden state, ORT's for the last)."""
    import numpy as np

    from minislm.encoder.quantize import hidden_cosines, layer_fidelity, linear_bytes, quantize_encoder
    from minislm.experts import load_expert
    from minislm.kernels import int8

    torch, ort = refs["torch"], refs["onnxruntime"]
    can_ort = all(refs[k] is not None for k in ("torch", "transformers", "onnxruntime", "onnxscript"))
    expert = load_expert(name)
    enc8 = quantize_encoder(expert.encoder)
    ref = TorchEncoder(expert.folder, torch) if can_ort else None
    out = {"expert": name, "int8_path": int8.PATH, "linear_bytes_ratio": linear_bytes(expert.encoder) / linear_bytes(enc8)}
    rng = np.random.default_rng(0)
    for label, (B, T) in SHAPES.items():
        ids = rng.integers(1000, 20000, size=(B, T))
        mask = np.ones((B, T), dtype=bool)
        row = {"layers": layer_fidelity(expert.encoder, enc8, ids, mask)}
        engines = {"minislm_fp32": lambda: expert.encoder.forward(ids, mask), "minislm_int8": lambda: enc8.forward(ids, mask)}
        if can_ort:
            log(f"  {name}: ONNX Runtime float32 and dynamic int8 sessions for B{B} x T{T}")
            fp32_path = onnx_model(ref, expert.weights_sha256, name, B, T)
            feed = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}
            ours32 = expert.encoder.forward(ids, mask)[-1:]
            engines["onnxruntime_fp32"] = ort_session(fp32_path, threads, ort)
            engines["onnxruntime_int8"] = ort_session(onnx_int8_model(fp32_path), threads, ort)
            engines["onnxruntime_int8_per_channel"] = ort_session(onnx_int8_model(fp32_path, True), threads, ort)
            for eng in ("onnxruntime_int8", "onnxruntime_int8_per_channel"):
                cos_mean, cos_min = hidden_cosines(ours32, engines[eng].run(None, feed)[0][None], mask)
                row[f"{eng}_last_layer_cosine"] = {"mean": float(cos_mean[0]), "min": float(cos_min[0])}
            for eng in ("onnxruntime_fp32", "onnxruntime_int8", "onnxruntime_int8_per_channel"):
                engines[eng] = lambda sess=engines[eng]: sess.run(None, feed)
            ct2 = ctranslate2_int8(expert.folder, expert.weights_sha256, name, threads)
            if ct2 is not None:
                tokens = ids.tolist()
                cos_mean, cos_min = hidden_cosines(
                    ours32, np.asarray(ct2.forward_batch(tokens).last_hidden_state)[None], mask)
                row["ctranslate2_int8_last_layer_cosine"] = {"mean": float(cos_mean[0]), "min": float(cos_min[0])}
                engines["ctranslate2_int8"] = lambda: ct2.forward_batch(tokens)
        for eng, secs in interleaved(engines, runs).items():
            row[f"{eng}_s"] = secs
        row["int8_vs_fp32"] = row["minislm_fp32_s"] / row["minislm_int8_s"]
        if can_ort:
            row["int8_vs_onnxruntime_int8"] = row["onnxruntime_int8_s"] / row["minislm_int8_s"]
            row["int8_vs_onnxruntime_int8_per_channel"] = row["onnxruntime_int8_per_channel_s"] / row["minislm_int8_s"]
            row["onnxruntime_int8_vs_fp32"] = row["onnxruntime_fp32_s"] / row["onnxruntime_int8_s"]
        if "ctranslate2_int8_s" in row:
            row["int8_vs_ctranslate2_int8"] = row["ctranslate2_int8_s"] / row["minislm_int8_s"]
        last = row["layers"][-1]
        log(f"  {name} int8 B{B}xT{T}: {row['int8_vs_fp32']:.2f}x minislm float32"
            + (f", {row['int8_vs_onnxruntime_int8']:.2f}x ONNX Runtime int8" if can_ort else "")
            + f"; last layer cosine mean {last['cosine_mean']:.4f} min {last['cosine_min']:.4f}")
        out[label] = row
    return out


def int8_markdown(r):
    def ms(x):
        return fmt(x and 1000 * x, ".1f")

    def cos(c):
        return f"{fmt(c.get('mean'), '.4f')} / {fmt(c.get('min'), '.4f')}"

    lines = [f"int8 ({r['expert']}, {r['int8_path']} kernels; linear weights {r['linear_bytes_ratio']:.2f}x smaller). "
             f"ORT int8: quantize_dynamic's defaults (per-tensor weights, embeddings too); ORT int8 pc: per channel, "
             f"7 bits (minislm's weight scheme); CT2: CTranslate2's int8 encoder, when installed. Cosine: each token's "
             f"last hidden state to minislm float32's, "
             f"mean / min.", "",
             "| shape | minislm fp32 ms | minislm int8 ms | ORT fp32 ms | ORT int8 ms | ORT int8 pc ms | CT2 int8 ms "
             "| int8 vs fp32 | vs ORT int8 | vs ORT int8 pc | vs CT2 int8 | cosine minislm int8 | ORT int8 | ORT int8 pc "
             "| CT2 int8 |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label in SHAPES:
        g = r[label].get
        last = r[label]["layers"][-1]
        lines.append(f"| {label} | {ms(g('minislm_fp32_s'))} | {ms(g('minislm_int8_s'))} | {ms(g('onnxruntime_fp32_s'))} "
                     f"| {ms(g('onnxruntime_int8_s'))} | {ms(g('onnxruntime_int8_per_channel_s'))} "
                     f"| {ms(g('ctranslate2_int8_s'))} | {g('int8_vs_fp32'):.2f}x "
                     f"| {fmt(g('int8_vs_onnxruntime_int8'), '.2f')}x "
                     f"| {fmt(g('int8_vs_onnxruntime_int8_per_channel'), '.2f')}x "
                     f"| {fmt(g('int8_vs_ctranslate2_int8'), '.2f')}x "
                     f"| {last['cosine_mean']:.4f} / {last['cosine_min']:.4f} "
                     f"| {cos(g('onnxruntime_int8_last_layer_cosine') or {})} "
                     f"| {cos(g('onnxruntime_int8_per_channel_last_layer_cosine') or {})} "
                     f"| {cos(g('ctranslate2_int8_last_layer_cosine') or {})} |")
    per_layer = " ".join(f"{x['cosine_mean']:.4f}" for x in r["b32_t128"]["layers"])
    return "\n".join(lines + ["", f"minislm int8 per-layer mean cosine to fp32 (embeddings, then each layer; B32xT128 "
                                  f"random ids): {per_layer}"]) + "\n"


MEMORY_SNIPPET = r"""
import sys, numpy as np
engine, name = sys.argv[1], sys.argv[2]
def status(key):  # kB -> MB, from /proc/self/status (VmRSS: now, VmHWM: peak since the last reset)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key)) / 1e3
ids = np.random.default_rng(0).integers(1000, 20000, size=(32, 128)); mask = np.ones((32, 128), dtype=bool)
if engine == "minislm":
    from minislm.experts import load_expert
    expert = load_expert(name)
    expert.encoder.forward(ids[:2, :8], mask[:2, :8])  # compile / load the kernels first
    run = lambda: expert.encoder.forward(ids, mask)
else:
    import torch
    from transformers import AutoModel
    from minislm.experts.registry import expert_dir
    torch.set_num_threads(int(sys.argv[3]))
    model = AutoModel.from_pretrained(expert_dir(name), attn_implementation="eager", dtype=torch.float32).eval()
    def run():
        with torch.no_grad():
            return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask.astype(np.int64)))
    with torch.no_grad():
        model(input_ids=torch.from_numpy(ids[:2, :8]), attention_mask=torch.from_numpy(mask[:2, :8].astype(np.int64)))
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS counter: what follows is the forward pass alone
out = run()
print(f"{before:.1f} {status('VmHWM'):.1f}")
"""


def memory_rows(names, refs, threads):
    """Peak RSS (MB) during one B32 x T128 forward, in a fresh process per engine (weights loaded and the
    engine warmed up first), and its rise over the RSS just before the forward."""
    rows = []
    engines = ["minislm"] + (["transformers"] if refs["torch"] is not None and refs["transformers"] is not None else [])
    for name in names:
        row = {"expert": name}
        for eng in engines:
            out = subprocess.run([sys.executable, "-c", MEMORY_SNIPPET, eng, name, str(threads)],
                                 capture_output=True, text=True, env=dict(os.environ))
            if out.returncode != 0:
                row[f"{eng}_error"] = out.stderr.strip().splitlines()[-1:]
                continue
            before, peak = map(float, out.stdout.split()[-2:])
            row[f"{eng}_peak_rss_mb"], row[f"{eng}_forward_rise_mb"] = peak, peak - before
        rows.append(row)
    return rows


def workload_rows(names, n_rows, refs, log):
    """docs/s of pooled features (every layer, mean + CLS) over AG News test texts, real lengths, max_len 128."""
    import numpy as np

    from minislm import data
    from minislm.experts import features
    from minislm.experts import load_expert

    texts = data.load("ag_news", "test").texts[:n_rows]
    rows = []
    for name in names:
        expert = load_expert(name)
        settle()
        features.pooled_features(expert, texts[:64])
        t = time.perf_counter()
        features.pooled_features(expert, texts)
        row = {"expert": name, "rows": len(texts), "minislm_docs_per_s": len(texts) / (time.perf_counter() - t)}
        if refs["torch"] is not None and refs["transformers"] is not None:
            torch = refs["torch"]
            ref = TorchEncoder(expert.folder, torch)

            def run_torch(sub_texts):  # the same work as pooled_features: tokenize, sort by length, encode, pool
                sub = expert.tokenizer.encode(sub_texts, 128)
                order = np.argsort([-len(r) for r in sub], kind="stable")
                for s in range(0, len(order), 32):
                    ids, mask = expert.tokenizer.pad([sub[i] for i in order[s:s + 32]])
                    with torch.no_grad():
                        hs = ref.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(
                            mask.astype(np.int64)), output_hidden_states=True).hidden_states
                        m = torch.from_numpy(mask)[None, :, :, None].float()
                        h = torch.stack(hs)
                        torch.cat([(h * m).sum(2) / m.sum(2), h[:, :, 0]], dim=-1)
            run_torch(texts[:64])
            t = time.perf_counter()
            run_torch(texts)
            row["torch_docs_per_s"] = len(texts) / (time.perf_counter() - t)
            row["vs_torch"] = row["minislm_docs_per_s"] / row["torch_docs_per_s"]
        log(f"  workload {name}: {row}")
        rows.append(row)
    return rows


def in_fresh_process(args, module="minislm.bench"):
    """Run one bench section in a new Python process (same environment) -> its JSON result."""
    extra = ["--keep-blas-env"] if module == "minislm.bench" else []
    run = subprocess.run([sys.executable, "-m", module, *args, *extra], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"bench section {' '.join(args)} failed: {run.stderr.strip().splitlines()[-1:]}")
    sys.stderr.write("".join(line + "\n" for line in run.stderr.splitlines() if line.startswith("  ")))
    return json.loads(run.stdout.strip().splitlines()[-1])


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(r):
    cpu = r["cpu"]
    kern = r.get("kernels", {})
    lines = [f"CPU: {cpu['model']} ({', '.join(cpu['vector_extensions'])}); threads: {r['threads']}; "
             f"minislm kernels: {kern.get('vector_bits', '?')}-bit vectors, {kern.get('tile', '?')} register tiles; "
             f"{'BLAS variables removed: ' + ', '.join(r['blas_env_removed']) if r['blas_env_removed'] else ''}",
             f"Command: `{r['command']}`", "",
             "| expert | minislm seq/s B32xT128 | (with BLAS dispatch) | transformers eager | ONNX Runtime | vs eager "
             "| vs ORT | minislm ms B1xT32 | eager ms | ORT ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for e in r["encoders"]:
        g = e.get
        lines.append(f"| {e['expert']} | {e['minislm_seq_per_s']:.1f} | {e['minislm_blas_dispatch_seq_per_s']:.1f} "
                     f"| {fmt(g('torch_seq_per_s'), '.1f')} "
                     f"| {fmt(g('onnxruntime_seq_per_s'), '.1f')} | {fmt(g('vs_torch'), '.2f')}x "
                     f"| {fmt(g('vs_onnxruntime'), '.2f')}x | {1000 * e['minislm_b1_t32_s']:.1f} "
                     f"| {fmt(g('torch_b1_t32_s') and 1000 * g('torch_b1_t32_s'), '.1f')} "
                     f"| {fmt(g('onnxruntime_b1_t32_s') and 1000 * g('onnxruntime_b1_t32_s'), '.1f')} |")
    lines += ["", "| M x K -> N | Numba GFLOP/s | numpy BLAS GFLOP/s | ratio |", "|---|---|---|---|"]
    for g in r["gemm"]:
        lines.append(f"| {g['M']} x {g['K']} -> {g['N']} | {g['numba_gflops']:.0f} | {g['blas_gflops']:.0f} "
                     f"| {g['ratio']:.2f} |")
    lines += ["", "| attention B x T, heads x dim | minislm ms | torch sdpa ms | ratio |", "|---|---|---|---|"]
    for a in r["attention"]:
        lines.append(f"| {a['B']} x {a['T']}, {a['heads']} x {a['head_dim']} | {a['minislm_ms']:.1f} "
                     f"| {fmt(a.get('torch_sdpa_ms'), '.1f')} | {fmt(a.get('ratio'), '.2f')} |")
    lines += ["", "| expert | minislm peak RSS MB (forward rise) | transformers peak RSS MB (forward rise) |",
              "|---|---|---|"]
    for m in r["memory"]:
        lines.append(f"| {m['expert']} | {fmt(m.get('minislm_peak_rss_mb'), '.0f')} "
                     f"({fmt(m.get('minislm_forward_rise_mb'), '.0f')}) | {fmt(m.get('transformers_peak_rss_mb'), '.0f')} "
                     f"({fmt(m.get('transformers_forward_rise_mb'), '.0f')}) |")
    if r.get("workload"):
        lines += ["", "| expert | AG News test rows | minislm docs/s | transformers docs/s | ratio |", "|---|---|---|---|---|"]
        for w in r["workload"]:
            lines.append(f"| {w['expert']} | {w['rows']} | {w['minislm_docs_per_s']:.1f} "
                         f"| {fmt(w.get('torch_docs_per_s'), '.1f')} | {fmt(w.get('vs_torch'), '.2f')} |")
    lines += ["", f"l6_vs_torch = {fmt(r['l6_vs_torch'], '.2f')}, l6_vs_onnxruntime = {fmt(r['l6_vs_onnxruntime'], '.2f')} "
              f"(with BLAS dispatch: {fmt(r.get('l6_blas_dispatch_vs_onnxruntime'), '.2f')}), "
              f"gemm_vs_blas = {r['gemm_vs_blas']:.2f} (the encoder's matmul backend: {r.get('matmul_backend')}; "
              f"BLAS dispatch hands products of >= 256 rows to numpy's BLAS)"]
    if r.get("int8"):
        lines += ["", int8_markdown(r["int8"]).rstrip("\n"), "",
                  f"int8_l6_vs_fp32 = {fmt(r.get('int8_l6_vs_fp32'), '.2f')}, int8_l6_vs_onnxruntime_int8 = "
                  f"{fmt(r.get('int8_l6_vs_onnxruntime_int8'), '.2f')} (B32xT128 throughput; B1xT32 latency: "
                  f"{fmt(r.get('int8_l6_latency_vs_fp32'), '.2f')}, {fmt(r.get('int8_l6_latency_vs_onnxruntime_int8'), '.2f')})"]
    if r.get("train_step"):
        t = r["train_step"]
        full, lora = t.get("l6_full_step_seconds", {}), t.get("l6_lora_step_seconds", {})
        lines += ["", f"Training step of all-MiniLM-L6-v2 at {t.get('shape')} (forward + backward + AdamW): full "
                      f"{fmt(full.get('minislm'), '.2f')} s vs torch {fmt(full.get('torch'), '.2f')} s, "
                      f"l6_train_step_vs_torch = {fmt(r.get('l6_train_step_vs_torch'), '.2f')}; LoRA r8 "
                      f"{fmt(lora.get('minislm'), '.2f')} s vs {fmt(lora.get('torch'), '.2f')} s, "
                      f"l6_lora_step_vs_torch = {fmt(r.get('l6_lora_step_vs_torch'), '.2f')}"]
    return "\n".join(lines) + "\n"


def set_int8_keys(result):
    """The headline int8 ratios: throughput at B32 x T128 (int8_l6_vs_*), latency at B1 x T32 (*_latency_*)."""
    big, small = result["int8"]["b32_t128"], result["int8"]["b1_t32"]
    result["int8_l6_vs_fp32"] = big["int8_vs_fp32"]
    result["int8_l6_vs_onnxruntime_int8"] = big.get("int8_vs_onnxruntime_int8")
    result["int8_l6_latency_vs_fp32"] = small["int8_vs_fp32"]
    result["int8_l6_latency_vs_onnxruntime_int8"] = small.get("int8_vs_onnxruntime_int8")


def _fetch_first(names, registry):
    """Fetch the experts the bench runs that are not prepared yet, as classify does on first use -> None, or
    exit code 2 after one line naming the problem and the command (a child process would fail with a
    traceback instead)."""
    from minislm.experts import fetch

    try:
        for name in names:
            if name not in registry.EXPERTS:
                raise ValueError(f"unknown expert {name!r}; the bench runs {', '.join(registry.EXPERTS)}")
        todo = [n for n in dict.fromkeys([*names, INT8_EXPERT])
                if registry.state(registry.weights_dir() / n) != "prepared"]
        if todo:
            print(f"fetching {', '.join(todo)} (first use) ...", file=sys.stderr)
            fetch.fetch(todo, progress=lambda s: print(s, file=sys.stderr))
    except (ValueError, OSError, fetch.FetchError) as e:
        print(f"error: {e}; prepare the experts with `{registry.FETCH_COMMAND}`, then run the bench again",
              file=sys.stderr)
        return 2
    return None


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(v in os.environ for v in BLAS_VARS) and "--keep-blas-env" not in argv:
        env = {k: v for k, v in os.environ.items() if k not in BLAS_VARS}
        env["MINISLM_BENCH_REMOVED"] = ",".join(f"{k}={os.environ[k]}" for k in BLAS_VARS if k in os.environ)
        os.execve(sys.executable, [sys.executable, "-m", "minislm.bench", *argv], env)  # numpy not imported yet
    from minislm.experts import registry

    ap = argparse.ArgumentParser(prog="python -m minislm.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--experts", nargs="+", default=list(registry.EXPERTS))
    ap.add_argument("--runs", type=int, default=7, help="timed runs per measurement (the median is kept)")
    ap.add_argument("--out", help="write JSON here and a Markdown table beside it (.md)")
    ap.add_argument("--workload", action="store_true", help="also time feature extraction on AG News test texts")
    ap.add_argument("--workload-rows", type=int, default=7600, help="AG News test rows for --workload")
    ap.add_argument("--keep-blas-env", action="store_true", help="keep OPENBLAS_* variables of the environment")
    ap.add_argument("--no-train-step", action="store_true", help="skip the training step (python -m minislm.bench_train)")
    ap.add_argument("--int8-only", action="store_true", help=f"only the int8 part ({INT8_EXPERT}), e.g. with --runs 3")
    ap.add_argument("--encoder-row", help=argparse.SUPPRESS)  # internal: one expert's timings, as JSON
    ap.add_argument("--section", choices=["gemm", "attention", "int8"], help=argparse.SUPPRESS)  # internal, as JSON
    args = ap.parse_args(argv)
    if not (args.encoder_row or args.section):  # the parent run: every expert prepared before any child starts
        missing = _fetch_first(args.experts, registry)
        if missing:
            return missing

    # The references are imported before Numba starts its OpenMP threads: torch started second would run its
    # own OpenMP pool beside Numba's, and both spin (measured: sdpa 3.3 s instead of 11 ms).
    refs = references()
    import numba
    import numpy as np

    from minislm.atomic import write_json, write_text

    threads = numba.get_num_threads()
    missing = [k for k, v in refs.items() if v is None]
    if missing:
        print(f"references missing: {', '.join(missing)} (pip install -e '.[bench]'); their columns are '-'",
              file=sys.stderr)
    if refs["torch"] is not None:
        refs["torch"].set_num_threads(threads)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if args.encoder_row:
        print(json.dumps(encoder_rows([args.encoder_row], args.runs, refs, threads, log)[0]))
        return 0
    if args.section:
        if args.section == "int8":
            rows = int8_rows(INT8_EXPERT, args.runs, refs, threads, log)
        else:
            rows = gemm_rows(args.runs) if args.section == "gemm" else attention_rows(args.runs, refs["torch"])
        print(json.dumps(rows))
        return 0
    removed = [v for v in os.environ.get("MINISLM_BENCH_REMOVED", "").split(",") if v]
    from minislm.kernels.tiles import TILE
    from minislm.numba_setup import vector_width_bits

    result = {"command": "python -m minislm.bench " + " ".join(argv), "cpu": cpu_info(), "threads": threads,
              "kernels": {"vector_bits": vector_width_bits(), "tile": TILE},
              "blas_env_removed": removed, "references_missing": missing,
              "versions": {"python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__,
                           **{k: getattr(v, "__version__", "?") for k, v in refs.items() if v is not None}}}
    # Each section runs in a fresh process: one library's idle thread pool (OpenBLAS, torch's OpenMP,
    # ONNX Runtime) left spinning in a process makes the next library's timings meaningless on two cores.
    if args.int8_only:
        log(f"int8 ({INT8_EXPERT}, a fresh process)")
        result["int8"] = in_fresh_process(["--section", "int8", "--runs", str(args.runs)])
        set_int8_keys(result)
        table = f"CPU: {result['cpu']['model']}; threads: {threads}\n\n" + int8_markdown(result["int8"])
        print(table)
        if args.out:
            write_json(args.out, result)
            write_text(os.path.splitext(args.out)[0] + ".md", table)
        return 0
    log("GEMM")
    result["gemm"] = in_fresh_process(["--section", "gemm", "--runs", str(args.runs)])
    log("attention")
    result["attention"] = in_fresh_process(["--section", "attention", "--runs", str(args.runs)])
    log("encoders (a fresh process per expert, so no engine's threads outlive its own measurements)")
    result["encoders"] = []
    for name in args.experts:
        result["encoders"].append(in_fresh_process(["--encoder-row", name, "--runs", str(args.runs)]))
    if INT8_EXPERT in args.experts:
        log(f"int8 ({INT8_EXPERT}, a fresh process)")
        result["int8"] = in_fresh_process(["--section", "int8", "--runs", str(args.runs)])
        set_int8_keys(result)
    log("memory (fresh processes)")
    result["memory"] = memory_rows(args.experts, refs, threads)
    if args.workload:
        log("workload")
        result["workload"] = workload_rows(args.experts, args.workload_rows, refs, log)
    if not args.no_train_step and refs["torch"] is not None and refs["transformers"] is not None:
        log("training step of all-MiniLM-L6-v2, full and LoRA (python -m minislm.bench_train, a fresh process)")
        with tempfile.TemporaryDirectory() as tmp:  # bench_train.json is bench_train's own full run, kept apart
            result["train_step"] = in_fresh_process(
                ["--runs", str(max(3, args.runs // 2)), "--threads", str(threads), "--experts", "all-MiniLM-L6-v2",
                 "--no-epoch", "--out", os.path.join(tmp, "bench_train.json")], module="minislm.bench_train")
        result["l6_train_step_vs_torch"] = result["train_step"].get("l6_train_step_vs_torch")
        result["l6_lora_step_vs_torch"] = result["train_step"].get("l6_lora_step_vs_torch")
    l6 = next((r for r in result["encoders"] if r["expert"] == "all-MiniLM-L6-v2"), {})
    result["l6_vs_torch"] = l6.get("vs_torch")
    result["l6_vs_onnxruntime"] = l6.get("vs_onnxruntime")
    result["l6_blas_dispatch_vs_onnxruntime"] = l6.get("blas_dispatch_vs_onnxruntime")
    result["matmul_backend"] = l6.get("matmul_backend")
    result["gemm_vs_blas"] = float(np.median([g["ratio"] for g in result["gemm"]]))
    table = markdown(result)
    print(table)
    if args.out:
        write_json(args.out, result)
        write_text(os.path.splitext(args.out)[0] + ".md", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
