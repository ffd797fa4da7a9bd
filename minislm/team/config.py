"""The team's configuration: one tree of dataclasses, every field commented, every value checked on creation.

    TeamConfig
      lexical: LexicalSettings     the n-gram expert of tier 0
      train:   TrainConfig         how every head, fusion and tier is trained (minislm.collab.trainer)

The CLI (`python -m minislm.train`) maps its flags onto these fields and takes its defaults from them;
checkpoints store `to_dict()` and rebuild with `from_dict()`.
"""
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from minislm.collab.fusion import FUSIONS
from minislm.collab.trainer import TrainConfig
from minislm.experts.registry import ENCODERS, LEXICAL
from minislm.team.adaptation import AdaptSettings

GATES = ("softmax", "noisy_topk")
LEXICAL_FEATURES = ("oof", "bag")


def _whole(obj, name, lo, hi=None):
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        raise ValueError(f"{name} must be a whole number in [{lo}, {hi if hi is not None else 'inf'}], got {v!r}")


def _number(obj, name, lo, hi):
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or not (lo <= v <= hi):
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {v!r}")


@dataclass
class LexicalSettings:
    n_buckets: int = 1 << 18      # hashed word / WordPiece n-gram buckets (the weights are [n_buckets, C])
    epochs: int = 10              # at most this many Newton steps per fit (experts/lexical_solver.py)
    lr: float = 1.0               # the line search's first step

    def __post_init__(self):
        _whole(self, "n_buckets", 1, 1 << 26)
        _whole(self, "epochs", 1, 1000)
        _number(self, "lr", 1e-6, 100.0)


@dataclass
class TeamConfig:
    dataset: str                      # dataset name, for caches and the record
    label_names: list                 # C class names, in label order
    experts: list = field(default_factory=lambda: [LEXICAL, *ENCODERS])  # tier order, cheapest first
    fusion: str = "concat"            # fusion strategy of stages 2 and 3 (minislm.collab.fusion)
    max_len: int = 128                # tokens per text fed to the encoders (specials included)
    lexical_features: str = "oof"     # the lexical expert enters the fusion as out-of-fold log-probs, or "bag"
    val_fraction: float = 0.15        # share of the training rows held out for validation
    folds: int = 5                    # folds of the out-of-fold lexical features
    proj_dim: int = 256               # common width D every expert is projected to
    head_hidden: int = 256            # hidden width of the MLP heads (0 = linear heads)
    dropout: float = 0.1              # on the heads' hidden layer, train time only
    gate: str = "softmax"             # "softmax" or "noisy_topk"
    top_k: int = 2                    # experts kept by the noisy top-k gate
    balance: float = 0.0              # weight of the gate's load-balancing loss
    router_top_k: int = 2             # gated mode: encoders the lexical-fed router runs; 0 = no router
    tolerance: float = 0.002          # the cascade served: the cheapest setting within this accuracy of the best
    crossfit_below: int = 4000        # below this many training rows every choice is made on out-of-fold
                                      # predictions over all rows (k = folds), not on the validation split alone
    adapt: dict = field(default_factory=dict)  # encoder -> AdaptSettings: trained on the task after stage 1
    lexical: LexicalSettings = field(default_factory=LexicalSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0                     # the validation carve-out, the lexical expert, the out-of-fold folds

    def __post_init__(self):
        if isinstance(self.lexical, dict):
            self.lexical = LexicalSettings(**self.lexical)
        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)
        if not isinstance(self.adapt, dict):
            raise ValueError(f"adapt must map encoder names to adaptation settings, got {type(self.adapt).__name__}")
        self.adapt = {k: v if isinstance(v, AdaptSettings) else AdaptSettings(**v) for k, v in self.adapt.items()}
        if not isinstance(self.lexical, LexicalSettings) or not isinstance(self.train, TrainConfig):
            raise ValueError(f"lexical and train must be a LexicalSettings and a TrainConfig (or dicts of their "
                             f"fields), got {self.lexical!r} and {self.train!r}")
        if not isinstance(self.experts, (list, tuple)) or not isinstance(self.label_names, (list, tuple)):
            raise ValueError(f"experts and label_names must be lists, got {self.experts!r} and "
                             f"{self.label_names!r}")
        self.experts, self.label_names = list(self.experts), [str(n) for n in self.label_names]
        if len(self.label_names) < 2:
            raise ValueError(f"a classifier needs at least two classes, got {self.label_names}; give rows of two "
                             f"classes or more")
        if len(set(self.label_names)) != len(self.label_names):
            raise ValueError(f"label names repeat: {self.label_names}; give each class one name")
        if not self.experts or self.experts[0] != LEXICAL:
            raise ValueError(f"the first tier must be {LEXICAL!r} (the cascade's near-free tier 0), got "
                             f"{self.experts}; list {LEXICAL!r} first, then the encoders")
        if len(set(self.experts)) != len(self.experts):
            raise ValueError(f"an expert is listed twice: {self.experts}; list each once")
        if LEXICAL in self.experts[1:]:
            raise ValueError(f"{LEXICAL!r} can only be tier 0; list it first and once")
        for name in self.encoders:  # decided here, before any training, not when the expert is first run
            if not isinstance(name, str) or (name not in ENCODERS and not Path(name).is_dir()):
                raise ValueError(f"unknown expert {name!r}: neither a pretrained expert ({', '.join(ENCODERS)}) "
                                 f"nor a model folder on this machine; name one of those or a folder's path")
        stray = [k for k in self.adapt if k not in self.encoders]
        if stray:
            raise ValueError(f"adapt names {stray}, which are not encoders of this team ({self.encoders})")
        if self.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {self.fusion!r}; choose one of {', '.join(FUSIONS)}")
        if self.gate not in GATES:
            raise ValueError(f"unknown gate {self.gate!r}; choose one of {', '.join(GATES)}")
        if self.lexical_features not in LEXICAL_FEATURES:
            raise ValueError(f"lexical_features must be one of {LEXICAL_FEATURES}, got {self.lexical_features!r}")
        _whole(self, "max_len", 2, 512)
        _number(self, "val_fraction", 0.01, 0.9)
        _whole(self, "folds", 2, 50)
        _whole(self, "proj_dim", 0, 8192)
        _whole(self, "head_hidden", 0, 8192)
        _number(self, "dropout", 0.0, 0.95)
        _whole(self, "top_k", 1, 64)
        _number(self, "balance", 0.0, 100.0)
        _whole(self, "router_top_k", 0, 64)
        _number(self, "tolerance", 0.0, 1.0)
        _whole(self, "crossfit_below", 0, 10 ** 9)
        _whole(self, "seed", 0, 2 ** 32 - 1)
        if self.proj_dim == 0 and self.fusion != "concat":
            raise ValueError(f"fusion {self.fusion!r} needs a common width: set proj_dim > 0")
        # a router that keeps every encoder (or more) would save nothing: cap it at the encoders there are
        self.router_top_k = min(self.router_top_k, len(self.encoders))

    @property
    def encoders(self):
        """The pretrained encoders of the team, in tier order."""
        return [e for e in self.experts if e != LEXICAL]

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        """A stored config -> TeamConfig; unknown keys are an error (a checkpoint from another version)."""
        if not isinstance(d, dict):
            raise ValueError(f"a team config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise ValueError(f"unknown team config fields {extra}")
        return cls(**d)
