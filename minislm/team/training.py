"""Staged training of a team, on training rows with a validation split carved from them.

    check    the rows are validated first (minislm.data.clean_training): two classes at least, empty texts
             and duplicates removed, so no text lands on both sides of the split
    stage 1  each expert's own model: the lexical expert (fastText-style), and per encoder a layer mix over
             its pooled layers + an MLP head
    stage 2  the full collaboration over every expert (projection, gate, fusion, head), layer mixes started
             from stage 1
    stage 3  the cheaper prefixes of the team (lexical; lexical + L3; ...) distilled from the full model:
             these are the cascade's tiers
    then     cascade thresholds chosen on the validation split (cascade.py)

The lexical expert joins the fusion through its class log-probabilities, computed out-of-fold on the rows
the fusion trains on (k lexical models, each blind to its fold): a bag trained on the same rows would look
far more reliable in training than on new text. `lexical_features="bag"` uses the in-sample bag instead.
"""
import dataclasses
from dataclasses import dataclass

import numpy as np

from minislm import data as data_lib
from minislm.collab import losses, trainer
from minislm.collab import model as collab
from minislm.experts.lexical import LexicalModel
from minislm.team import cascade
from minislm.team.config import TeamConfig
from minislm.team.team import LEXICAL, Team, lexical_logprob, short


@dataclass
class TrainingRecord:
    """What training saw, kept on a team trained in this process so experiments reuse it (never saved)."""
    fit_idx: np.ndarray      # [B_fit] rows of the (cleaned) training set the models were fitted on
    val_idx: np.ndarray      # [B_val] rows held out for validation
    y_fit: np.ndarray        # [B_fit] labels
    y_val: np.ndarray        # [B_val]
    feats_fit: dict          # expert -> standardised features [B_fit, L+1, K]
    feats_val: dict          # expert -> [B_val, L+1, K]
    lexical_val: np.ndarray  # [B_val, C] the lexical expert's validation probabilities
    texts_val: list          # B_val validation texts
    dataset: object          # the cleaned TextDataset the indices refer to


def standardize_stats(X):
    """[B, L+1, K] -> (mean, std) per (layer, feature), so every layer enters the mix on one scale."""
    return X.mean(axis=0).astype(np.float32), (X.std(axis=0) + 1e-6).astype(np.float32)


def split_rows(labels, val_fraction, seed):
    """-> (fit_idx, val_idx): a stratified validation carve-out."""
    n_val = int(round(val_fraction * len(labels)))
    val_idx = data_lib.stratified_indices(labels, n_val, seed)
    return np.setdiff1d(np.arange(len(labels)), val_idx), val_idx


def collab_config(cfg, experts, feats, fusion=None, proj_dim=None):
    """The CollabConfig of a model over `experts`, sized from their features."""
    return collab.CollabConfig(
        experts=list(experts), in_layers=[feats[e].shape[1] for e in experts],
        in_dims=[feats[e].shape[2] for e in experts], n_classes=len(cfg.label_names),
        fusion=fusion or cfg.fusion, proj_dim=cfg.proj_dim if proj_dim is None else proj_dim,
        head_hidden=cfg.head_hidden, dropout=cfg.dropout, gate=cfg.gate, top_k=min(cfg.top_k, len(experts)),
        balance=cfg.balance)


def init_from_singles(team, c):
    """Fresh parameters for collaboration c, each expert's layer mix copied from its stage-1 model."""
    params = collab.init(c, np.random.default_rng(team.cfg.seed))
    for e in c.experts:
        if e in team.singles:
            params["mix"][e] = {k: v.copy() for k, v in team.singles[e][1]["mix"][e].items()}
    return params


def train_fusion(team, experts, rec, teacher=None, fusion=None, log=None):
    """A collaboration over `experts` trained on rec's features, layer mixes started from the stage-1 singles."""
    c = collab_config(team.cfg, experts, rec.feats_fit, fusion=fusion)
    sub = lambda f: {e: f[e] for e in experts}  # noqa: E731
    params, info = trainer.fit(c, sub(rec.feats_fit), rec.y_fit, sub(rec.feats_val), rec.y_val, team.cfg.train,
                               params=init_from_singles(team, c), teacher=teacher)
    if log:
        log(f"  {'+'.join(short(e) for e in experts)} ({c.fusion}) val acc {info['val_accuracy']:.4f} "
            f"(epoch {info['best_epoch']})")
    return c, params


def train_router(team, rec, log=None):
    """A gated fusion over every expert whose noisy top-k gate reads only the lexical expert, so at
    inference the gate can pick which encoders to run before any of them runs."""
    cfg = team.cfg
    c = dataclasses.replace(collab_config(cfg, cfg.experts, rec.feats_fit, fusion="gated"), gate="noisy_topk",
                            top_k=cfg.router_top_k, gate_input=LEXICAL, balance=max(cfg.balance, 0.01))
    params, info = trainer.fit(c, rec.feats_fit, rec.y_fit, rec.feats_val, rec.y_val, cfg.train,
                               params=init_from_singles(team, c))
    if log:
        log(f"  router val acc {info['val_accuracy']:.4f} (epoch {info['best_epoch']})")
    team.metrics["val_router"] = info["val_accuracy"]
    return c, params


