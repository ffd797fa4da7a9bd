"""Training one collaboration model: mini-batch AdamW with warm-up + cosine, clipping, early stopping.

The loss is cross-entropy with label smoothing, plus the gate's balance loss when configured, plus (stage 3)
distillation towards a teacher's softened probabilities:
    loss = (1 - a) CE(logits, y) + a T^2 KL(teacher_T || student_T) + balance
Early stopping keeps the parameters of the epoch with the best validation accuracy.
"""
from dataclasses import asdict, dataclass

import numpy as np

from minislm.collab import losses, model, optim


@dataclass
class TrainConfig:
    epochs: int = 40               # upper bound; early stopping usually ends sooner
    batch_size: int = 64
    lr: float = 1e-3               # peak learning rate
    weight_decay: float = 0.01     # AdamW's decoupled decay on matrices
    warmup: float = 0.05           # share of all steps spent warming up
    clip: float = 1.0              # global gradient-norm bound
    patience: int = 6              # epochs without a better validation accuracy before stopping
    label_smoothing: float = 0.1
    distill_alpha: float = 0.5     # weight of the distillation term when a teacher is given
    distill_temperature: float = 2.0
    seed: int = 0                  # data order, initialisation and dropout

    def __post_init__(self):
        _check_int(self, "epochs", 1)
        _check_int(self, "batch_size", 1)
        _check_int(self, "patience", 1)
        for name, lo, hi in (("lr", 0.0, 10.0), ("weight_decay", 0.0, 10.0), ("warmup", 0.0, 1.0),
                             ("clip", 0.0, 1e6), ("label_smoothing", 0.0, 1.0), ("distill_alpha", 0.0, 1.0),
                             ("distill_temperature", 0.0, 100.0)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not (lo <= v <= hi) or v != v:
                raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {v!r}")
        if self.lr == 0 or self.distill_temperature == 0:
            raise ValueError("lr and distill_temperature must be > 0")

    def to_dict(self):
        return asdict(self)


def _check_int(cfg, name, lo):
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name} must be a whole number >= {lo}, got {v!r}")


def logits_of(cfg, params, feats, batch=4096):
    """Evaluation-mode logits [B, C] over all rows, in chunks."""
    n = len(next(iter(feats.values())))
    out = []
    for s in range(0, n, batch):
        out.append(model.forward(cfg, params, {k: v[s:s + batch] for k, v in feats.items()})[0])
    return np.concatenate(out) if out else np.zeros((0, cfg.n_classes), dtype=np.float32)


def accuracy(logits, labels):
    return float((logits.argmax(axis=1) == labels).mean())


def fit(cfg, feats_tr, y_tr, feats_va, y_va, tc=None, params=None, teacher=None, log=None):
    """Train -> (best params, info dict with the history). teacher: [B_tr, C] probabilities at temperature T."""
    tc = tc or TrainConfig()
    rng = np.random.default_rng(tc.seed)
    params = params if params is not None else model.init(cfg, rng)
    opt = optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    stop = optim.EarlyStopping(tc.patience)
    n = len(y_tr)
    steps_per_epoch = (n + tc.batch_size - 1) // tc.batch_size
    total = tc.epochs * steps_per_epoch
    step, history = 0, []
    for epoch in range(tc.epochs):
        order = rng.permutation(n)
        run_loss = 0.0
        for s in range(0, n, tc.batch_size):
            idx = np.sort(order[s:s + tc.batch_size])
            batch = {k: v[idx] for k, v in feats_tr.items()}
            logits, cache = model.forward(cfg, params, batch, rng)
            loss, dlogits = losses.cross_entropy(logits, y_tr[idx], tc.label_smoothing)
            if teacher is not None:
                a = tc.distill_alpha
                kd, dkd = losses.distillation(logits, teacher[idx], tc.distill_temperature)
                loss, dlogits = (1 - a) * loss + a * kd, (1 - a) * dlogits + a * dkd
            bal, dg, dh = model.balance_loss(cfg, cache)
            grads = model.backward(cfg, params, cache, dlogits.astype(np.float32), dg, dh)
            optim.clip_by_global_norm(grads, tc.clip)
            opt.step(grads, lr=optim.warmup_cosine(step, total, tc.lr, int(tc.warmup * total)))
            run_loss += (loss + bal) * len(idx)
            step += 1
        val_acc = accuracy(logits_of(cfg, params, feats_va), y_va)
        history.append({"epoch": epoch + 1, "loss": run_loss / n, "val_accuracy": val_acc})
        if log:
            log(f"  epoch {epoch + 1:2d}  loss {run_loss / n:.4f}  val acc {val_acc:.4f}")
        if stop.update(val_acc, params, epoch):
            break
    return stop.best_params, {"best_epoch": stop.best_epoch + 1, "val_accuracy": stop.best, "history": history}
