"""The trained team at inference: a lexical expert and pretrained encoders, their heads, fusion and cascade.

    texts -> lexical expert (tier 0) -> confident? answer
          -> encoder 1 pooled + standardised -> tier 1's fused head over {lexical, encoder 1} -> confident? ...
          -> ... -> the last tier answers every row still open

Training lives beside it (training.py: `train_team`); the checkpoint format (checkpoint.py) knows only arrays
and JSON, and the team assembles itself from them here (`to_state` / `from_state`).
"""
import time
from pathlib import Path

import numpy as np

from minislm.collab import losses, trainer
from minislm.collab import model as collab
from minislm.collab.model import CollabConfig
from minislm.encoder.tokenizer import Tokenizer
from minislm.experts import features as features_lib
from minislm.experts import quantized, registry
from minislm.experts.lexical import LexicalModel
from minislm.experts.load import load_expert
from minislm.flops import FlopLedger
from minislm.collab import ensembles
from minislm.team import cascade, checkpoint
from minislm.team.composition import Composition, stack_flops
from minislm.team.adaptation import load_delta
from minislm.team.checkpoint import CheckpointError
from minislm.team.config import TeamConfig
from minislm.team.costs import encoder_row_flops, head_flops

LEXICAL = registry.LEXICAL


def lexical_logprob(probs):
    """[B, C] probabilities -> [B, 1, C] log-probabilities, the lexical expert's features."""
    return np.log(np.clip(probs, 1e-6, 1.0)).astype(np.float32)[:, None, :]


def short(name):
    """A short display name of an expert."""
    return {"paraphrase-MiniLM-L3-v2": "L3", "all-MiniLM-L6-v2": "L6", "all-mpnet-base-v2": "MPNet"}.get(name, name)


