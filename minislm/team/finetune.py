"""Fine-tune one expert with a classification head: LoRA, its top k layers, or every tensor (adapt.py).

    texts -> tokens (max_len, optional head + tail) -> length-sorted batches
          -> adaptation.forward -> features (the last layer's mean, or a layer mix over every pooled layer)
          -> head (linear or one hidden layer) -> cross-entropy; the backward runs the same way down

AdamW (collab/optim.py, torch's update rule) with a linear warm-up then linear or cosine decay, optional
layer-wise learning-rate decay (ULMFiT / Sun et al. 2019: layer l trains at lr * llrd^(L-1-l), the embeddings
at lr * llrd^L), global-norm clipping, early stopping on the validation split. Every random draw comes from
(seed, epoch) or (seed, step), so a run resumed from its last checkpoint (safetensors + JSON, written
atomically) ends with the same weights as one never interrupted. Batches are cut once from the texts sorted by
length (least padding) and visited in a new order each epoch. The encoder has no dropout of its own here; the
LoRA branches and the head have theirs.
"""
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from minislm import atomic
from minislm.collab import heads, layermix, losses
from minislm.collab.optim import AdamW, EarlyStopping, clip_by_global_norm, leaves, warmup_cosine
from minislm.encoder.backward import layer_of
from minislm.encoder.pooling import pool_layers, pool_layers_backward, pool_mean, pool_mean_backward
from minislm.experts import adapt

SCHEDULES = ("linear", "cosine")
POOLINGS = ("mean", "mix")


