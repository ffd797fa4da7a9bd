"""One training step of an expert, minislm against transformers + torch eager doing the same step.

A step: forward at batch 32 x 128 (every token real), mean pooling of the last layer, a linear head,
cross-entropy, the backward, one AdamW update (lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 on
matrices), no clipping, no dropout; torch in eval mode so neither side drops out. Two kinds of step:
    full   every tensor trains
    lora   rank-8 LoRA branches on query, key, value and the attention output (alpha 16), base frozen; torch's
           branches are the same x A^T B^T added to the frozen nn.Linear's output (what peft does)
Both sides run with the same threads. The ratio is torch seconds / minislm seconds: higher is better.

    python -m minislm.bench_train [--runs 3] [--threads 2]
"""
import argparse
import json
import os
import sys
import time

import numpy as np

from minislm.bench import cpu_info, median_seconds
from minislm.collab import losses
from minislm.collab.optim import AdamW
from minislm.experts import adapt, load_expert
from minislm.team.finetune import FinetuneConfig, Model

SHORT = {"all-MiniLM-L6-v2": "l6", "paraphrase-MiniLM-L3-v2": "l3", "all-mpnet-base-v2": "mpnet"}
B, T, RANK, ALPHA, LR, WD = 32, 128, 8, 16.0, 1e-4, 0.01


def batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, cfg.vocab_size, size=(B, T))
    return ids, np.ones((B, T), dtype=bool), rng.integers(0, 2, size=B)


def minislm_step(expert, method):
    """-> a function running one training step of `method` ("full" or "lora") on a fixed batch."""
    adaptation = adapt.make(expert, method, rank=RANK, alpha=ALPHA, dropout=0.0)
    cfg = FinetuneConfig(method=method, rank=RANK, alpha=ALPHA, dropout=0.0)
    model = Model(adaptation, expert.config.n_layers, expert.config.hidden, 2, cfg, np.random.default_rng(0))
    params = {"encoder": adaptation.params, "head": model.head}
    opt = AdamW(params, lr=LR, weight_decay=WD)
    ids, mask, y = batch(expert.config)

    def step():
        adaptation.train_mode(None)
        logits, cache = model.forward(ids, mask)
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
            for lin in (att.self.query, att.self.key, att.self.value, att.output.dense):
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


def train_step_rows(names=("all-MiniLM-L6-v2",), runs=3, threads=2, log=print):
    """-> {"<short>_train_step_vs_torch": torch s / minislm s (full fine-tuning), "<short>_lora_step_vs_torch":
    the same for LoRA, "<short>_<method>_step_seconds": {"minislm", "torch"}, "cpu", "threads"} per expert."""
    import torch

    torch.set_num_threads(threads)
    out = {"cpu": cpu_info(), "threads": threads, "shape": f"B{B} x T{T}",
           "numba_threads": int(os.environ.get("NUMBA_NUM_THREADS", os.cpu_count()))}
    for name in names:
        expert = load_expert(name)
        short = SHORT.get(name, name)
        for method in ("full", "lora"):
            ours = median_seconds(minislm_step(expert, method), runs, warmup=1)
            theirs = median_seconds(torch_step(expert, method, torch), runs, warmup=1)
            key = f"{short}_train_step_vs_torch" if method == "full" else f"{short}_lora_step_vs_torch"
            out[key] = theirs / ours
            out[f"{short}_{method}_step_seconds"] = {"minislm": ours, "torch": theirs}
            log(f"{name} {method} step at B{B} x T{T}: minislm {ours:.2f} s, torch {theirs:.2f} s, "
                f"ratio {theirs / ours:.2f}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--experts", nargs="+", default=["all-MiniLM-L6-v2"])
    a = p.parse_args(argv)
    t = time.perf_counter()
    log = lambda m: print("  " + m, file=sys.stderr, flush=True)  # noqa: E731
    print(json.dumps(train_step_rows(a.experts, a.runs, a.threads, log=log)))  # one line: bench.py reads it
    print(f"({time.perf_counter() - t:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
