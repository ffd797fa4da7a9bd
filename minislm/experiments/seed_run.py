"""One seed of one protocol: train the team, then score every row of the results table on the same test rows.

The seed moves the validation carve-out, data order, initialisation and dropout; the frozen features come
from the cache (minislm.experts.features), so a seed costs only the heads. Every row records its validation
accuracy (the rows choices are made on) beside its test accuracy (never used for a choice), its cost, its
parameters and its test predictions (for the paired statistics). A seed's units (units.py: each adaptation,
then the team and its rows) are files in its run's folder, so an interrupted run resumes at the first
unfinished unit.
With int8=True the table also holds rows of kind "int8": each encoder's single row and the checkpoint's
cascade again, their encoders on int8 weights (int8_rows).
"""
import dataclasses
import time

import numpy as np

from minislm.collab import ensembles, losses, trainer
from minislm.collab.optim import leaves
from minislm.collab.trainer import TrainConfig
from minislm.experiments.stats import macro_f1
from minislm.experiments.units import adapt_tag, kept_adapt
from minislm.experts.registry import EXPERTS
from minislm.team import Team, TeamConfig, cascade
from minislm.team.adaptation import adapt
from minislm.team.composition import Composition, crossfit_stack
from minislm.team.costs import head_flops
from minislm.team.team import LEXICAL, short
from minislm.team.training import collab_config, fit, train_fusion

FUSIONS = ("concat", "mean", "static", "gated", "attention")


def n_params(tree):
    return int(sum(v.size for _, v in leaves(tree)))


def encoder_params(name):
    return int(EXPERTS[name].params_m * 1e6) if name in EXPERTS else 0


class Table:
    """Rows of one seed, each with validation and test accuracy, predictions and costs."""

    def __init__(self, y_val, y_test, n_classes):
        self.y_val, self.y_test, self.C, self.rows = y_val, y_test, n_classes, []

    def add(self, name, kind, val_accuracy, test_probs_or_preds, gflops, params, seconds=0.0, **extra):
        p = np.asarray(test_probs_or_preds)
        preds = p.argmax(1) if p.ndim == 2 else p
        self.rows.append({"name": name, "kind": kind, "val_accuracy": float(val_accuracy),
                          "accuracy": float((preds == self.y_test).mean()),
                          "macro_f1": macro_f1(self.y_test, preds, self.C), "gflops_per_sample": float(gflops),
                          "params": int(params), "train_seconds": round(float(seconds), 1),
                          "preds": preds.astype(int).tolist(), **extra})
        return self.rows[-1]

    def val_acc(self, probs):
        return float((probs.argmax(1) == self.y_val).mean())


def label(cfg, e):
    """A member's short name in row names; an adapted encoder carries its method ("top2-L6")."""
    return f"{adapt_tag(cfg.adapt[e])}-{short(e)}" if e in cfg.adapt else short(e)


def set_tag(cfg, experts):
    return "+".join(label(cfg, e) for e in experts)


def fusion_rows(cfg):
    """-> [(row name, fusion, experts)]: every learned fusion over the encoders alone and with the lexical expert."""
    out = []
    for experts in (list(cfg.encoders), list(cfg.experts)):
        if len(experts) >= 2:
            tag = set_tag(cfg, experts)
            out += [(f"{fusion}/{tag}", fusion, experts) for fusion in FUSIONS]
    return out


def crossfit_fusions(cfg):
    """The fold hook of training.fit: each fold team also trains every fusion row and scores its held rows, so
    on small data the fusion rows' validation accuracy is out-of-fold over every training row, like the
    members' and the composition's."""
    def extra(fold, fold_rec, held_feats):
        out = {}
        for name, fusion, experts in fusion_rows(cfg):
            if fusion == cfg.fusion and experts == list(cfg.experts):
                c, p = fold.tiers[-1]
            else:
                c, p = train_fusion(fold, experts, fold_rec, fusion=fusion)
            out[name] = losses.softmax(trainer.logits_of(c, p, {e: held_feats[e] for e in experts}))
        return out
    return extra


