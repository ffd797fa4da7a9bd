"""Staged training of a team, on training rows with a validation split carved from them.

    check    the rows are validated first (minislm.data.clean_training): two classes at least, empty texts
             and duplicates removed, so no text lands on both sides of the split
    adapt    (optional, cfg.adapt) chosen encoders train on the task with their own heads: LoRA, top-k layers
             or every tensor, through the hand-written encoder backward (adaptation.py, finetune.py)
    stage 1  each expert's own model: the lexical expert, and per encoder a layer mix over its pooled layers
             (read from the adapted encoder where there is one) + an MLP head
    stage 2  the full collaboration over every expert (projection, gate, fusion, head), layer mixes started
             from stage 1
    stage 3  the cheaper prefixes of the team (lexical; lexical + L3; ...) distilled from the full model:
             these are the cascade's tiers
    then     the composition (composition.py): which tiers run, what each serves (a member, a stack of members
             or the fused head) and the thresholds, chosen on the validation rows, or for small data on
             out-of-fold predictions over every training row

The lexical expert joins the fusion through its class log-probabilities, computed out-of-fold on the rows
the fusion trains on (k lexical models, each blind to its fold): a bag trained on the same rows would look
far more reliable in training than on new text. `lexical_features="bag"` uses the in-sample bag instead.
"""
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minislm import data as data_lib
from minislm.collab import losses, trainer
from minislm.collab import model as collab
from minislm.experts.lexical import LexicalModel
from minislm.team import composition
from minislm.team.adaptation import adapt
from minislm.team.costs import encoder_row_flops, head_flops
from minislm.team.config import TeamConfig
from minislm.team.team import LEXICAL, Team, lexical_logprob, short

ADAPT_CACHE = Path(__file__).resolve().parent.parent.parent / "cache" / "adapt"


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
    crossfit: object = None  # small data: composition.Evidence, out-of-fold over every training row
    crossfit_extra: dict = None  # name -> out-of-fold probabilities [B, C] that fit(fold_extra=...) asked for


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


def train_split(team, train, fit_idx, val_idx, raw, log=None, router=True):
    """Stages 1-3 on one (fit, validation) split of `train`: sets the team's lexical expert, stats, singles,
    tiers (and router) -> TrainingRecord. raw: encoder -> pooled features [B, L+1, 2H] of every row."""
    cfg, say = team.cfg, (log or (lambda s: None))
    y_fit, y_val = train.labels[fit_idx], train.labels[val_idx]
    C = len(cfg.label_names)
    texts_fit = [train.texts[i] for i in fit_idx]
    texts_val = [train.texts[i] for i in val_idx]
    feats_fit, feats_val = {}, {}

    say(f"stage 1: lexical expert ({len(fit_idx)} fit rows, {len(val_idx)} validation rows)")
    tok, lx = team.tokenizer(), cfg.lexical
    make = lambda: LexicalModel.create(tok, C, cfg.label_names, n_buckets=lx.n_buckets, seed=cfg.seed)  # noqa: E731
    team.lexical = make().fit(texts_fit, y_fit, epochs=lx.epochs, lr=lx.lr, seed=cfg.seed)
    p_val = team.lexical.predict_proba(texts_val)
    team.metrics["val_single"] = {LEXICAL: trainer.accuracy(p_val, y_val)}
    say(f"  lexical val acc {team.metrics['val_single'][LEXICAL]:.4f}")
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
        say(f"stage 1: {name}")
        X = raw[name]
        team.stats[name] = standardize_stats(X[fit_idx])
        feats_fit[name], feats_val[name] = team.standardized(name, X[fit_idx]), team.standardized(name, X[val_idx])
        c1 = collab_config(cfg, [name], feats_fit, fusion="concat", proj_dim=0)
        params, info = trainer.fit(c1, {name: feats_fit[name]}, y_fit, {name: feats_val[name]}, y_val, cfg.train)
        team.singles[name] = (c1, params)
        team.metrics["val_single"][name] = info["val_accuracy"]
        say(f"  {name} val acc {info['val_accuracy']:.4f} (epoch {info['best_epoch']})")

    rec = TrainingRecord(fit_idx, val_idx, y_fit, y_val, feats_fit, feats_val, p_val, texts_val, train)
    team.tiers = [None] * len(cfg.experts)
    if len(cfg.experts) > 1:
        say(f"stage 2: {cfg.fusion} fusion over {', '.join(cfg.experts)}")
        full_cfg, full = train_fusion(team, cfg.experts, rec, log=say)
        team.tiers[-1] = (full_cfg, full)
        say("stage 3: cascade tiers distilled from the full fusion")
        teacher = losses.softmax(trainer.logits_of(full_cfg, full, feats_fit), cfg.train.distill_temperature)
        for k in range(1, len(cfg.experts) - 1):
            team.tiers[k] = train_fusion(team, cfg.experts[:k + 1], rec, teacher=teacher, log=say)
    if router and cfg.router_top_k and cfg.encoders:
        say(f"gated mode: a top-{cfg.router_top_k} router fed by the lexical expert")
        team.router = train_router(team, rec, log=say)
    return rec


