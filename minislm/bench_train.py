"""One training step of an expert, minislm against transformers + torch eager doing the same step.

A step: forward at batch 32 x 128 (every token real), mean pooling of the last layer, a linear head,
cross-entropy, the backward, one AdamW update (lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 on
matrices), no clipping, no dropout; torch in eval mode so neither side drops out. Three kinds of step:
    full   every tensor trains
    lora   rank-8 LoRA branches on query, key, value and the attention output (alpha 16), base frozen; torch's
           branches are the same x A^T B^T added to the frozen nn.Linear's output (what peft does)
    top2   the top two layers train, the frozen layers' output read from the cache (adapt.TopLayers.cache):
           ours only, against our full step
Both sides run with the same threads, in turn (interleaved_medians). The ratio against torch is torch seconds /
minislm seconds: higher is better. Then top-2 MPNet over AG News's training rows: seconds per epoch (from a
sample of its batches) and what the cache of its frozen prefix costs.

    python -m minislm.bench_train [--runs 3] [--threads 2] [--experts ...] [--no-epoch]
writes notebooks/results/bench_train.json (--out) with the host's CPU.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from minislm import atomic
from minislm.bench import cpu_info
from minislm.collab import losses
from minislm.collab.optim import AdamW
from minislm.experts import adapt, load_expert
from minislm.team.finetune import FinetuneConfig, Model

RESULTS = Path(__file__).resolve().parent.parent / "notebooks" / "results"
SHORT = {"all-MiniLM-L6-v2": "l6", "paraphrase-MiniLM-L3-v2": "l3", "all-mpnet-base-v2": "mpnet"}
B, T, RANK, ALPHA, LR, WD = 32, 128, 8, 16.0, 1e-4, 0.01


def batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, cfg.vocab_size, size=(B, T))
    return ids, np.ones((B, T), dtype=bool), rng.integers(0, 2, size=B)


def minislm_step(expert, method, top_k=2, work_dir=None):
    """-> a function running one training step of `method` on a fixed batch: "full", "lora", or "topk" (the top
    top_k layers train, reading the frozen layers' output from the disk cache in work_dir, made here first)."""
    adaptation = adapt.make(expert, method, rank=RANK, alpha=ALPHA, dropout=0.0, top_k=top_k)
    cfg = FinetuneConfig(method=method, rank=RANK, alpha=ALPHA, dropout=0.0, top_k=top_k)
    model = Model(adaptation, expert.config.n_layers, expert.config.hidden, 2, cfg, np.random.default_rng(0))
    params = {"encoder": adaptation.params, "head": model.head}
    opt = AdamW(params, lr=LR, weight_decay=WD)
    ids, mask, y = batch(expert.config)
    idx = None
    if method == "topk":
        idx = np.arange(B)
        adaptation.cache([list(r) for r in ids], [idx], lambda rows: (np.array(rows), np.ones((len(rows), T), bool)),
                         work_dir, f"bench-{B}x{T}", T, log=lambda m: None, pooled=False)

    def step():
        adaptation.train_mode(None)
        logits, cache = model.forward(ids, mask, idx=idx)
        _, dlogits = losses.cross_entropy(logits.astype(np.float64), y)
        grads = model.backward(cache, dlogits.astype(np.float32))
        opt.step(grads)
        adaptation.after_step()
    return step


def torch_step(expert, method, torch):
    """The same step through transformers + torch eager."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(expert.folder, attn_implementation="eager", dtype=torch.float32).eval()
    H = expert.config.hidden
    head = torch.nn.Linear(H, 2)
    if method == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in model.encoder.layer:
            att = layer.attention
            linears = ((att.attn.q, att.attn.k, att.attn.v, att.attn.o) if expert.config.family == "mpnet" else
                       (att.self.query, att.self.key, att.self.value, att.output.dense))
            for lin in linears:
                _add_lora(lin, torch)
    trainable = [p for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": WD},
                             {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}], lr=LR)
    ids, mask, y = batch(expert.config)
    ids_t, mask_t, y_t = torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64)), torch.from_numpy(y)

    def step():
        h = model(input_ids=ids_t, attention_mask=mask_t)[0]
        m = mask_t[:, :, None].float()
        loss = torch.nn.functional.cross_entropy(head((h * m).sum(1) / m.sum(1)), y_t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def _add_lora(lin, torch):
    K, N = lin.in_features, lin.out_features
    lin.lora_A = torch.nn.Parameter(torch.empty(RANK, K).uniform_(-K ** -0.5, K ** -0.5))
    lin.lora_B = torch.nn.Parameter(torch.zeros(N, RANK))
    base, scale = lin.forward, ALPHA / RANK
    lin.forward = lambda x: base(x) + scale * (x @ lin.lora_A.T) @ lin.lora_B.T


def interleaved_medians(fns, runs):
    """{name: fn} -> {name: median seconds}: one warm-up each, then the functions in turn, `runs` rounds, so that
    every engine meets the same load of a shared machine."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: float(np.median(v)) for name, v in times.items()}


def train_step_rows(names=("all-MiniLM-L6-v2",), runs=3, threads=2, log=print, top_k=2):
    """-> per expert (<short> = l3, l6, mpnet):
        <short>_train_step_vs_torch         torch s / minislm s, full fine-tuning (higher is better)
        <short>_lora_step_vs_torch          the same for LoRA (torch with the same branches and frozen base)
        <short>_lora_vs_full_step           our LoRA step / our full step (lower is better)
        <short>_top2_cached_vs_full_step    our top-2 step reading the cached frozen prefix / our full step
        <short>_step_seconds                {"full", "lora", "top2_cached", "torch_full", "torch_lora"}
    and "cpu", "threads", "shape"."""
    import tempfile

    import torch

    torch.set_num_threads(threads)
    out = {"cpu": cpu_info(), "threads": threads, "shape": f"B{B} x T{T}",
           "numba_threads": int(os.environ.get("NUMBA_NUM_THREADS", os.cpu_count()))}
    for name in names:
        expert = load_expert(name)
        short = SHORT.get(name, name)
        with tempfile.TemporaryDirectory() as work_dir:
            fns = {"full": minislm_step(expert, "full"), "torch_full": torch_step(expert, "full", torch),
                   "lora": minislm_step(expert, "lora"), "torch_lora": torch_step(expert, "lora", torch),
                   f"top{top_k}_cached": minislm_step(expert, "topk", top_k, work_dir)}
            sec = interleaved_medians(fns, runs)
            del fns
        out[f"{short}_train_step_vs_torch"] = sec["torch_full"] / sec["full"]
        out[f"{short}_lora_step_vs_torch"] = sec["torch_lora"] / sec["lora"]
        out[f"{short}_lora_vs_full_step"] = sec["lora"] / sec["full"]
        out[f"{short}_top{top_k}_cached_vs_full_step"] = sec[f"top{top_k}_cached"] / sec["full"]
        out[f"{short}_step_seconds"] = sec
        log(f"{name} at B{B} x T{T}: " + ", ".join(f"{k} {v:.2f} s" for k, v in sec.items()))
    return out


def topk_epoch_row(name="all-mpnet-base-v2", k=2, dataset="ag_news", max_len=128, every=10, data_dir=None,
                   log=print):
    """Seconds per epoch of top-k adaptation over a dataset's training rows, the frozen prefix read from its cache:
    every `every`-th of the epoch's length-sorted batches of 32 is cached and stepped (so the sample spans the
    lengths), and the times are scaled to the whole epoch. Also what the cache costs on disk for all the rows."""
    import tempfile

    from minislm import data
    from minislm.team.finetune import length_sorted_batches

    expert = load_expert(name)
    texts = data.load(dataset, "train", data_dir).texts
    rows = expert.tokenizer.encode(list(texts), max_len)
    batches = length_sorted_batches([len(r) for r in rows], 32)
    sample = batches[::every]
    sample_rows = [rows[i] for b in sample for i in b]
    local = np.split(np.arange(len(sample_rows)), np.cumsum([len(b) for b in sample])[:-1])
    adaptation = adapt.make(expert, "topk", top_k=k)
    cfg = FinetuneConfig(method="topk", top_k=k)
    model = Model(adaptation, expert.config.n_layers, expert.config.hidden, 4, cfg, np.random.default_rng(0))
    opt = AdamW({"encoder": adaptation.params, "head": model.head}, lr=LR, weight_decay=WD)
    with tempfile.TemporaryDirectory() as work_dir:
        t = time.perf_counter()
        adaptation.cache(sample_rows, local, expert.tokenizer.pad, work_dir, "epoch-sample", max_len,
                         log=lambda m: None, pooled=False)
        cache_seconds = (time.perf_counter() - t) * len(batches) / len(sample)
        y = np.random.default_rng(0).integers(0, 4, size=len(sample_rows))
        step_seconds = []
        for j, b in enumerate(local):
            ids, mask = expert.tokenizer.pad([sample_rows[i] for i in b])
            t = time.perf_counter()
            logits, cache = model.forward(ids, mask, idx=b)
            _, dlogits = losses.cross_entropy(logits.astype(np.float64), y[b])
            opt.step(model.backward(cache, dlogits.astype(np.float32)))
            adaptation.after_step()
            if j:  # the first step compiles and warms up
                step_seconds.append(time.perf_counter() - t)
    epoch = float(np.mean(step_seconds)) * len(batches)
    n_tokens = sum(len(r) for r in rows)
    row = {"expert": name, "top_k": k, "dataset": dataset, "split": "train", "texts": len(rows), "max_len": max_len,
           "batches": len(batches), "sampled_batches": len(sample), "epoch_seconds": epoch,
           "cache_seconds": cache_seconds, "tokens": n_tokens,
           "cache_bytes": int(adapt.cache_bytes(expert.config, k, n_tokens, len(rows))),
           "cache_bytes_with_pooled": int(adapt.cache_bytes(expert.config, k, n_tokens, len(rows), pooled=True))}
    log(f"top-{k} {name} on {dataset}'s {len(rows)} training texts: {epoch / 60:.1f} min per epoch (from "
        f"{len(sample)} of {len(batches)} batches), cache {row['cache_bytes'] / 1e9:.2f} GB (float16), made in "
        f"{cache_seconds / 60:.1f} min")
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--experts", nargs="+", default=["all-MiniLM-L6-v2", "all-mpnet-base-v2"])
    p.add_argument("--no-epoch", action="store_true", help="skip the top-2 MPNet epoch on AG News")
    p.add_argument("--data-dir", default=None, help="where the datasets are (default: as minislm.data finds them)")
    p.add_argument("--out", default=str(RESULTS / "bench_train.json"), help="the results file (JSON)")
    a = p.parse_args(argv)
    t = time.perf_counter()
    log = lambda m: print("  " + m, file=sys.stderr, flush=True)  # noqa: E731
    out = train_step_rows(a.experts, a.runs, a.threads, log=log)
    if not a.no_epoch:
        out["mpnet_top2_ag_news_epoch"] = topk_epoch_row(data_dir=a.data_dir, log=log)
    out["seconds"] = round(time.perf_counter() - t, 1)
    out["command"] = "python -m minislm.bench_train " + " ".join(argv if argv is not None else sys.argv[1:])
    atomic.write_json(a.out, out)
    print(json.dumps(out))  # one line: bench.py reads it
    print(f"({out['seconds']:.0f} s; written to {a.out})", file=sys.stderr)


if __name__ == "__main__":
    main()