def fit(team, train, log=print, progress=True):
    """Stages 1-3 and the threshold search on `train` (a TextDataset) -> the team, with team.training set."""
    cfg = team.cfg
    train, facts = data_lib.clean_training(train)
    for line in facts["notes"]:
        log(f"data: {line}")
    fit_idx, val_idx = split_rows(train.labels, cfg.val_fraction, cfg.seed)
    y_fit, y_val = train.labels[fit_idx], train.labels[val_idx]
    if len(np.unique(y_fit)) < 2 or len(val_idx) == 0:
        raise data_lib.DataError(f"{len(train)} usable rows are too few to fit and validate on; give more rows "
                                 f"(at least a few per class)")
    team.protocol = dict(train.protocol, n_fit=len(fit_idx), n_val=len(val_idx), cleaning=facts["counts"])
    C = len(cfg.label_names)
    texts_fit = [train.texts[i] for i in fit_idx]
    texts_val = [train.texts[i] for i in val_idx]
    feats_fit, feats_val = {}, {}

    log(f"stage 1: lexical expert ({len(fit_idx)} fit rows, {len(val_idx)} validation rows)")
    tok, lx = team.tokenizer(), cfg.lexical
    make = lambda: LexicalModel.create(tok, C, cfg.label_names, dim=lx.dim, n_buckets=lx.n_buckets,  # noqa: E731
                                       seed=cfg.seed)
    team.lexical = make().fit(texts_fit, y_fit, epochs=lx.epochs, lr=lx.lr, seed=cfg.seed)
    p_val = team.lexical.predict_proba(texts_val)
    team.metrics["val_single"] = {LEXICAL: trainer.accuracy(p_val, y_val)}
    log(f"  lexical val acc {team.metrics['val_single'][LEXICAL]:.4f}")
    if cfg.lexical_features == "oof":
        oof = np.zeros((len(fit_idx), C), dtype=np.float32)
        for k, (tr, ho) in enumerate(data_lib.kfold(y_fit, min(cfg.folds, len(fit_idx)), cfg.seed)):
            m = make().fit([texts_fit[i] for i in tr], y_fit[tr], epochs=lx.epochs, lr=lx.lr, seed=cfg.seed + k + 1)
            oof[ho] = m.predict_proba([texts_fit[i] for i in ho])
        raw_fit, raw_val = lexical_logprob(oof), lexical_logprob(p_val)
    else:
        raw_fit, raw_val = team.lexical.bag(texts_fit)[:, None, :], team.lexical.bag(texts_val)[:, None, :]
    team.stats[LEXICAL] = standardize_stats(raw_fit)
    feats_fit[LEXICAL], feats_val[LEXICAL] = team.standardized(LEXICAL, raw_fit), team.standardized(LEXICAL, raw_val)

    for name in cfg.encoders:
        log(f"stage 1: {name}")
        X = team.encoder_features(name, train.texts, split=train.split, progress=progress)
        team.stats[name] = standardize_stats(X[fit_idx])
        feats_fit[name], feats_val[name] = team.standardized(name, X[fit_idx]), team.standardized(name, X[val_idx])
        del X
        c1 = collab_config(cfg, [name], feats_fit, fusion="concat", proj_dim=0)
        params, info = trainer.fit(c1, {name: feats_fit[name]}, y_fit, {name: feats_val[name]}, y_val, cfg.train)
        team.singles[name] = (c1, params)
        team.metrics["val_single"][name] = info["val_accuracy"]
        log(f"  {name} val acc {info['val_accuracy']:.4f} (epoch {info['best_epoch']})")

    rec = TrainingRecord(fit_idx, val_idx, y_fit, y_val, feats_fit, feats_val, p_val, texts_val, train)
    team.training = rec
    team.tiers = [None] * len(cfg.experts)
    if len(cfg.experts) > 1:
        log(f"stage 2: {cfg.fusion} fusion over {', '.join(cfg.experts)}")
        full_cfg, full = train_fusion(team, cfg.experts, rec, log=log)
        team.tiers[-1] = (full_cfg, full)
        log("stage 3: cascade tiers distilled from the full fusion")
        teacher = losses.softmax(trainer.logits_of(full_cfg, full, feats_fit), cfg.train.distill_temperature)
        for k in range(1, len(cfg.experts) - 1):
            team.tiers[k] = train_fusion(team, cfg.experts[:k + 1], rec, teacher=teacher, log=log)
    if cfg.router_top_k and cfg.encoders:
        log(f"gated mode: a top-{cfg.router_top_k} router fed by the lexical expert")
        team.router = train_router(team, rec, log=log)
    tier_probs = team.tier_probs(feats_val, p_val)
    team.metrics["val_tiers"] = [float(trainer.accuracy(p, y_val)) for p in tier_probs]
    log("cascade thresholds on the validation split")
    team.thresholds, team.metrics["val_cascade"] = cascade.choose_thresholds(tier_probs, y_val,
                                                                             team.tier_flops(texts_val))
    return team


def train_team(texts, labels, label_names=None, log=print, **config):
    """Train a team from lists: texts [B] and labels [B] (whole numbers, or strings mapped by
    minislm.data.map_labels unless label_names gives the order). config: TeamConfig fields
    (experts, fusion, train=TrainConfig(...) or a dict, ...). -> Team."""
    if isinstance(texts, str) or len(texts) != len(labels):
        raise ValueError(f"give one label per text: {len(texts)} texts, {len(labels)} labels")
    y, label_names = data_lib.map_labels(list(labels), label_names, "labels")
    ds = data_lib.TextDataset(list(texts), y, label_names, config.get("dataset", "user"), "train", "memory",
                              {"note": "texts and labels given in memory"})
    team = Team(TeamConfig(**{"dataset": "user", **config, "label_names": label_names}))
    return fit(team, ds, log=log)