def crossfit_validation(tab, rec, comp, cfg):
    """Small data: replace the validation accuracy of every row that can be cross-fitted by its out-of-fold
    accuracy over all training rows (kept as `val_accuracy_split` before); the rows that cannot (threshold
    cascades chosen on the split, the router, ablations, baselines) are marked not selectable, so the
    validation-chosen rows are compared on one footing."""
    ev, extra = rec.crossfit, rec.crossfit_extra
    acc = lambda p: float((p.argmax(1) == ev.y).mean())  # noqa: E731
    scores = {e: acc(p) for e, p in ev.members.items()}
    scores.update({name: acc(p) for name, p in extra.items()})
    for experts in (list(cfg.encoders), list(cfg.experts)):
        if len(experts) >= 2:
            tag = set_tag(cfg, experts)
            scores[f"prob-average/{tag}"] = acc(ensembles.average(np.stack([ev.members[e] for e in experts], 1)))
            scores[f"stacking/{tag}"] = acc(ev.stack_probs(experts))
    scores["cascade/checkpoint"] = comp.record["estimate"]["accuracy"]
    basis = f"out-of-fold over all {len(ev.y)} training rows ({cfg.folds} folds)"
    for row in tab.rows:
        row["val_accuracy_split"] = row["val_accuracy"]
        if row["name"] in scores:
            row.update(val_accuracy=scores[row["name"]], val_basis=basis)
        else:
            row.update(val_basis=f"the {len(rec.y_val)}-row validation split", selectable=False)