def evidence(team, feats, lexical_probs, y, texts):
    """The candidates' probabilities and costs on held-apart rows, as composition.compose reads them."""
    cfg = team.cfg
    members = {e: team.member_probs(e, feats, lexical_probs) for e in cfg.experts}
    fused = {k: team.fused_probs(k, feats) for k in range(1, len(cfg.experts)) if team.tiers[k] is not None}
    offsets, _ = team.lexical.bags(texts)
    enc = {e: encoder_row_flops(team.expert(e).config, team.token_lengths(e, texts)) for e in cfg.encoders}
    heads = {f"single:{e}": head_flops(team.singles[e][0]) for e in cfg.encoders}
    heads.update({f"fused:{k}": head_flops(team.tiers[k][0]) for k in fused})
    return composition.Evidence(cfg.experts, np.asarray(y), members, fused, enc,
                                team.lexical.flops(offsets).astype(np.float64), heads, cfg.folds, cfg.seed)


def crossfit_folds(labels, cfg):
    """-> ([(rest, held, inner_fit, inner_val)] for the k folds, None) or (None, why not): every fold team needs
    fit rows of two classes and validation rows of its own, else cross-fitting cannot run."""
    folds = []
    for rest, held in data_lib.kfold(labels, min(cfg.folds, len(labels)), cfg.seed + 7):
        inner_fit, inner_val = split_rows(labels[rest], cfg.val_fraction, cfg.seed)
        if len(held) == 0 or len(inner_val) == 0 or len(np.unique(labels[rest][inner_fit])) < 2:
            return None, (f"{len(labels)} rows are too few for {cfg.folds} fold teams with validation rows "
                          f"of their own")
        folds.append((rest, held, inner_fit, inner_val))
    return folds, None


def crossfit_evidence(team, train, raw, log, folds, fold_extra=None):
    """Small data: every candidate's out-of-fold probabilities over ALL training rows (k fold teams, each
    trained on the other folds with its own inner validation split; folds: crossfit_folds') -> (Evidence on
    len(train) rows, extra).
    fold_extra(fold_team, fold_record, held_feats) -> {name: probabilities [n_held, C]} scores more models
    the same way (experiments use it to cross-fit every fusion row); extra joins them over all rows."""
    cfg = team.cfg
    parts, extras = [], []
    for f, (rest, held, inner_fit, inner_val) in enumerate(folds):
        log(f"cross-fitting: fold {f + 1} of {len(folds)} ({len(rest)} rows train, {len(held)} held)")
        fold = Team(cfg, lexical_tokenizer=team.lexical_tokenizer)
        fold._experts = team._experts  # share the loaded encoders
        fold_rec = train_split(fold, train, rest[inner_fit], rest[inner_val], raw, log=None, router=False)
        held_texts = [train.texts[i] for i in held]
        p_lex = fold.lexical.predict_proba(held_texts)
        feats = {LEXICAL: fold.lexical_features(held_texts, p_lex)}
        feats.update({e: fold.standardized(e, raw[e][held]) for e in cfg.encoders})
        parts.append((held, evidence(fold, feats, p_lex, train.labels[held], held_texts)))
        extras.append(fold_extra(fold, fold_rec, feats) if fold_extra else {})
    order = np.concatenate([h for h, _ in parts])
    inverse = np.argsort(order)
    join = lambda get: np.concatenate([get(ev) for _, ev in parts])[inverse]  # noqa: E731
    first = parts[0][1]
    extra = {name: np.concatenate([x[name] for x in extras])[inverse] for name in extras[0]}
    return composition.Evidence(
        cfg.experts, join(lambda ev: ev.y), {e: join(lambda ev: ev.members[e]) for e in first.members},
        {k: join(lambda ev: ev.fused[k]) for k in first.fused}, {e: join(lambda ev: ev.encoder_flops[e])
                                                                for e in first.encoder_flops},
        join(lambda ev: ev.lexical_flops), first.head_flops, cfg.folds, cfg.seed), extra