@dataclass
class FinetuneConfig:
    method: str = "lora"          # "lora", "topk" or "full" (adapt.py)
    rank: int = 8                 # LoRA rank r
    alpha: float = 16.0           # LoRA scale numerator: the branch is multiplied by alpha / r
    dropout: float = 0.1          # LoRA: dropout on each branch's input
    lora_ffn: bool = False        # LoRA: also on the feed-forward's two linears
    top_k: int = 2                # topk: layers that train, counted from the top
    lr: float = 1e-3              # peak learning rate of the encoder's trainable tensors
    head_lr: float = 1e-3         # peak learning rate of the head (and layer mix)
    weight_decay: float = 0.01    # AdamW's decoupled decay, on matrices only
    epochs: int = 3
    batch_size: int = 32
    max_len: int = 128            # tokens per text, special tokens included (up to 512)
    head_tail: int | None = None  # None: keep a long text's start; h: its first h and last max_len - 2 - h tokens
    llrd: float = 1.0             # layer-wise lr decay factor (1 = none)
    warmup: float = 0.1           # fraction of the steps spent warming up
    schedule: str = "linear"      # decay after warm-up: "linear" (to 0) or "cosine"
    clip: float = 1.0             # global gradient-norm clipping (0 = off)
    patience: int = 2             # epochs without a better validation accuracy before stopping
    pooling: str = "mean"         # "mean" of the last layer, or "mix": a learned mix of every pooled layer
    head_hidden: int = 0          # 0: a linear head; > 0: one GELU hidden layer of this width
    head_dropout: float = 0.0
    label_smoothing: float = 0.0
    seed: int = 0
    checkpoint_every: int = 50    # steps between checkpoints (when a work_dir is given); epochs end with one too
    cache_dtype: str = "float16"  # topk: dtype of the frozen layers' output on disk

    def __post_init__(self):
        if self.method not in adapt.METHODS:
            raise ValueError(f"method {self.method!r} is unknown; use one of {', '.join(adapt.METHODS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r} is unknown; use one of {', '.join(POOLINGS)}")
        for name in ("rank", "epochs", "batch_size", "top_k", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if not 2 <= self.max_len <= 512:
            raise ValueError(f"max_len={self.max_len} must lie in 2..512")
        if not 0 <= self.dropout < 1 or not 0 <= self.head_dropout < 1:
            raise ValueError("dropout rates must lie in [0, 1)")
        if not 0 < self.llrd <= 1:
            raise ValueError(f"llrd={self.llrd} must lie in (0, 1]")
        if self.lr <= 0 or self.head_lr <= 0:
            raise ValueError("learning rates must be positive")


@dataclass
class FinetuneResult:
    adaptation: object            # the trained adaptation (adapt.py), best validation epoch's weights
    head: dict                    # head (and layer mix) parameters
    losses: list = field(default_factory=list)   # training loss of every step
    val_accuracy: list = field(default_factory=list)  # per epoch
    best_val_accuracy: float = float("nan")
    steps: int = 0
    train_seconds: float = 0.0
    trainable_params: int = 0
    finished: bool = True         # False when stopped by max_steps (a checkpoint holds the rest)


def length_sorted_batches(lengths, batch_size):
    """[n] token counts -> list of index arrays: the texts by decreasing length, cut into batches (fixed for
    the whole run, so each batch's padded length never changes)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def learning_rate(step, total, peak, warmup_steps, schedule):
    if schedule == "cosine":
        return warmup_cosine(step, total, peak, warmup_steps)
    if warmup_steps and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak * max(0.0, (total - step) / max(1, total - warmup_steps))


def texts_hash(texts, labels=None):
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    if labels is not None:
        h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def lr_groups(cfg_enc, names, llrd):
    """Encoder parameter names -> {lr factor: [names]}: llrd^(L-1-layer), the embeddings' layer being -1."""
    groups = {}
    for n in names:
        factor = llrd ** (cfg_enc.n_layers - 1 - layer_of(n))
        groups.setdefault(factor, []).append(n)
    return groups


class Model:
    """The adaptation and the head as one trainable function of a batch."""

    def __init__(self, adaptation, n_layers, hidden, n_classes, cfg, rng):
        self.adaptation, self.L, self.cfg = adaptation, n_layers, cfg
        width = hidden if cfg.pooling == "mean" else 2 * hidden
        self.head = {"head": heads.init(rng, width, n_classes, cfg.head_hidden)}
        if cfg.pooling == "mix":
            self.head["mix"] = layermix.init(rng, n_layers + 1)

    def forward(self, ids, mask, idx=None, keep=None, rng=None):
        """-> logits [B, C], cache."""
        states, enc_state = self.adaptation.forward(ids, mask, idx, keep)
        if self.cfg.pooling == "mean":
            z, mix_cache = pool_mean(states[self.L], mask), None
        else:
            below = states.get("pooled_below")
            start = 0 if below is None else below.shape[1] - 1
            X = pool_layers(np.stack([states[i] for i in range(start, self.L + 1)]), mask)  # [B, L+1-start, 2H]
            if below is not None:
                X = np.concatenate([below[:, :start], X], axis=1)
            z, mix_cache = layermix.forward(self.head["mix"], X)
        logits, head_cache = heads.forward(self.head["head"], z, self.cfg.head_dropout, rng)
        return logits, (enc_state, mask, mix_cache, head_cache)

    def backward(self, cache, dlogits):
        enc_state, mask, mix_cache, head_cache = cache
        dz, head_grads = heads.backward(self.head["head"], head_cache, dlogits)
        grads = {"head": {"head": head_grads}}
        if self.cfg.pooling == "mean":
            d_hidden = {self.L: pool_mean_backward(dz.astype(np.float32), mask)}
        else:
            _, grads["head"]["mix"] = layermix.backward(self.head["mix"], mix_cache, dz)
            # layermix returns no input gradient: dX_l = scale w_l dz
            dX = self.head["mix"]["scale"] * mix_cache["w"][None, :, None] * dz[:, None, :]
            first = max(min(layer_of(n) for n in self.adaptation.params), -1) + 1 if self.adaptation.params else 0
            d_hidden = pool_layers_backward(dX.astype(np.float32), mask, range(first, self.L + 1))
        grads["encoder"] = self.adaptation.backward(enc_state, d_hidden)
        return grads


def _run_dir(work_dir, expert, cfg, data_hash):
    key = hashlib.sha256(json.dumps([expert.weights_sha256, asdict(cfg), data_hash]).encode()).hexdigest()[:16]
    return Path(work_dir) / f"finetune-{expert.config.family}-{key}"


def _save(run_dir, step, params, opts, stopper, history):
    arrays = {f"p/{n}": np.ascontiguousarray(a) for n, a in leaves(params)}
    for g, opt in opts.items():
        for n in opt.m:
            arrays[f"m/{g}/{n}"], arrays[f"v/{g}/{n}"] = opt.m[n], opt.v[n]
    if stopper.best_params is not None:
        arrays.update({f"best/{n}": np.ascontiguousarray(a) for n, a in leaves(stopper.best_params)})
    atomic.save_safetensors(run_dir / "state.safetensors", arrays)
    atomic.write_json(run_dir / "state.json", {
        "step": step, "adam_t": {g: o.t for g, o in opts.items()}, "history": history,
        "best": stopper.best, "best_epoch": stopper.best_epoch, "bad": stopper.bad})


def _load(run_dir, params, opts, stopper):
    from safetensors.numpy import load_file

    meta = json.loads((run_dir / "state.json").read_text())
    arrays = load_file(str(run_dir / "state.safetensors"))
    for n, a in leaves(params):
        a[...] = arrays[f"p/{n}"]
    for g, opt in opts.items():
        opt.t = meta["adam_t"][g]
        for n in opt.m:
            opt.m[n][...], opt.v[n][...] = arrays[f"m/{g}/{n}"], arrays[f"v/{g}/{n}"]
    if any(k.startswith("best/") for k in arrays):
        stopper.best_params = _tree_like(params, {n: arrays[f"best/{n}"] for n, _ in leaves(params)})
    stopper.best, stopper.best_epoch, stopper.bad = meta["best"], meta["best_epoch"], meta["bad"]
    return meta["step"], meta["history"]


def _tree_like(tree, flat, prefix=""):
    return {k: _tree_like(v, flat, f"{prefix}{k}.") if isinstance(v, dict) else flat[f"{prefix}{k}"].copy()
            for k, v in tree.items()}


def _copy_into(dst, src):
    for (n, a), (_, b) in zip(leaves(dst), leaves(src)):
        a[...] = b


def accuracy(model, rows, labels, pad, batch_size):
    """Validation accuracy (no dropout, nothing kept)."""
    if not len(rows):
        return float("nan")
    model.adaptation.train_mode(None)
    right = 0
    for b in length_sorted_batches([len(r) for r in rows], batch_size):
        ids, mask = pad([rows[i] for i in b])
        logits, _ = model.forward(ids, mask, keep=())
        right += int((logits.argmax(axis=1) == np.asarray(labels)[b]).sum())
    return right / len(rows)


def finetune(expert, texts_fit, y_fit, texts_val, y_val, cfg=None, work_dir=None, log=print, progress=True,
             max_steps=None, adaptation=None):
    """Train `expert` (adapted by cfg.method) and a head on (texts_fit, y_fit), early-stopped on the validation
    texts -> FinetuneResult with the best epoch's weights. With a work_dir, checkpoints go there and a run with
    the same expert, config and data resumes from its last one. max_steps: stop (checkpointed) after this many
    steps in this call. adaptation: a ready adapt.make(...) to train instead of a new one."""
    cfg = cfg or FinetuneConfig()
    enc_cfg = expert.config
    y_fit, y_val = np.asarray(y_fit, dtype=np.int64), np.asarray(y_val, dtype=np.int64)
    n_classes = int(max(y_fit.max(), y_val.max(initial=0))) + 1
    tok = expert.tokenizer
    rows_fit = tok.encode(list(texts_fit), cfg.max_len, cfg.head_tail)
    rows_val = tok.encode(list(texts_val), cfg.max_len, cfg.head_tail)
    batches = length_sorted_batches([len(r) for r in rows_fit], cfg.batch_size)
    data_hash = texts_hash(texts_fit, y_fit) + texts_hash(texts_val, y_val)
    run_dir = _run_dir(work_dir, expert, cfg, data_hash) if work_dir is not None else None

    adaptation = adaptation or adapt.make(expert, cfg.method, cfg.rank, cfg.alpha, cfg.dropout, cfg.lora_ffn,
                                          cfg.top_k, cfg.seed)
    if cfg.method == "topk" and work_dir is not None:
        adaptation.cache(rows_fit, batches, tok.pad, work_dir, texts_hash(texts_fit), cfg.max_len,
                         np.dtype(cfg.cache_dtype), log, pooled=cfg.pooling == "mix")
    model = Model(adaptation, enc_cfg.n_layers, enc_cfg.hidden, n_classes, cfg, np.random.default_rng(cfg.seed))
    params = {"encoder": adaptation.params, "head": model.head}
    groups = {f"enc{f:.6g}": (names, f) for f, names in lr_groups(enc_cfg, adaptation.params, cfg.llrd).items()}
    opts = {g: AdamW({n: adaptation.params[n] for n in names}, weight_decay=cfg.weight_decay)
            for g, (names, _) in groups.items()}
    opts["head"] = AdamW(model.head, weight_decay=cfg.weight_decay)
    stopper = EarlyStopping(cfg.patience)
    total = cfg.epochs * len(batches)
    warmup_steps = int(round(cfg.warmup * total))
    step, history = 0, {"loss": [], "val_accuracy": []}
    if run_dir is not None and (run_dir / "state.json").exists():
        step, history = _load(run_dir, params, opts, stopper)
        adaptation.after_step()
        log(f"resuming {expert.name} ({cfg.method}) at step {step} of {total} from {run_dir}")
    n_trainable = sum(a.size for _, a in leaves(params))
    from tqdm import tqdm

    bar = tqdm(total=total, initial=step, desc=f"{cfg.method} {expert.name}", unit="step", disable=not progress,
               smoothing=0.1)
    t0, done_here, tokens_here = time.perf_counter(), 0, 0
    finished = True
    stop_epoch = None
    for epoch in range(step // len(batches), cfg.epochs):
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(batches))
        for j in range(step - epoch * len(batches), len(batches)):
            if max_steps is not None and done_here >= max_steps:
                finished = False
                break
            b = batches[order[j]]
            ids, mask = tok.pad([rows_fit[i] for i in b])
            rng = np.random.default_rng([cfg.seed, 1, step])
            adaptation.train_mode(rng)
            logits, cache = model.forward(ids, mask, idx=b, rng=rng if cfg.head_dropout else None)
            loss, dlogits = losses.cross_entropy(logits.astype(np.float64), y_fit[b], cfg.label_smoothing)
            grads = model.backward(cache, dlogits.astype(np.float32))
            clip_by_global_norm(grads, cfg.clip)
            lr = learning_rate(step, total, 1.0, warmup_steps, cfg.schedule)
            for g, (names, factor) in groups.items():
                opts[g].step({n: grads["encoder"][n] for n in names}, lr * cfg.lr * factor)
            opts["head"].step(grads["head"], lr * cfg.head_lr)
            adaptation.after_step()
            history["loss"].append(float(loss))
            step += 1
            done_here += 1
            tokens_here += int(mask.sum())
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", steps_s=f"{done_here / dt:.2f}", tok_s=f"{tokens_here / dt:.0f}")
            if run_dir is not None and step % cfg.checkpoint_every == 0:
                _save(run_dir, step, params, opts, stopper, history)
        if not finished:
            break
        if len(history["val_accuracy"]) <= epoch:
            acc = accuracy(model, rows_val, y_val, tok.pad, cfg.batch_size)
            history["val_accuracy"].append(acc)
            stop = stopper.update(acc, params, epoch) if len(rows_val) else False
            log(f"{expert.name} {cfg.method} epoch {epoch + 1}/{cfg.epochs}: loss "
                f"{np.mean(history['loss'][-len(batches):]):.4f}, val accuracy {acc:.4f}, "
                f"{done_here / max(time.perf_counter() - t0, 1e-9):.2f} steps/s")
            if run_dir is not None:
                _save(run_dir, step, params, opts, stopper, history)
            if stop:
                stop_epoch = epoch
                break
    bar.close()
    if run_dir is not None and not finished:
        _save(run_dir, step, params, opts, stopper, history)
    if finished and stopper.best_params is not None:
        _copy_into(params, stopper.best_params)
        adaptation.after_step()
    if stop_epoch is not None:
        log(f"early stop after epoch {stop_epoch + 1}: best epoch {stopper.best_epoch + 1}")
    return FinetuneResult(adaptation=adaptation, head=model.head, losses=history["loss"],
                          val_accuracy=history["val_accuracy"], best_val_accuracy=float(stopper.best)
                          if math.isfinite(stopper.best) else float("nan"), steps=step,
                          train_seconds=time.perf_counter() - t0, trainable_params=int(n_trainable),
                          finished=finished)