class Team:
    def __init__(self, cfg, lexical_tokenizer=registry.LEXICAL_TOKENIZER):
        self.cfg = cfg                  # TeamConfig
        self.lexical = None             # LexicalModel
        self.lexical_tokenizer = lexical_tokenizer  # expert name (or folder) whose tokenizer.json it reads
        self.stats = {}                 # expert -> (mean, std) of its pooled features
        self.singles = {}               # expert -> (CollabConfig, params): stage 1
        self.tiers = []                 # tier k -> (CollabConfig, params) over experts[:k+1]; tier 0 = lexical
        self.composition = None         # Composition: which tiers run, what each answers, where rows stop
        self.router = None              # (CollabConfig, params): gated mode, a top-k gate fed by the lexical expert
        self.metrics = {}               # validation numbers recorded during training
        self.protocol = {}              # what the team was trained on
        self.expected_sha256 = {}       # expert -> sha256 of the base weights the team was trained on
        self.deltas = {}                # expert -> (arrays, meta): what adaptation changed in it (adaptation.py)
        self.command = None             # the command that trained it
        self.training = None            # training.TrainingRecord of a team trained in this process (never saved)
        self.int8 = False               # run the encoders on int8 weights (use_int8); the heads stay as trained
        self.log = None                 # where use_int8 says how each int8 encoder was obtained
        self._experts = {}              # (name, int8) -> loaded Expert

    # ---- experts and features ------------------------------------------------------------------------
    def required_experts(self):
        """Registry names this team needs on disk: its encoders and the lexical expert's tokenizer."""
        names = [*self.cfg.encoders, self.lexical_tokenizer]
        return [n for n in dict.fromkeys(names) if n in registry.EXPERTS]

    @staticmethod
    def experts_needed(folder):
        """Registry names a checkpoint folder needs on disk, read from its team.json alone (so a CLI can fetch
        them before loading)."""
        meta = checkpoint.read_meta(folder)
        try:
            names = [*meta["config"]["experts"], meta["lexical"]["tokenizer"]]
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{folder}: team.json does not describe a usable team (missing key {e}); the "
                                  f"checkpoint is damaged or from another version: train it again") from e
        return [n for n in dict.fromkeys(names) if isinstance(n, str) and n in registry.EXPERTS]

    def use_int8(self, on=True, log=None):
        """Run every encoder on int8 weights from now on (on=False: float32 again), as ONNX Runtime's dynamic
        quantization would: the heads, trained on float32 features, read the int8 encoders' features unchanged.
        Each expert comes from its int8 folder (`python -m minislm.weights quantize`) when there is one, else
        it is quantized in memory; log(message) says which."""
        self.int8, self.log = bool(on), log

    def expert(self, name):
        """The loaded encoder `name`, checked to be the weights this team was trained with (int8 after use_int8)."""
        key = (name, self.int8)
        if key not in self._experts:
            want = self.expected_sha256.get(name)
            e = quantized.saved_int8(name, want) if self.int8 and name not in self.deltas else None
            if e is not None:
                self._say(f"{short(name)}: int8 weights from {e.folder}")
            elif not self.int8:
                e = self._float32_expert(name)
            else:  # no int8 folder (an adapted expert, a folder of one's own, or not quantized yet): make it now
                t = time.perf_counter()
                e = quantized.int8_of(self._float32_expert(name))
                how = ("adapted weights have no int8 folder" if name in self.deltas else
                       f"`{registry.QUANTIZE_COMMAND} {name}` saves it" if name in registry.EXPERTS else
                       "a folder's own model")
                self._say(f"{short(name)}: quantized to int8 in memory ({time.perf_counter() - t:.2f} s; {how})")
            self._experts[key] = e
        return self._experts[key]

    def _say(self, message):
        if self.log is not None:
            self.log(message)

    def _float32_expert(self, name):
        """The float32 encoder `name` (adapted when the team holds a delta for it), checked."""
        if (name, False) in self._experts:
            return self._experts[name, False]
        e = load_expert(name)
        want = self.expected_sha256.get(name)
        if want and e.weights_sha256 != want and e.rehash() != want:  # re-hash: never trust a stale record
            raise CheckpointError(f"this team was trained on {name} weights with sha256 {want[:12]}..., but "
                                  f"{e.folder} holds {e.weights_sha256[:12]}...; train a new team for these "
                                  f"weights or fetch the original ones (`{registry.FETCH_COMMAND}`)")
        if name in self.deltas:  # an adapted expert: the stored change, merged onto its checked base
            e = load_delta(e, *self.deltas[name])
        return e

    def base_sha256(self, name):
        """sha256 of the pretrained weights under expert `name` (before any adaptation)."""
        if name in self.deltas:
            return self.deltas[name][1]["base_sha256"]
        e = self.expert(name)
        return e.source_sha256 or e.weights_sha256  # an int8 expert: the float32 weights it came from

    def tokenizer(self):
        """The WordPiece tokenizer the lexical expert reads."""
        name = self.lexical_tokenizer
        folder = registry.expert_dir(name) if name in registry.EXPERTS else Path(name)
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

    def lexical_features(self, texts, probs):
        """The standardised lexical features the fusion reads: [B, 1, C] log-probabilities (probs [B, C] of
        these texts), or [B, 1, D] bags when the team was trained with lexical_features="bag"."""
        raw = self.lexical.bag(texts)[:, None, :] if self.cfg.lexical_features == "bag" else lexical_logprob(probs)
        return self.standardized(LEXICAL, raw)

    def token_lengths(self, name, texts):
        """[B] tokens per text as expert `name` reads them (truncated to max_len)."""
        rows = self.expert(name).tokenizer.encode(texts, self.cfg.max_len)
        return np.array([len(r) for r in rows], dtype=np.int64)

    @property
    def thresholds(self):
        """Confidence needed to stop at each active tier but the last."""
        return self.composition.thresholds

    # ---- what each tier answers ------------------------------------------------------------------------
    def member_probs(self, name, feats, lexical_probs):
        """Member `name`'s own probabilities [B, C] (its stage-1 model) on precomputed features."""
        if name == LEXICAL:
            return lexical_probs
        c, p = self.singles[name]
        return losses.softmax(trainer.logits_of(c, p, {name: feats[name]}))

    def fused_probs(self, k, feats):
        """Tier k's trained collaboration's probabilities [B, C]."""
        c, p = self.tiers[k]
        return losses.softmax(trainer.logits_of(c, p, {e: feats[e] for e in c.experts}))

    def answer_probs(self, k, feats, lexical_probs):
        """What active tier k serves [B, C]: a member alone, the stack of members, or the fused head."""
        a = self.composition.answers[k]
        if a.kind == "single":
            return self.member_probs(a.experts[0], feats, lexical_probs)
        if a.kind == "stack":
            P = np.stack([self.member_probs(e, feats, lexical_probs) for e in a.experts], axis=1)
            return ensembles.stacking_predict(self.composition.stacks[k], P)
        return self.fused_probs(k, feats)

    def answer_flops(self, k):
        """FLOPs per row of active tier k's answer, beyond running its encoder."""
        a = self.composition.answers[k]
        members = lambda ex: sum(head_flops(self.singles[e][0]) for e in ex if e != LEXICAL)  # noqa: E731
        if a.kind == "single":
            return members(a.experts)
        if a.kind == "stack":
            return members(a.experts) + stack_flops(len(a.experts), len(self.cfg.label_names))
        return head_flops(self.tiers[k][0])

    # ---- every active tier at once (experiments, threshold search) -----------------------------------
    def tier_probs(self, feats, lexical_probs):
        """Every active tier's answer [B, C] on precomputed features: a list, one entry per active tier."""
        return [self.answer_probs(k, feats, lexical_probs) for k in self.composition.active]

    def tier_flops(self, texts):
        """Cumulative FLOPs per row of answering at each active tier -> list over active tiers of [B].

        Reaching tier k means running the lexical expert, the encoders of the active tiers up to k on the row's
        real tokens (pooling and standardising every layer), and the answer of every active tier on the way
        (each one decides whether to stop)."""
        offsets, _ = self.lexical.bags(texts)
        cost = self.lexical.flops(offsets).astype(np.float64)
        out = []
        for k in self.composition.active:
            if k > 0:
                name = self.cfg.experts[k]
                cost = cost + encoder_row_flops(self.expert(name).config, self.token_lengths(name, texts))
            cost = cost + self.answer_flops(k)
            out.append(cost)
        return out

    # ---- the cascade -----------------------------------------------------------------------------------
    def _check_request(self, texts, max_tier, max_flops, thresholds=None):
        if isinstance(texts, str) or not hasattr(texts, "__len__") or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of strings; wrap a single text as [text]")
        for i, t in enumerate(texts):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:  # lone surrogates, e.g. bytes decoded with errors="surrogateescape"
                raise ValueError(f"text {i} is not valid Unicode (character {e.start} is a lone surrogate); "
                                 f"decode the input as UTF-8") from e
        last = len(self.cfg.experts) - 1
        if max_tier is not None and (isinstance(max_tier, bool) or not isinstance(max_tier, (int, np.integer))
                                     or not 0 <= max_tier <= last):
            raise ValueError(f"max_tier must be a whole number from 0 to {last} (this team's tiers: "
                             f"{', '.join(f'{k} {short(e)}' for k, e in enumerate(self.cfg.experts))}), got {max_tier!r}")
        number = (int, float, np.number)
        if max_flops is not None and (isinstance(max_flops, bool) or not isinstance(max_flops, number)
                                      or not (np.isfinite(max_flops) and max_flops > 0)):
            raise ValueError(f"max_flops must be a positive number of FLOPs per text, got {max_flops!r}")
        n = len(self.composition.active) - 1
        if thresholds is not None and (len(thresholds) != n or not all(
                isinstance(t, number) and np.isfinite(t) for t in thresholds)):
            raise ValueError(f"thresholds must be {n} finite numbers, one per active tier but the last (active "
                             f"tiers: {self.composition.active}), got {list(thresholds)!r}")
        return last if max_tier is None else int(max_tier)

    def predict_proba(self, texts, max_tier=None, max_flops=None, thresholds=None, kind="max_prob",
                      explain=False):
        """B texts -> (probabilities [B, C], info) through the cascade, batched: rows that exit leave the batch.

        Only the composition's active tiers run. max_tier caps the tiers run (tier numbers count every expert,
        0 = lexical); max_flops caps each row's cost (a row stops before a tier that would exceed it);
        thresholds override the checkpoint's (one per active tier but the last). info: exit_tier [B],
        flops [B] (per row, real tokens), experts [B] (names run), reason [B], ledger (FLOPs by part), and
        with explain, per-row gate / fusion attention weights of the answering tier.
        """
        cfg, comp = self.cfg, self.composition
        last = self._check_request(texts, max_tier, max_flops, thresholds)
        active = [k for k in comp.active if k <= last]
        thresholds = list(comp.thresholds if thresholds is None else thresholds)
        B, C = len(texts), len(cfg.label_names)
        probs = np.zeros((B, C), dtype=np.float32)
        exit_tier = np.full(B, -1)
        reason, details = [""] * B, [None] * B
        ledger = FlopLedger(B)
        if B == 0:
            return probs, {"exit_tier": exit_tier, "flops": ledger.per_row, "experts": [], "reason": [],
                           "ledger": ledger.by_part}
        offsets, _ = self.lexical.bags(texts)
        p_lex = self.lexical.predict_proba(texts)
        ledger.add(LEXICAL, np.arange(B), self.lexical.flops(offsets))
        feats = {LEXICAL: self.lexical_features(texts, p_lex)} if LEXICAL in self.stats else {}
        open_rows = np.arange(B)
        for j, k in enumerate(active):
            step = np.full(len(open_rows), float(self.answer_flops(k)))
            if k > 0:
                name = cfg.experts[k]
                e = self.expert(name)
                token_rows = e.tokenizer.encode([texts[i] for i in open_rows], cfg.max_len)  # once per tier
                step += encoder_row_flops(e.config, np.array([len(r) for r in token_rows], dtype=np.int64))
                if max_flops is not None:  # rows that cannot afford this tier answer with the last one
                    over = ledger.per_row[open_rows] + step > max_flops
                    for r in open_rows[over]:
                        exit_tier[r] = active[j - 1]
                        reason[r] = f"the next tier would exceed --max-flops {max_flops:.3g}"
                    step, open_rows = step[~over], open_rows[~over]
                    token_rows = [row for row, dropped in zip(token_rows, over) if not dropped]
                    if len(open_rows) == 0:
                        break
                X = features_lib.pooled_features(e, None, cfg.max_len, rows=token_rows)
                full = np.zeros((B,) + X.shape[1:], dtype=np.float32)
                full[open_rows] = self.standardized(name, X)
                feats[name] = full
            ledger.add(cfg.experts[k] if k > 0 else f"{LEXICAL}/answer", open_rows, step)
            sub = {x: v[open_rows] for x, v in feats.items()}
            p_open = self.answer_probs(k, sub, p_lex[open_rows])
            ex = None
            if explain and comp.answers[k].kind == "fused":
                c, params = self.tiers[k]
                ex = collab.explain(c, params, collab.forward(c, params, {x: sub[x] for x in c.experts})[1])
            probs[open_rows] = p_open
            conf = cascade.confidence(p_open, kind)
            final = j == len(active) - 1
            done = np.ones(len(open_rows), dtype=bool) if final else conf >= thresholds[j]
            for i in np.flatnonzero(done):
                r = open_rows[i]
                exit_tier[r] = k
                reason[r] = ("the last tier allowed answers every row it gets" if final
                             else f"confidence {conf[i]:.3f} >= threshold {thresholds[j]:.3f}")
                if explain:
                    details[r] = {"tier": k, "answer": comp.answers[k].name} if ex is None else {
                        "tier": k, "answer": "fused", "layer_weights": ex["layer_weights"],
                        **{key: ex[key][i].tolist() for key in ("gate", "attention") if key in ex}}
            open_rows = open_rows[~done]
            if len(open_rows) == 0:
                break
        if not np.isfinite(probs).all():
            raise FloatingPointError("the team produced non-finite probabilities; its checkpoint or the expert "
                                     "weights are damaged: run `python -m minislm.weights verify` and retrain")
        info = {"exit_tier": exit_tier, "flops": ledger.per_row.copy(), "reason": reason,
                "experts": [[cfg.experts[a] for a in active if a <= t] for t in exit_tier],
                "ledger": ledger.by_part}
        if explain:
            info["explain"] = details
        return probs, info

    def predict(self, texts, **kw):
        """B texts -> B label names (through the cascade)."""
        probs, _ = self.predict_proba(texts, **kw)
        return [self.cfg.label_names[i] for i in probs.argmax(axis=1)]

    # ---- one model alone, outside the cascade --------------------------------------------------------------
    def alone_experts(self, answer):
        """The experts `answer` reads, in tier order: "single:<expert>" a member's own model, "fused" the last
        tier's fused head over every expert."""
        fused = self.tiers[-1] if self.tiers else None
        kind, _, member = answer.partition(":") if isinstance(answer, str) else ("", "", "")
        if kind == "single" and (member == LEXICAL or member in self.singles):
            return [member]
        if answer == "fused" and fused is not None:
            return list(fused[0].experts)
        can = [f"single:{e}" for e in self.cfg.experts if e == LEXICAL or e in self.singles]
        raise ValueError(f"this team cannot serve {answer!r} alone; it can serve "
                         f"{', '.join(can + (['fused'] if fused is not None else []))}")

    def predict_alone(self, texts, answer):
        """B texts -> (probabilities [B, C], info) from one of the team's models alone, no cascade: every row
        runs only the experts `answer` reads (alone_experts), so a member's row costs its own encoder and head
        and nothing else. info: flops [B] (per row, real tokens), experts (names run), ledger (FLOPs by part)."""
        self._check_request(texts, None, None)
        reads = self.alone_experts(answer)
        B, C = len(texts), len(self.cfg.label_names)
        ledger, rows = FlopLedger(B), np.arange(B)
        if B == 0:
            return np.zeros((0, C), dtype=np.float32), {"flops": ledger.per_row, "experts": reads,
                                                         "ledger": ledger.by_part}
        feats, p_lex = {}, None
        if LEXICAL in reads:
            offsets, _ = self.lexical.bags(texts)
            p_lex = self.lexical.predict_proba(texts)
            ledger.add(LEXICAL, rows, self.lexical.flops(offsets))
            if LEXICAL in self.stats:
                feats[LEXICAL] = self.lexical_features(texts, p_lex)
        for name in reads:
            if name == LEXICAL:
                continue
            e = self.expert(name)
            token_rows = e.tokenizer.encode(texts, self.cfg.max_len)
            ledger.add(name, rows, encoder_row_flops(e.config, np.array([len(r) for r in token_rows])))
            X = features_lib.pooled_features(e, None, self.cfg.max_len, rows=token_rows)
            feats[name] = self.standardized(name, X)
        if answer == "fused":
            probs = self.fused_probs(len(self.tiers) - 1, feats)
            ledger.add("fused/head", rows, head_flops(self.tiers[-1][0]))
        else:
            probs = self.member_probs(reads[0], feats, p_lex)
            if reads[0] != LEXICAL:
                ledger.add(f"{reads[0]}/head", rows, head_flops(self.singles[reads[0]][0]))
        if not np.isfinite(probs).all():
            raise FloatingPointError("the team produced non-finite probabilities; its checkpoint or the expert "
                                     "weights are damaged: run `python -m minislm.weights verify` and retrain")
        return probs, {"flops": ledger.per_row.copy(), "experts": reads, "ledger": ledger.by_part}

    # ---- gated mode ------------------------------------------------------------------------------------
    def router_flops(self, chosen, texts):
        """FLOPs per row [B] of gated mode: the lexical expert, the encoders the router chose, the head."""
        offsets, _ = self.lexical.bags(texts)
        cost = self.lexical.flops(offsets).astype(np.float64) + head_flops(self.router[0])
        for i, name in enumerate(self.router[0].experts):
            if name != LEXICAL:
                lengths = self.token_lengths(name, texts)  # each expert's own tokenizer: MPNet's can differ
                cost += np.where(chosen[:, i], encoder_row_flops(self.expert(name).config, lengths), 0.0)
        return cost

    def predict_gated(self, texts):
        """Gated mode: the router reads the lexical expert, picks top-k experts per row, and only those run.
        -> (probabilities [B, C], info with the chosen experts and FLOPs per row)."""
        if self.router is None:
            raise ValueError("this team has no router (it was trained with router_top_k=0 or without encoders)")
        self._check_request(texts, None, None)
        c, params = self.router
        B = len(texts)
        feats = {LEXICAL: self.lexical_features(texts, self.lexical.predict_proba(texts))}
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
        probs = losses.softmax(trainer.logits_of(c, params, feats))
        return probs, {"gate": g, "experts": [[c.experts[i] for i in np.flatnonzero(r)] for r in chosen],
                       "flops": self.router_flops(chosen, texts)}

    # ---- checkpoints -----------------------------------------------------------------------------------
    def to_state(self):
        """-> (meta, arrays): everything a checkpoint stores, as JSON and named float32 arrays."""
        esc = checkpoint._escape
        arrays = {}
        for name, (mu, sd) in self.stats.items():
            arrays[f"stats/{esc(name)}/mean"], arrays[f"stats/{esc(name)}/std"] = mu, sd
        for name, (_, p) in self.singles.items():
            arrays.update(checkpoint.flatten(p, f"single/{esc(name)}"))
        for k, tier in enumerate(self.tiers):
            if tier is not None:
                arrays.update(checkpoint.flatten(tier[1], f"tier{k}"))
        if self.router is not None:
            arrays.update(checkpoint.flatten(self.router[1], "router"))
        for k, params in self.composition.stacks.items():
            arrays.update(checkpoint.flatten(params, f"stack{k}"))
        for name, (delta, _) in self.deltas.items():
            arrays.update({f"delta/{esc(name)}/{k}": v for k, v in delta.items()})
        lex_arrays, lex_meta = self.lexical.state()
        arrays.update({f"lexical/{k}": v for k, v in lex_arrays.items()})
        meta = {
            "command": self.command, "config": self.cfg.to_dict(), "label_names": list(self.cfg.label_names),
            "experts": [{"name": e, "tier": k, "weights_sha256": None if e == LEXICAL else self.base_sha256(e)}
                        for k, e in enumerate(self.cfg.experts)],
            "deltas": {name: meta for name, (_, meta) in self.deltas.items()},
            "lexical": dict(lex_meta, tokenizer=self.lexical_tokenizer),
            "singles": {n: c.to_dict() for n, (c, _) in self.singles.items()},
            "tiers": [None if t is None else t[0].to_dict() for t in self.tiers],
            "router": None if self.router is None else self.router[0].to_dict(),
            "composition": self.composition.to_dict(),
            "protocol": self.protocol, "metrics": self.metrics,
        }
        return meta, arrays

    def check_composition(self):
        """The composition only refers to tiers, members and heads this team has."""
        comp, n = self.composition, len(self.cfg.experts)
        if not comp.active or comp.active[0] != 0 or sorted(set(comp.active)) != comp.active or comp.active[-1] >= n:
            raise ValueError(f"active tiers {comp.active} must start at 0, ascend and stay below {n}")
        if len(comp.thresholds) != len(comp.active) - 1 or set(comp.answers) != set(comp.active):
            raise ValueError("the composition's thresholds or answers do not match its active tiers")
        for k, a in comp.answers.items():
            if a.kind == "fused" and self.tiers[k] is None:
                raise ValueError(f"tier {k} serves its fused head, which the checkpoint does not hold")
            if a.kind in ("single", "stack") and any(e != LEXICAL and e not in self.singles for e in a.experts):
                raise ValueError(f"tier {k} serves members {a.experts} without their models")
            if a.kind == "stack" and k not in comp.stacks:
                raise ValueError(f"tier {k} serves a stack whose weights are missing")

    @classmethod
    def from_state(cls, meta, arrays, source="checkpoint"):
        """Inverse of to_state; a structurally wrong meta is a CheckpointError naming what is wrong."""
        esc = checkpoint._escape
        try:
            team = cls(TeamConfig.from_dict(meta["config"]), lexical_tokenizer=meta["lexical"]["tokenizer"])
            team.expected_sha256 = {e["name"]: e["weights_sha256"] for e in meta["experts"]}
            for name, dmeta in meta.get("deltas", {}).items():
                prefix = f"delta/{esc(name)}/"
                team.deltas[name] = ({k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}, dmeta)
            for name in team.cfg.experts:
                if f"stats/{esc(name)}/mean" in arrays:
                    team.stats[name] = (arrays[f"stats/{esc(name)}/mean"], arrays[f"stats/{esc(name)}/std"])
            for name, c in meta["singles"].items():
                team.singles[name] = (CollabConfig(**c), checkpoint.unflatten(arrays, f"single/{esc(name)}"))
            team.tiers = [None if c is None else (CollabConfig(**c), checkpoint.unflatten(arrays, f"tier{k}"))
                          for k, c in enumerate(meta["tiers"])]
            if len(team.tiers) != len(team.cfg.experts):
                raise ValueError(f"{len(team.cfg.experts)} experts but {len(team.tiers)} tiers")
            if meta.get("router"):
                team.router = (CollabConfig(**meta["router"]), checkpoint.unflatten(arrays, "router"))
            cm = meta["composition"]
            stacks = {int(k): checkpoint.unflatten(arrays, f"stack{k}") for k, a in cm["answers"].items()
                      if a["kind"] == "stack"}
            team.composition = Composition.from_dict(cm, stacks)
            team.check_composition()
            team.protocol, team.metrics, team.command = meta["protocol"], meta["metrics"], meta.get("command")
            lex = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("lexical/")}
            team.lexical = LexicalModel.from_state(lex, meta["lexical"], team.tokenizer())
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, (CheckpointError, registry.MissingExpertError, registry.DamagedExpertError)):
                raise
            what = f"missing key {e}" if isinstance(e, KeyError) else str(e)
            raise CheckpointError(f"{source}: team.json does not describe a usable team ({what}); the checkpoint "
                                  f"is damaged or from another version: train it again") from e
        return team

    def save(self, folder, command=None):
        """Write this team as a checkpoint folder (see checkpoint.py); an older checkpoint there is replaced
        only once the new one is complete."""
        if command is not None:
            self.command = command
        meta, arrays = self.to_state()
        return checkpoint.write(folder, meta, arrays)

    @classmethod
    def load(cls, folder, experts=None, label_names=None):
        """Checkpoint folder -> Team. experts / label_names, when given, must match the checkpoint's."""
        meta, arrays = checkpoint.read(folder)
        team = cls.from_state(meta, arrays, source=str(folder))
        if experts is not None and list(experts) != team.cfg.experts:
            raise CheckpointError(f"{folder} was trained with experts {team.cfg.experts}, not {list(experts)}; "
                                  f"train a checkpoint for this expert set")
        if label_names is not None and list(label_names) != team.cfg.label_names:
            raise CheckpointError(f"{folder} predicts labels {team.cfg.label_names}, not {list(label_names)}; "
                                  f"train a checkpoint for these labels")
        return team