def adapt_stage(team, train, fit_idx, val_idx, log, adapt_fn=adapt):
    """Train each encoder named in cfg.adapt on the task (its own head, the fit rows; early stopping on the
    validation rows); the team then reads its features from the adapted encoder. Resumable: step
    checkpoints live in cache/adapt/<expert>-<base sha>/."""
    texts_fit = [train.texts[i] for i in fit_idx]
    texts_val = [train.texts[i] for i in val_idx]
    team.metrics["adapt"] = {}
    for name, settings in team.cfg.adapt.items():
        log(f"adaptation: {name} ({settings.method})")
        base = team.expert(name)
        work = ADAPT_CACHE / f"{Path(name).name}-{base.weights_sha256[:12]}-{settings.method}-{team.cfg.seed}"
        adapted, delta, info = adapt_fn(base, texts_fit, train.labels[fit_idx], texts_val, train.labels[val_idx],
                                     settings, log=log, work_dir=work)
        team._experts[name, False], team.deltas[name] = adapted, delta  # (name, int8) keys, see Team.expert
        team.metrics["adapt"][name] = info


def fit(team, train, log=print, progress=True, fold_extra=None, adapt_fn=adapt):
    """Stages 1-3 and the composition on `train` (a TextDataset) -> the team, with team.training set.
    fold_extra: see crossfit_evidence (only called when the data is small enough to cross-fit); adapt_fn: the
    adaptation step, adaptation.adapt's signature (experiments pass one that keeps each finished one on disk)."""
    cfg = team.cfg
    train, facts = data_lib.clean_training(train)
    for line in facts["notes"]:
        log(f"data: {line}")
    fit_idx, val_idx = split_rows(train.labels, cfg.val_fraction, cfg.seed)
    if len(np.unique(train.labels[fit_idx])) < 2 or len(val_idx) == 0:
        raise data_lib.DataError(f"{len(train)} usable rows are too few to fit and validate on; give more rows "
                                 f"(at least a few per class)")
    team.protocol = dict(train.protocol, n_fit=len(fit_idx), n_val=len(val_idx), cleaning=facts["counts"])
    if cfg.adapt:
        adapt_stage(team, train, fit_idx, val_idx, log, adapt_fn)
    raw = {}
    for name in cfg.encoders:
        log(f"features: {name}")
        raw[name] = team.encoder_features(name, train.texts, split=train.split, progress=progress)
    rec = train_split(team, train, fit_idx, val_idx, raw, log=log)
    team.training = rec
    small = len(train) < cfg.crossfit_below and not cfg.adapt
    folds, why_not = crossfit_folds(train.labels, cfg) if small else (None, None)
    if small and why_not is None:
        log(f"composition: {len(train)} rows < {cfg.crossfit_below}, so every choice is cross-fitted over all rows")
        ev, rec.crossfit_extra = crossfit_evidence(team, train, raw, log, folds, fold_extra)
        rec.crossfit = ev
    else:  # (an adapted encoder has seen every fit row, so out-of-fold rows would not be held apart from it)
        if why_not:  # the stated fallback: too few rows to cross-fit
            log(f"composition: {why_not}, so it is chosen on the {len(val_idx)} validation rows instead")
            team.metrics["crossfit_fallback"] = why_not
        log(f"composition: chosen on the {len(val_idx)} validation rows")
        ev = evidence(team, rec.feats_val, rec.lexical_val, rec.y_val, rec.texts_val)
    comp, record = composition.compose(ev, cfg.tolerance)
    team.composition = composition.fit_stacks(comp, ev)
    team.metrics["composition"] = record
    team.metrics["val_tiers"] = [float(trainer.accuracy(p, rec.y_val))
                                 for p in team.tier_probs(rec.feats_val, rec.lexical_val)]
    log(f"  serving tiers {record['active']} with {record['answers']}: accuracy {record['accuracy']:.4f} "
        f"(cross-fitted estimate {record['estimate']['accuracy']:.4f}) at "
        f"{record['estimate']['gflops_per_sample']:.3f} GFLOPs per text")
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
