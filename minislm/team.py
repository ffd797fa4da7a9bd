"""The trained team: a lexical expert and pretrained encoders, their heads, fusion and cascade, as one object.

Staged training (Team.fit), on a training split with a validation split carved from it:
    stage 1  each expert's own model: the lexical expert (fastText-style), and per encoder a layer mix over
             its pooled layers + an MLP head
    stage 2  the full collaboration over every expert (projection, gate, fusion, head), layer mixes started
             from stage 1
    stage 3  the cheaper prefixes of the team (lexical; lexical + L3; ...) distilled from the full model:
             these are the cascade's tiers
    then     cascade thresholds chosen on the validation split (minislm.cascade)

The lexical expert joins the fusion through its class log-probabilities, computed out-of-fold on the rows
the fusion trains on (k lexical models, each blind to its fold): a bag trained on the same rows would look
far more reliable in training than on new text. `lexical_features="bag"` uses the in-sample bag instead.
"""
from dataclasses import dataclass, field

import numpy as np

from minislm import data as data_lib
from minislm import features as features_lib
from minislm.collab import model as collab
from minislm.collab import trainer
from minislm.collab.trainer import TrainConfig

LEXICAL = "lexical"
ENCODERS = ("paraphrase-MiniLM-L3-v2", "all-MiniLM-L6-v2", "all-mpnet-base-v2")


@dataclass
class TeamConfig:
    dataset: str                                  # dataset name, for caches and the record
    label_names: list                             # C class names, in label order
    experts: list = field(default_factory=lambda: [LEXICAL, *ENCODERS])  # tier order, cheapest first
    fusion: str = "concat"                        # fusion strategy of stage 2 and 3
    max_len: int = 128                            # tokens per text fed to the encoders
    lexical_features: str = "oof"                 # "oof" log-probabilities, or "bag"
    val_fraction: float = 0.15                    # share of the training split held out for validation
    folds: int = 5                                # folds of the out-of-fold lexical features
    proj_dim: int = 256
    head_hidden: int = 256
    dropout: float = 0.1
    gate: str = "softmax"
    top_k: int = 2
    balance: float = 0.0
    router_top_k: int = 2                         # gated mode: experts the lexical-fed router runs; 0 = none
    lexical: dict = field(default_factory=lambda: {"dim": 16, "n_buckets": 1 << 16, "epochs": 10, "lr": 1.0})
    train: dict = field(default_factory=lambda: TrainConfig().to_dict())
    seed: int = 0

    @property
    def encoders(self):
        return [e for e in self.experts if e != LEXICAL]


def standardize_stats(X):
    """[B, L+1, K] -> (mean, std) per (layer, feature), so every layer enters the mix on one scale."""
    return X.mean(axis=0).astype(np.float32), (X.std(axis=0) + 1e-6).astype(np.float32)


def lexical_logprob(probs):
    """[B, C] probabilities -> [B, 1, C] log-probabilities, the lexical expert's features."""
    return np.log(np.clip(probs, 1e-6, 1.0)).astype(np.float32)[:, None, :]