def run_seed(protocol, train, test, seed, quick=False, log=print, search_trials=0, int8=False, units_dir=None,
             fresh=False, **config):
    """-> (dict with the seed's rows and records, the trained team). config: more TeamConfig fields; int8: also
    the int8 rows; units_dir: where each finished adaptation is kept as a unit (units.py) and found again
    (fresh: never found)."""
    t0 = time.time()
    tc = TrainConfig(seed=seed, epochs=3 if quick else TrainConfig.epochs)
    if config.get("adapt"):  # the seed moves the adaptation's data order and initialisation too
        config["adapt"] = {e: dataclasses.replace(s, seed=seed) for e, s in config["adapt"].items()}
    cfg = TeamConfig(**{"dataset": train.name, "label_names": train.label_names, "train": tc, "seed": seed, **config})
    adapt_fn = kept_adapt(units_dir, fresh, log) if units_dir is not None else adapt
    team = fit(Team(cfg), train, log=log, fold_extra=crossfit_fusions(cfg), adapt_fn=adapt_fn)
    fit_seconds = time.time() - t0
    rec = team.training
    y_test = test.labels
    tab = Table(rec.y_val, y_test, len(cfg.label_names))

    log("test features")
    p_lex_test = team.lexical.predict_proba(test.texts)
    feats_test = {LEXICAL: team.lexical_features(test.texts, p_lex_test)}
    for name in cfg.encoders:
        feats_test[name] = team.standardized(name, team.encoder_features(name, test.texts, split=test.split))
    offsets, _ = team.lexical.bags(test.texts)
    lex_flops = team.lexical.flops(offsets).astype(np.float64)
    from minislm.team.costs import encoder_row_flops
    enc_flops = {e: encoder_row_flops(team.expert(e).config, team.token_lengths(e, test.texts)) for e in cfg.encoders}
    lex_params = n_params(team.lexical.params)
    all_encoders = float(np.mean(sum(enc_flops.values())))

    # ---- single experts ----------------------------------------------------------------------------------
    tab.add(LEXICAL, "single", team.metrics["val_single"][LEXICAL], p_lex_test, lex_flops.mean() / 1e9, lex_params)
    probs_val, probs_test = {LEXICAL: rec.lexical_val}, {LEXICAL: p_lex_test}
    for name in cfg.encoders:
        c, p = team.singles[name]
        probs_val[name] = team.member_probs(name, rec.feats_val, rec.lexical_val)
        probs_test[name] = team.member_probs(name, feats_test, p_lex_test)
        extra = {}
        if name in cfg.adapt:  # compared with the frozen single row of the same expert (the run without --adapt)
            info = team.metrics["adapt"][name]
            extra = dict(expert=name, method=info["method"], trainable_params=int(info["trainable_params"]),
                         adapt_seconds=round(float(info["train_seconds"]), 1), adapt_steps=int(info["steps"]),
                         adapt_val_accuracy=float(info["val_accuracy"]), settings=dataclasses.asdict(cfg.adapt[name]))
        tab.add(f"{adapt_tag(cfg.adapt[name])}/{name}" if name in cfg.adapt else name,
                "adapted" if name in cfg.adapt else "single", tab.val_acc(probs_val[name]), probs_test[name],
                (enc_flops[name].mean() + head_flops(c)) / 1e9, encoder_params(name) + n_params(p),
                extra.get("adapt_seconds", 0.0), **extra)

    # ---- fusions, probability averages and stacking over the encoders alone and with the lexical expert -----
    def cost_of(experts):
        return sum(enc_flops[e].mean() for e in experts if e != LEXICAL) + (lex_flops.mean() if LEXICAL in experts else 0)

    def params_of(experts):
        return sum(encoder_params(e) for e in experts) + (lex_params if LEXICAL in experts else 0)

    for name, fusion, experts in fusion_rows(cfg):
        t = time.time()
        if fusion == cfg.fusion and experts == list(cfg.experts):
            c, p = team.tiers[-1]
        else:
            c, p = train_fusion(team, experts, rec, fusion=fusion, log=log)
        val = losses.softmax(trainer.logits_of(c, p, {e: rec.feats_val[e] for e in experts}))
        test_p = losses.softmax(trainer.logits_of(c, p, {e: feats_test[e] for e in experts}))
        tab.add(name, "fusion", tab.val_acc(val), test_p, (cost_of(experts) + head_flops(c)) / 1e9,
                params_of(experts) + n_params(p), time.time() - t)
    for experts in (list(cfg.encoders), list(cfg.experts)):
        if len(experts) < 2:
            continue
        tag = set_tag(cfg, experts)
        Pv = np.stack([probs_val[e] for e in experts], axis=1)
        Pt = np.stack([probs_test[e] for e in experts], axis=1)
        tab.add(f"prob-average/{tag}", "fusion", tab.val_acc(ensembles.average(Pv)), ensembles.average(Pt),
                cost_of(experts) / 1e9, params_of(experts))
        # stacking trains on the validation rows (the members' own training rows would flatter them); its own
        # validation score is cross-fitted over those rows
        st = ensembles.stacking_fit(Pv, rec.y_val, seed=seed)
        tab.add(f"stacking/{tag}", "fusion", tab.val_acc(crossfit_stack(Pv, rec.y_val, cfg.folds, seed)),
                ensembles.stacking_predict(st, Pt), cost_of(experts) / 1e9, params_of(experts) + n_params(st))

    # ---- the cascade the checkpoint serves, and others chosen on validation --------------------------------
    comp = team.composition
    tier_test = team.tier_probs(feats_test, p_lex_test)
    flops_test = team.tier_flops(test.texts)
    exit_tier, preds, cost = cascade.simulate(tier_test, comp.thresholds, flops_test)
    share = (np.bincount(exit_tier, minlength=len(tier_test)) / len(y_test)).tolist()
    tab.add("cascade/checkpoint", "cascade", comp.record["accuracy"], preds, cost.mean() / 1e9,
            params_of(list(cfg.experts)), fit_seconds, checkpoint=True, active_tiers=comp.active,
            answers=comp.record["answers"], exit_share=share, thresholds=comp.thresholds,
            flops_vs_all_three=float(cost.mean() / all_encoders), estimate=comp.record["estimate"])
    tier_val = team.tier_probs(rec.feats_val, rec.lexical_val)
    flops_val = team.tier_flops(rec.texts_val)
    points = cascade.curve(tier_val, rec.y_val, flops_val)
    val_all = float(np.mean(flops_val[-1]))
    for budget in (0.10, 0.20):
        pick = cascade.choose(points, flop_budget=budget * val_all)
        exit_tier, preds, cost = cascade.simulate(tier_test, pick["thresholds"], flops_test)
        tab.add(f"cascade/budget={int(100 * budget)}%", "cascade", pick["accuracy"], preds, cost.mean() / 1e9,
                params_of(list(cfg.experts)), thresholds=pick["thresholds"],
                flops_vs_all_three=float(cost.mean() / all_encoders))
    classic = Composition.every_tier_fused(len(cfg.experts), [])
    saved, team.composition = team.composition, classic
    tv, fv = team.tier_probs(rec.feats_val, rec.lexical_val), team.tier_flops(rec.texts_val)
    classic.thresholds, pick = cascade.choose_thresholds(tv, rec.y_val, fv)
    exit_tier, preds, cost = cascade.simulate(team.tier_probs(feats_test, p_lex_test), classic.thresholds,
                                              team.tier_flops(test.texts))
    team.composition = saved
    tab.add("cascade/every-tier-fused", "cascade", pick["accuracy"], preds, cost.mean() / 1e9,
            params_of(list(cfg.experts)), thresholds=classic.thresholds,
            flops_vs_all_three=float(cost.mean() / all_encoders))
    if team.router is not None:
        from minislm.collab import model as collab
        c, p = team.router
        pr = losses.softmax(trainer.logits_of(c, p, feats_test))
        chosen = collab.gate_only(c, p, {LEXICAL: feats_test[LEXICAL]}) > 0
        cost = team.router_flops(chosen, test.texts)
        tab.add(f"router/top-{c.top_k}", "cascade", team.metrics.get("val_router", float("nan")), pr,
                cost.mean() / 1e9, params_of(list(cfg.experts)) + n_params(p),
                run_share=dict(zip([short(e) for e in c.experts], chosen.mean(axis=0).tolist())))

    if int8:
        int8_rows(team, rec, test, tab, feats_test, p_lex_test, flops_test, log)
    if cfg.adapt:  # the run without --adapt holds the ablations and baselines; cascade rows name the adaptation
        suffix = f" ({', '.join(label(cfg, e) for e in cfg.adapt)})"
        for row in tab.rows:
            if row["kind"] == "cascade":
                row["name"] += suffix
                if row.pop("checkpoint", False):
                    row["checkpoint_of_adapted_team"] = True
    else:
        ablations(team, rec, feats_test, tab, enc_flops, log)
        baselines(team, rec, test, tab, enc_flops, log)
    if rec.crossfit is not None:
        crossfit_validation(tab, rec, comp, cfg)
    trials = search(team, rec, search_trials, seed, log) if search_trials else []
    return {"seed": seed, "rows": tab.rows, "composition": comp.record, "validation": team.metrics,
            "search": trials, "seconds": round(time.time() - t0, 1), "fit_seconds": round(fit_seconds, 1)}, team


