"""The team's adaptation stage: after stage 1, an expert's own encoder may train on the task.

    settings = AdaptSettings(method="lora", rank=8, epochs=2)
    expert2, (arrays, meta), info = adapt(expert, texts_fit, y_fit, texts_val, y_val, settings, log, work_dir)
    # expert2.encoder has the change merged in (no extra inference cost); the team stores `arrays` in its
    # checkpoint under a prefix and `meta` in its JSON, and on load:
    expert2 = load_delta(expert, arrays, meta)

The delta holds only what changed (LoRA's A and B, or the trained layers' tensors), float32, and meta records
the base weights' sha256: loading it onto other weights is refused. The adapted expert reports a
weights_sha256 derived from the base's and the delta's, so feature caches keyed on it never mix the two.
Training is minislm.team.finetune (AdamW, warm-up + decay, early stopping, resumable from work_dir).
"""
from dataclasses import dataclass

from minislm.experts import adapt as adapt_lib
from minislm.team.finetune import FinetuneConfig, finetune


@dataclass
class AdaptSettings:
    method: str = "lora"          # "lora" (low-rank branches), "topk" (top layers) or "full" (every tensor)
    rank: int = 8                 # LoRA rank
    alpha: float = 16.0           # LoRA: the branch is scaled by alpha / rank
    dropout: float = 0.1          # LoRA: dropout on the branches' inputs
    top_k: int = 2                # topk: how many layers train, from the top
    lr: float = 1e-3              # peak lr of the encoder's trainable tensors (full fine-tuning wants ~3e-5)
    epochs: int = 2
    batch_size: int = 32
    max_len: int = 256            # tokens per text (<= 512)
    head_tail: int | None = None  # None: keep a long text's start; h: its first h and last max_len - 2 - h tokens
    llrd: float = 1.0             # layer-wise lr decay (1 = none; 0.9 is usual for full fine-tuning)
    patience: int = 1             # epochs without a better validation accuracy before stopping
    seed: int = 0

    def __post_init__(self):
        if self.method not in adapt_lib.METHODS:
            raise ValueError(f"adaptation method {self.method!r} is unknown; use one of "
                             f"{', '.join(adapt_lib.METHODS)}")
        if self.head_tail is not None and not 0 <= self.head_tail <= self.max_len - 2:
            raise ValueError(f"head_tail={self.head_tail} must lie in 0..max_len - 2 = {self.max_len - 2}")
        if self.alpha <= 0:
            raise ValueError(f"alpha={self.alpha} must be positive")
        if self.patience < 1:
            raise ValueError(f"patience={self.patience} must be at least 1")
        self.finetune_config()  # the remaining checks (ranges of rank, lr, max_len, ...)

    def finetune_config(self):
        """-> the FinetuneConfig this stage trains with (mean pooling of the last layer, a linear head)."""
        return FinetuneConfig(method=self.method, rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                              top_k=self.top_k, lr=self.lr, epochs=self.epochs, batch_size=self.batch_size,
                              max_len=self.max_len, head_tail=self.head_tail, llrd=self.llrd,
                              patience=self.patience, seed=self.seed)


def adapt(expert, texts_fit, y_fit, texts_val, y_val, settings, log=print, work_dir=None):
    """-> (adapted Expert with merged weights, delta (arrays {name: float32}, meta dict), info dict).

    info: val_accuracy (best epoch), trainable_params, train_seconds, steps, method, val_accuracy_per_epoch.
    work_dir: where checkpoints (and top-k's cache) go; a rerun there resumes.
    """
    result = finetune(expert, texts_fit, y_fit, texts_val, y_val, settings.finetune_config(), work_dir=work_dir,
                      log=log)
    arrays, meta = result.adaptation.delta()
    adapted = adapt_lib.apply(expert, arrays, meta)
    info = {"method": settings.method, "val_accuracy": result.best_val_accuracy,
            "val_accuracy_per_epoch": result.val_accuracy, "trainable_params": result.trainable_params,
            "train_seconds": result.train_seconds, "steps": result.steps}
    log(f"adapted {expert.name} ({settings.method}): val accuracy {result.best_val_accuracy:.4f}, "
        f"{result.trainable_params} trainable parameters, {result.steps} steps in {result.train_seconds:.1f} s")
    return adapted, (arrays, meta), info


def load_delta(expert, arrays, meta):
    """The base expert and a stored delta -> the adapted Expert (refused when the base weights differ)."""
    return adapt_lib.apply(expert, arrays, meta)