class Team:
    def __init__(self, cfg):
        self.cfg = cfg                  # TeamConfig
        self.lexical = None             # LexicalModel
        self.stats = {}                 # expert -> (mean, std) of its pooled features
        self.singles = {}               # expert -> (CollabConfig, params): stage 1
        self.tiers = []                 # tier k -> (CollabConfig, params) over experts[:k+1]; tier 0 = lexical
        self.thresholds = []            # confidence needed to stop at tier k (k < last)
        self.router = None              # (CollabConfig, params): gated mode, a top-k gate fed by the lexical expert
        self.metrics = {}               # validation numbers recorded during fit
        self.protocol = {}
        self._experts = {}
        self._feats = None
        self.expected_sha256 = {}       # expert -> weights sha256 the checkpoint was trained with
        self.command = None             # the command that trained it (from the checkpoint)

    # ---- experts and features ------------------------------------------------------------------------
    def expert(self, name):
        from minislm.experts import load_expert

        if name not in self._experts:
            e = load_expert(name)
            want = self.expected_sha256.get(name)
            if want and e.weights_sha256 != want:
                from minislm.checkpoint import CheckpointError
                raise CheckpointError(f"this checkpoint was trained on {name} weights with sha256 {want[:12]}..., "
                                      f"but {e.folder} holds {e.weights_sha256[:12]}...: a checkpoint from other "
                                      f"experts; train a new one or fetch the original weights")
            self._experts[name] = e
        return self._experts[name]

    def tokenizer(self):
        """The WordPiece tokenizer the lexical expert reads (the BERT experts' vocabulary)."""
        from minislm import weights
        from minislm.tokenizer import Tokenizer

        folder = weights.expert_dir("all-MiniLM-L6-v2")
        return Tokenizer.from_file(folder / "tokenizer.json", max_len=512, pad_id=0)

    def encoder_features(self, name, texts, split=None, progress=False):
        """Raw pooled features [B, L+1, 2H] of texts: from the cache for a named split, else computed."""
        e = self.expert(name)
        if split is not None:
            return np.asarray(features_lib.extract(e, texts, self.cfg.dataset, split, self.cfg.max_len,
                                                   progress=progress))
        return features_lib.pooled_features(e, texts, self.cfg.max_len)

    def standardized(self, name, X):
        mu, sd = self.stats[name]
        return ((X - mu) / sd).astype(np.float32)

    # ---- training --------------------------------------------------------------------------------------
    def fit(self, train, log=print, progress=True):
        """train: a TextDataset. Runs stages 1-3 and the threshold search; returns self."""
        from minislm import cascade
        from minislm.lexical import LexicalModel

        cfg = self.cfg
        tc = TrainConfig(**cfg.train)
        n_val = int(round(cfg.val_fraction * len(train)))
        val_idx = data_lib.stratified_indices(train.labels, n_val, cfg.seed)
        fit_idx = np.setdiff1d(np.arange(len(train)), val_idx)
        y_fit, y_val = train.labels[fit_idx], train.labels[val_idx]
        self.protocol = dict(train.protocol, n_fit=len(fit_idx), n_val=len(val_idx))
        C = len(cfg.label_names)
        texts_fit = [train.texts[i] for i in fit_idx]
        texts_val = [train.texts[i] for i in val_idx]
        feats_fit, feats_val = {}, {}

        log("stage 1: lexical expert")
        tok = self.tokenizer()
        lx = cfg.lexical
        make = lambda: LexicalModel.create(tok, C, cfg.label_names, dim=lx["dim"],  # noqa: E731
                                           n_buckets=lx["n_buckets"], seed=cfg.seed)
        self.lexical = make().fit(texts_fit, y_fit, epochs=lx["epochs"], lr=lx["lr"], seed=cfg.seed)
        p_val = self.lexical.predict_proba(texts_val)
        self.metrics["val_single"] = {LEXICAL: trainer.accuracy(p_val, y_val)}
        log(f"  lexical val acc {self.metrics['val_single'][LEXICAL]:.4f}")
        if LEXICAL in cfg.experts:
            if cfg.lexical_features == "oof":
                oof = np.zeros((len(fit_idx), C), dtype=np.float32)
                for k, (tr, ho) in enumerate(data_lib.kfold(y_fit, cfg.folds, cfg.seed)):
                    m = make().fit([texts_fit[i] for i in tr], y_fit[tr], epochs=lx["epochs"], lr=lx["lr"],
                                   seed=cfg.seed + k + 1)
                    oof[ho] = m.predict_proba([texts_fit[i] for i in ho])
                raw_fit, raw_val = lexical_logprob(oof), lexical_logprob(p_val)
            else:
                raw_fit = self.lexical.bag(texts_fit)[:, None, :]
                raw_val = self.lexical.bag(texts_val)[:, None, :]
            self.stats[LEXICAL] = standardize_stats(raw_fit)
            feats_fit[LEXICAL], feats_val[LEXICAL] = self.standardized(LEXICAL, raw_fit), \
                self.standardized(LEXICAL, raw_val)

        for name in cfg.encoders:
            log(f"stage 1: {name}")
            X = self.encoder_features(name, train.texts, split=train.split, progress=progress)
            self.stats[name] = standardize_stats(X[fit_idx])
            feats_fit[name] = self.standardized(name, X[fit_idx])
            feats_val[name] = self.standardized(name, X[val_idx])
            del X
            c1 = self.collab_config([name], feats_fit, fusion="concat", proj_dim=0)
            params, info = trainer.fit(c1, {name: feats_fit[name]}, y_fit, {name: feats_val[name]}, y_val, tc)
            self.singles[name] = (c1, params)
            self.metrics["val_single"][name] = info["val_accuracy"]
            log(f"  {name} val acc {info['val_accuracy']:.4f} (epoch {info['best_epoch']})")

        self._feats = {"fit": feats_fit, "val": feats_val, "y_fit": y_fit, "y_val": y_val, "p_val": p_val,
                       "texts_val": texts_val}  # kept in memory for experiments, never saved
        log(f"stage 2: {cfg.fusion} fusion over {', '.join(cfg.experts)}")
        full_cfg, full = self.train_fusion(cfg.experts, feats_fit, y_fit, feats_val, y_val, tc, log=log)
        log("stage 3: cascade tiers distilled from the full fusion")
        T = tc.distill_temperature
        teacher = trainer.losses.softmax(trainer.logits_of(full_cfg, full, feats_fit), T)
        self.tiers = [None] * len(cfg.experts)
        self.tiers[-1] = (full_cfg, full)
        for k in range(1, len(cfg.experts) - 1):
            self.tiers[k] = self.train_fusion(cfg.experts[:k + 1], feats_fit, y_fit, feats_val, y_val, tc,
                                              teacher=teacher, log=log)
        if cfg.router_top_k and LEXICAL in cfg.experts:
            log(f"gated mode: a top-{cfg.router_top_k} router fed by the lexical expert")
            self.router = self.train_router(feats_fit, y_fit, feats_val, y_val, tc, log=log)
        self.metrics["val_tiers"] = [float(trainer.accuracy(p, y_val)) for p in self.tier_probs(feats_val, p_val)]
        log("cascade thresholds on the validation split")
        self.thresholds, self.metrics["val_cascade"] = cascade.choose_thresholds(
            self.tier_probs(feats_val, p_val), y_val, self.tier_flops(texts_val))
        return self

    def collab_config(self, experts, feats, fusion=None, proj_dim=None):
        cfg = self.cfg
        return collab.CollabConfig(
            experts=list(experts), in_layers=[feats[e].shape[1] for e in experts],
            in_dims=[feats[e].shape[2] for e in experts], n_classes=len(cfg.label_names),
            fusion=fusion or cfg.fusion, proj_dim=cfg.proj_dim if proj_dim is None else proj_dim,
            head_hidden=cfg.head_hidden, dropout=cfg.dropout, gate=cfg.gate, top_k=min(cfg.top_k, len(experts)),
            balance=cfg.balance)

    def init_from_singles(self, c):
        """Fresh parameters for collaboration c, each expert's layer mix copied from its stage-1 model."""
        params = collab.init(c, np.random.default_rng(self.cfg.seed))
        for e in c.experts:
            if e in self.singles:
                params["mix"][e] = {k: v.copy() for k, v in self.singles[e][1]["mix"][e].items()}
        return params

    def train_fusion(self, experts, feats_fit, y_fit, feats_val, y_val, tc, teacher=None, fusion=None, log=None):
        """A collaboration over `experts`, layer mixes started from the stage-1 singles."""
        c = self.collab_config(experts, feats_fit, fusion=fusion)
        params = self.init_from_singles(c)
        sub = lambda f: {e: f[e] for e in experts}  # noqa: E731
        params, info = trainer.fit(c, sub(feats_fit), y_fit, sub(feats_val), y_val, tc, params=params,
                                   teacher=teacher)
        if log:
            log(f"  {'+'.join(short(e) for e in experts)} ({c.fusion}) val acc {info['val_accuracy']:.4f} "
                f"(epoch {info['best_epoch']})")
        return c, params

    def train_router(self, feats_fit, y_fit, feats_val, y_val, tc, log=None):
        """A gated fusion over every expert whose noisy top-k gate reads only the lexical expert, so at
        inference the gate can pick which encoders to run before any of them runs."""
        import dataclasses

        c = dataclasses.replace(self.collab_config(self.cfg.experts, feats_fit, fusion="gated"), gate="noisy_topk",
                                top_k=self.cfg.router_top_k, gate_input=LEXICAL, balance=max(self.cfg.balance, 0.01))
        params = self.init_from_singles(c)
        params, info = trainer.fit(c, feats_fit, y_fit, feats_val, y_val, tc, params=params)
        if log:
            log(f"  router val acc {info['val_accuracy']:.4f} (epoch {info['best_epoch']})")
        self.metrics["val_router"] = info["val_accuracy"]
        return c, params

    def router_flops(self, chosen, texts):
        """FLOPs per row [B] of gated mode: the lexical expert, the encoders the router chose, the head."""
        offsets, _ = self.lexical.bags(texts)
        cost = self.lexical.flops(offsets).astype(np.float64) + head_flops(self.router[0])
        for i, name in enumerate(self.router[0].experts):
            if name == LEXICAL:
                continue
            lengths = self.token_lengths(name, texts)  # each expert's own tokenizer: MPNet's can differ
            cost += np.where(chosen[:, i], encoder_row_flops(self.expert(name).config, lengths), 0.0)
        return cost

    def token_lengths(self, name, texts):
        """[B] tokens per text as expert `name` reads them (truncated to max_len)."""
        return np.array([len(r) for r in self.expert(name).tokenizer.encode(texts, self.cfg.max_len)], dtype=np.int64)

    def predict_gated(self, texts):
        """Gated mode: the router reads the lexical expert, picks top-k experts per row, and only those run.
        -> (probabilities [B, C], info with the chosen experts and FLOPs per row)."""
        c, params = self.router
        B = len(texts)
        p_lex = self.lexical.predict_proba(texts)
        feats = {LEXICAL: self.standardized(LEXICAL, lexical_logprob(p_lex))}
        g = collab.gate_only(c, params, feats)                     # [B, E], k nonzero per row
        chosen = g > 0
        for i, name in enumerate(c.experts):
            if name == LEXICAL:
                continue
            rows = np.flatnonzero(chosen[:, i])
            e = self.expert(name)
            full = np.zeros((B, e.config.n_layers + 1, 2 * e.config.hidden), dtype=np.float32)
            if len(rows):
                X = features_lib.pooled_features(e, [texts[r] for r in rows], self.cfg.max_len)
                full[rows] = self.standardized(name, X)
            feats[name] = full                                     # unchosen rows: zeros, weighted 0 by the gate
        probs = trainer.losses.softmax(trainer.logits_of(c, params, feats))
        return probs, {"gate": g, "experts": [[c.experts[i] for i in np.flatnonzero(r)] for r in chosen],
                       "flops": self.router_flops(chosen, texts)}

    # ---- inference -----------------------------------------------------------------------------------
    def tier_probs(self, feats, lexical_probs):
        """Every tier's probabilities [B, C] on precomputed features: a list with one entry per tier."""
        out = [lexical_probs]
        for c, p in self.tiers[1:]:
            out.append(trainer.losses.softmax(trainer.logits_of(c, p, {e: feats[e] for e in c.experts})))
        return out

    def tier_flops(self, texts):
        """Cumulative FLOPs per row of answering at each tier -> list over tiers of [B] arrays.

        Reaching tier k means running the lexical expert, the encoders of tiers 1..k on the row's real tokens
        (pooling and standardising every layer), and the head of every tier on the way (each one decides
        whether to stop)."""
        offsets, _ = self.lexical.bags(texts)
        cost = self.lexical.flops(offsets).astype(np.float64)
        out = [cost.copy()]
        for k, name in enumerate(self.cfg.experts[1:], start=1):
            c = self.expert(name).config
            cost = cost + encoder_row_flops(c, self.token_lengths(name, texts)) + head_flops(self.tiers[k][0])
            out.append(cost.copy())
        return out


    def predict_proba(self, texts, max_tier=None, max_flops=None, thresholds=None, kind="max_prob",
                      explain=False):
        """B texts -> (probabilities [B, C], info) through the cascade, batched: rows that exit leave the batch.

        max_tier caps the tiers run; max_flops caps each row's cost (a row stops before a tier that would
        exceed it); thresholds override the checkpoint's. info: exit_tier [B], flops [B] (per row, real
        tokens), experts [B] (names run), reason [B], ledger (FLOPs by part), and with explain, per-row
        gate / fusion attention weights of the answering tier.
        """
        from minislm import cascade, flops

        cfg = self.cfg
        B, C = len(texts), len(cfg.label_names)
        last = len(cfg.experts) - 1 if max_tier is None else min(int(max_tier), len(cfg.experts) - 1)
        thresholds = list(self.thresholds if thresholds is None else thresholds)
        probs = np.zeros((B, C), dtype=np.float32)
        exit_tier = np.full(B, -1)
        reason = [""] * B
        details = [None] * B
        ledger = flops.FlopLedger(B)
        if B == 0:
            return probs, {"exit_tier": exit_tier, "flops": ledger.per_row, "experts": [], "reason": [],
                           "ledger": ledger.by_part}
        offsets, _ = self.lexical.bags(texts)
        p = self.lexical.predict_proba(texts)
        ledger.add("lexical", np.arange(B), self.lexical.flops(offsets))
        feats = {LEXICAL: self.standardized(LEXICAL, lexical_logprob(p))} if LEXICAL in self.stats else {}
        open_rows = np.arange(B)
        for k in range(0, last + 1):
            if k > 0:
                name = cfg.experts[k]
                e = self.expert(name)
                token_rows = e.tokenizer.encode([texts[i] for i in open_rows], cfg.max_len)  # once per tier
                lengths = np.array([len(r) for r in token_rows], dtype=np.int64)
                step = encoder_row_flops(e.config, lengths) + head_flops(self.tiers[k][0])
                if max_flops is not None:  # rows that cannot afford this tier answer with the last one
                    over = ledger.per_row[open_rows] + step > max_flops
                    for r in open_rows[over]:
                        exit_tier[r] = k - 1
                        reason[r] = f"the next tier would exceed --max-flops {max_flops:.3g}"
                    step, open_rows = step[~over], open_rows[~over]
                    token_rows = [row for row, dropped in zip(token_rows, over) if not dropped]
                    if len(open_rows) == 0:
                        break
                X = features_lib.pooled_features(e, None, cfg.max_len, rows=token_rows)
                full = np.zeros((B,) + X.shape[1:], dtype=np.float32)
                full[open_rows] = self.standardized(name, X)
                feats[name] = full
                ledger.add(name, open_rows, step)
                c, params = self.tiers[k]
                logits, cache = collab.forward(c, params, {x: feats[x][open_rows] for x in c.experts})
                p_open = trainer.losses.softmax(logits)
                if explain:
                    ex = collab.explain(c, params, cache)
            else:
                p_open = p[open_rows]
                ex = None
            probs[open_rows] = p_open
            conf = cascade.confidence(p_open, kind)
            done = np.ones(len(open_rows), dtype=bool) if k == last else conf >= thresholds[k]
            for j in np.flatnonzero(done):
                r = open_rows[j]
                exit_tier[r] = k
                reason[r] = ("the last tier allowed answers every row it gets" if k == last
                             else f"confidence {conf[j]:.3f} >= threshold {thresholds[k]:.3f}")
                if explain:
                    details[r] = {"tier": k} if ex is None else {
                        "tier": k, "layer_weights": ex["layer_weights"],
                        **{key: ex[key][j].tolist() for key in ("gate", "attention") if key in ex}}
            open_rows = open_rows[~done]
            if len(open_rows) == 0:
                break
        info = {"exit_tier": exit_tier, "flops": ledger.per_row.copy(), "reason": reason,
                "experts": [list(cfg.experts[:t + 1]) for t in exit_tier], "ledger": ledger.by_part}
        if explain:
            info["explain"] = details
        return probs, info

    def predict(self, texts, **kw):
        """B texts -> B label names (through the cascade)."""
        probs, _ = self.predict_proba(texts, **kw)
        return [self.cfg.label_names[i] for i in probs.argmax(axis=1)]

    @classmethod
    def train(cls, texts, labels, label_names=None, log=print, **config):
        """Train a team from lists: texts [B] and labels [B] (ints, or strings mapped in sorted order unless
        label_names gives the order). config: TeamConfig fields (experts, fusion, train={...}, ...)."""
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels; give one label per text")
        if labels and isinstance(labels[0], str):
            label_names = list(label_names or sorted(set(labels)))
            index = {n: i for i, n in enumerate(label_names)}
            unknown = [x for x in labels if x not in index]
            if unknown:
                raise ValueError(f"label {unknown[0]!r} is not one of {label_names}")
            labels = [index[x] for x in labels]
        label_names = list(label_names or [str(i) for i in range(max(labels) + 1)])
        y = data_lib.check_labels(labels, label_names, "labels")
        ds = data_lib.TextDataset(list(texts), y, label_names, config.get("dataset", "user"), "train", "memory",
                                  {"note": "texts and labels given in memory"})
        return cls(TeamConfig(**{"dataset": "user", **config, "label_names": label_names})).fit(ds, log=log)

    @classmethod
    def load(cls, folder, **kw):
        from minislm import checkpoint
        return checkpoint.load(folder, **kw)

    def save(self, folder, command=None):
        from minislm import checkpoint
        return checkpoint.save(self, folder, command)


def encoder_row_flops(config, lengths):
    """FLOPs per row [B] of one encoder on each row's real tokens, plus pooling (mean + CLS) and
    standardising every layer."""
    from minislm import flops

    pool = (config.n_layers + 1) * ((lengths + 1) * config.hidden + 2 * 2 * config.hidden)
    return flops.encoder_per_sample(config, lengths) + pool


def head_flops(c):
    """FLOPs per row of a collaboration's trainable part (layer mixes, projections, fusion, head)."""
    from minislm import flops

    total = sum(2 * L * K for L, K in zip(c.in_layers, c.in_dims))
    widths = [c.proj_dim or k for k in c.in_dims]
    if c.proj_dim:
        total += sum(flops.mlp_head(1, [k, c.proj_dim]) for k in c.in_dims)
    fused = sum(widths) if c.fusion == "concat" else widths[0]
    hid = [c.head_hidden] if c.head_hidden else []
    return total + flops.mlp_head(1, [fused, *hid, c.n_classes])


def short(name):
    return {"paraphrase-MiniLM-L3-v2": "L3", "all-MiniLM-L6-v2": "L6", "all-mpnet-base-v2": "MPNet"}.get(name, name)