def int8_rows(team, rec, test, tab, feats_test, p_lex_test, flops_test, log):
    """Each encoder's single row and the checkpoint's cascade again, with the encoders on int8 weights
    (Team.use_int8: int8 folders, else quantized in memory) and everything else as trained: the heads read the
    int8 features as they read float32 ones, as ONNX Runtime's dynamic quantization would serve them. GFLOPs
    count the int8 multiply-adds like float32 ones; `agreement` is the share of test rows answered as the
    float32 row answers them."""
    cfg, comp = team.cfg, team.composition
    by_name = {r["name"]: r for r in tab.rows}
    feats_val8, feats_test8 = dict(rec.feats_val), dict(feats_test)
    team.use_int8(log=lambda m: log("  int8 " + m))
    try:
        for name in cfg.encoders:
            feats_test8[name] = team.standardized(name, team.encoder_features(name, test.texts, split=test.split))
            feats_val8[name] = team.standardized(name, team.encoder_features(name, rec.texts_val, split="val"))
    finally:
        team.use_int8(False)

    def add(name, float32_row, val_accuracy, preds, **extra):
        ref = by_name[float32_row]
        row = tab.add(name, "int8", val_accuracy, preds, ref["gflops_per_sample"], ref["params"],
                      float32_row=float32_row, **extra)
        row["agreement"] = float(np.mean(np.asarray(row["preds"]) == np.asarray(ref["preds"])))
        log(f"  {name}: test {row['accuracy']:.4f} (float32 {ref['accuracy']:.4f}), agreement {row['agreement']:.4f}")

    for name in cfg.encoders:
        add(f"int8/{name}", name, tab.val_acc(team.member_probs(name, feats_val8, rec.lexical_val)),
            team.member_probs(name, feats_test8, p_lex_test))
    _, preds_val, _ = cascade.simulate(team.tier_probs(feats_val8, rec.lexical_val), comp.thresholds,
                                       team.tier_flops(rec.texts_val))
    exit_tier, preds, _ = cascade.simulate(team.tier_probs(feats_test8, p_lex_test), comp.thresholds, flops_test)
    add("int8/cascade/checkpoint", "cascade/checkpoint", float(np.mean(preds_val == rec.y_val)), preds,
        exit_share=(np.bincount(exit_tier, minlength=len(comp.active)) / len(tab.y_test)).tolist())


def single_head(team, rec, name, select, tag):
    """A stage-1 head on a slice of an encoder's pooled features: select(X [B, L+1, 2H]) -> [B, L', K]."""
    fit_f, val_f = {name: select(rec.feats_fit[name])}, {name: select(rec.feats_val[name])}
    c = collab_config(team.cfg, [name], fit_f, fusion="concat", proj_dim=0)
    params, info = trainer.fit(c, fit_f, rec.y_fit, val_f, rec.y_val, team.cfg.train)
    return c, params, info["val_accuracy"]


def ablations(team, rec, feats_test, tab, enc_flops, log):
    """Rows that isolate one idea each; `pair` names the row each is compared with."""
    cfg = team.cfg
    for name in cfg.encoders:
        H = team.expert(name).config.hidden
        variants = {"last-layer": lambda X: np.ascontiguousarray(X[:, -1:, :]),       # no layered integration
                    "mean-only": lambda X, H=H: np.ascontiguousarray(X[:, :, :H]),
                    "cls-only": lambda X, H=H: np.ascontiguousarray(X[:, :, H:])}
        for tag, select in variants.items():
            c, p, val = single_head(team, rec, name, select, tag)
            pr = losses.softmax(trainer.logits_of(c, p, {name: select(feats_test[name])}))
            tab.add(f"ablation/{tag}/{name}", "ablation", val, pr, (enc_flops[name].mean() + head_flops(c)) / 1e9,
                    encoder_params(name) + n_params(p), pair=name)
            log(f"  ablation {tag}/{short(name)}: val {val:.4f}")
    if len(cfg.experts) > 2:  # distilled vs independently trained cascade tier (the one before the last)
        k = len(cfg.experts) - 2
        experts = cfg.experts[:k + 1]
        tag = "+".join(short(e) for e in experts)
        for kind, (c, p) in (("distilled", team.tiers[k]), ("independent", train_fusion(team, experts, rec))):
            val = losses.softmax(trainer.logits_of(c, p, {e: rec.feats_val[e] for e in experts}))
            test_p = losses.softmax(trainer.logits_of(c, p, {e: feats_test[e] for e in experts}))
            cost = sum(enc_flops[e].mean() for e in experts if e != LEXICAL)
            tab.add(f"ablation/tier{k}-{kind}/{tag}", "ablation", tab.val_acc(val), test_p,
                    (cost + head_flops(c)) / 1e9, n_params(p),
                    pair=None if kind == "distilled" else f"ablation/tier{k}-distilled/{tag}")


def baselines(team, rec, test, tab, enc_flops, log):
    """tfidf-lr and lr-last-layer/<encoder> with scikit-learn (the `bench` extra), on the team's own rows: C
    chosen on the team's validation split, then refit on every training row."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        log("baselines skipped: scikit-learn is not installed (pip install -e '.[bench]')")
        return
    train = rec.dataset
    C = len(train.label_names)

    def tuned(Xtr, Xte, grid):
        scores = {c: LogisticRegression(C=c, max_iter=2000).fit(Xtr[rec.fit_idx], train.labels[rec.fit_idx])
                  .score(Xtr[rec.val_idx], train.labels[rec.val_idx]) for c in grid}
        best = max(grid, key=lambda c: scores[c])
        return LogisticRegression(C=best, max_iter=2000).fit(Xtr, train.labels).predict(Xte), best, scores[best]

    for name in team.cfg.encoders:
        H = team.expert(name).config.hidden
        Xtr = team.encoder_features(name, train.texts, split=train.split)[:, -1, :H]  # last layer, mean
        Xte = team.encoder_features(name, test.texts, split=test.split)[:, -1, :H]
        preds, c, val = tuned(Xtr, Xte, [0.1, 1.0, 10.0])
        tab.add(f"lr-last-layer/{name}", "baseline", val, preds, (enc_flops[name].mean() + 2 * H * C) / 1e9,
                encoder_params(name) + (H + 1) * C, C_chosen=c)
    t = time.time()
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    Xtr, Xte = vec.fit_transform(train.texts), vec.transform(test.texts)
    preds, c, val = tuned(Xtr, Xte, [1.0, 10.0, 100.0])
    nnz = Xte.getnnz(axis=1).mean()
    tab.add("tfidf-lr", "baseline", val, preds, (2 * nnz * C + 4 * nnz) / 1e9, (Xtr.shape[1] + 1) * C,
            time.time() - t, C_chosen=c)
    log(f"  tfidf-lr: {tab.rows[-1]['accuracy']:.4f}")


def search(team, rec, trials, seed, log):
    """A small seeded random search (thesis 3-2-4) over the full fusion's head settings, scored on the
    validation rows -> list of trials (settings, val accuracy), the default first."""
    import dataclasses

    rng = np.random.default_rng(1000 + seed)
    cfg = team.cfg
    out = []
    for i in range(trials + 1):
        s = {"lr": cfg.train.lr, "dropout": cfg.dropout, "head_hidden": cfg.head_hidden,
             "weight_decay": cfg.train.weight_decay} if i == 0 else {
            "lr": float(10 ** rng.uniform(-3.5, -2.5)), "dropout": float(rng.choice([0.0, 0.1, 0.3])),
            "head_hidden": int(rng.choice([0, 128, 256, 512])), "weight_decay": float(rng.choice([0.0, 0.01, 0.05]))}
        trial_cfg = dataclasses.replace(cfg, dropout=s["dropout"], head_hidden=s["head_hidden"],
                                        train=dataclasses.replace(cfg.train, lr=s["lr"], weight_decay=s["weight_decay"]))
        saved, team.cfg = team.cfg, trial_cfg
        try:
            c, p = train_fusion(team, cfg.experts, rec)
        finally:
            team.cfg = saved
        val = float((trainer.logits_of(c, p, rec.feats_val).argmax(1) == rec.y_val).mean())
        out.append({"settings": s, "val_accuracy": val, "default": i == 0})
        log(f"  search trial {i}: {s} val {val:.4f}")
    return out

