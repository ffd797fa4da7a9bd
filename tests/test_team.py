"""The trained team end to end on tiny encoders: staged training, the batched cascade, checkpoints, the CLI."""
import json

import numpy as np
import pytest

from minislm import classify
from minislm.data import TextDataset
from minislm.team import CheckpointError, Team, TeamConfig, cascade, checkpoint, train_team
from minislm.team.costs import encoder_row_flops, head_flops
from minislm.team.team import LEXICAL, lexical_logprob
from minislm.team.composition import Composition
from minislm.team.training import fit
from tests.model_folders import make_tiny_folder

pytestmark = pytest.mark.experts  # the lexical expert reads the pretrained experts' WordPiece vocabulary


def toy(n, seed):
    """Three topics, each with its own words, plus shared noise words: learnable but not trivial."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        y = i % 3
        words = [f"w{20 * y + int(k)}" for k in rng.integers(0, 20, 3)] + [f"w{int(k)}" for k in rng.integers(60, 110, 4)]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(y)
    return TextDataset(texts, np.array(labels), ["red", "green", "blue"], "toy", f"split{seed}", "memory",
                       {"note": "synthetic"})


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    root = tmp_path_factory.mktemp("team")
    for fam in ("bert", "mpnet"):
        (root / fam).mkdir()
        make_tiny_folder(root / fam, fam)
    cfg = TeamConfig(dataset="toy", label_names=["red", "green", "blue"],
                     experts=[LEXICAL, str(root / "bert"), str(root / "mpnet")], proj_dim=16, head_hidden=16,
                     folds=2, lexical={"n_buckets": 256, "epochs": 3, "lr": 1.0},
                     train={"epochs": 4, "batch_size": 32, "patience": 4})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINISLM_CACHE_DIR", str(root / "cache"))
        yield fit(Team(cfg), toy(150, 0), log=lambda s: None, progress=False), root


def test_batched_cascade_equals_the_simulation(team):
    team, _ = team
    test = toy(40, 1)
    probs, info = team.predict_proba(test.texts)
    feats = {LEXICAL: team.standardized(LEXICAL, lexical_logprob(team.lexical.predict_proba(test.texts)))}
    for name in team.cfg.encoders:
        feats[name] = team.standardized(name, team.encoder_features(name, test.texts))
    tier_probs = team.tier_probs(feats, team.lexical.predict_proba(test.texts))
    tiers, preds, cost = cascade.simulate(tier_probs, team.thresholds, team.tier_flops(test.texts))
    np.testing.assert_array_equal(info["exit_tier"], np.array(team.composition.active)[tiers])
    np.testing.assert_array_equal(probs.argmax(1), preds)
    np.testing.assert_allclose(info["flops"], cost, rtol=1e-12)
    # forcing every row through every active tier gives the last active tier's answer
    never = [1.01] * (len(team.composition.active) - 1)
    full, info_full = team.predict_proba(test.texts, thresholds=never)
    np.testing.assert_allclose(full, tier_probs[-1], atol=1e-5)
    assert (info_full["exit_tier"] == team.composition.active[-1]).all()
    lex_only, info0 = team.predict_proba(test.texts, max_tier=0)
    assert (info0["exit_tier"] == 0).all() and info0["flops"].max() < 1e5


def test_flops_count_each_expert_by_its_own_tokens(team, monkeypatch):
    """MPNet's tokenizer may cut a text into more tokens than BERT's: each tier's FLOPs use its own count."""
    team, _ = team
    monkeypatch.setattr(team, "composition", Composition.every_tier_fused(3, [1.01, 1.01]))
    test = toy(12, 5)
    bert, mpnet = team.cfg.experts[1], team.cfg.experts[2]
    tok = team.expert(mpnet).tokenizer
    plain = tok.encode
    monkeypatch.setattr(tok, "encode", lambda texts, max_len: [r + r[1:-1] for r in plain(texts, max_len)])
    n_bert, n_mpnet = team.token_lengths(bert, test.texts), team.token_lengths(mpnet, test.texts)
    assert (n_mpnet > n_bert).all()
    lexical, after_bert, after_mpnet = team.tier_flops(test.texts)
    np.testing.assert_allclose(after_mpnet - after_bert, encoder_row_flops(team.expert(mpnet).config, n_mpnet)
                               + head_flops(team.tiers[2][0]), rtol=1e-12)
    _, info = team.predict_proba(test.texts, thresholds=[1.01, 1.01])  # every row through both encoders
    np.testing.assert_allclose(info["flops"], after_mpnet, rtol=1e-12)


def test_a_model_alone_runs_only_what_it_reads(team):
    """predict_alone: a member's own model, or the last tier's fused head, on its own, charged for what it ran."""
    team, _ = team
    test = toy(20, 4)
    p_lex = team.lexical.predict_proba(test.texts)
    lex_flops = team.lexical.flops(team.lexical.bags(test.texts)[0])
    probs, info = team.predict_alone(test.texts, "single:lexical")
    np.testing.assert_array_equal(probs, p_lex)
    np.testing.assert_allclose(info["flops"], lex_flops, rtol=1e-12)
    assert info["experts"] == [LEXICAL] and list(info["ledger"]) == [LEXICAL]
    feats, enc_flops = {LEXICAL: team.lexical_features(test.texts, p_lex)}, 0.0
    for name in team.cfg.encoders:
        feats[name] = team.standardized(name, team.encoder_features(name, test.texts))
        enc_flops = enc_flops + encoder_row_flops(team.expert(name).config, team.token_lengths(name, test.texts))
        probs, info = team.predict_alone(test.texts, f"single:{name}")
        np.testing.assert_allclose(probs, team.member_probs(name, feats, p_lex), atol=1e-6)
        want = encoder_row_flops(team.expert(name).config, team.token_lengths(name, test.texts))
        np.testing.assert_allclose(info["flops"], want + head_flops(team.singles[name][0]), rtol=1e-12)
        assert info["experts"] == [name] and LEXICAL not in info["ledger"]  # the lexical expert never ran
    probs, info = team.predict_alone(test.texts, "fused")
    np.testing.assert_allclose(probs, team.fused_probs(len(team.tiers) - 1, feats), atol=1e-6)
    np.testing.assert_allclose(info["flops"], lex_flops + enc_flops + head_flops(team.tiers[-1][0]), rtol=1e-12)
    assert info["experts"] == team.cfg.experts
    assert team.predict_alone([], "fused")[0].shape == (0, 3)
    with pytest.raises(ValueError, match="cannot serve 'stack' alone; it can serve single:lexical, "):
        team.predict_alone(test.texts, "stack")


def test_gated_mode_runs_only_the_chosen_experts(team):
    team, _ = team
    test = toy(30, 3)
    probs, info = team.predict_gated(test.texts)
    assert probs.shape == (30, 3) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert all(len(e) == team.cfg.router_top_k for e in info["experts"])
    # running every expert on every row gives the same answer: the unchosen ones are weighted zero
    from minislm.collab import trainer
    c, params = team.router
    feats = {LEXICAL: team.standardized(LEXICAL, lexical_logprob(team.lexical.predict_proba(test.texts)))}
    for name in team.cfg.encoders:
        feats[name] = team.standardized(name, team.encoder_features(name, test.texts))
    full = trainer.losses.softmax(trainer.logits_of(c, params, feats))
    np.testing.assert_allclose(probs, full, atol=1e-5)
    all_encoders = team.router_flops(np.ones((30, 3), dtype=bool), test.texts)
    assert (info["flops"] <= all_encoders).all() and (info["flops"] < all_encoders).any()


def test_checkpoint_round_trip_and_mismatches(team, tmp_path):
    team, _ = team
    texts = toy(20, 2).texts
    team.save(tmp_path / "ckpt", command="test")
    back = Team.load(tmp_path / "ckpt")
    np.testing.assert_array_equal(back.predict_proba(texts)[0], team.predict_proba(texts)[0])
    np.testing.assert_array_equal(back.predict_gated(texts)[0], team.predict_gated(texts)[0])
    with pytest.raises(CheckpointError, match="predicts labels \\['red', 'green', 'blue'\\], not \\['a', 'b'\\]"):
        Team.load(tmp_path / "ckpt", label_names=["a", "b"])
    with pytest.raises(CheckpointError, match="was trained with experts"):
        Team.load(tmp_path / "ckpt", experts=["lexical", "all-MiniLM-L6-v2"])
    with pytest.raises(CheckpointError, match="no team.json"):
        Team.load(tmp_path)
    meta = json.loads((tmp_path / "ckpt" / "team.json").read_text())
    meta["experts"][1]["weights_sha256"] = "f" * 64
    (tmp_path / "ckpt" / "team.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="train a new team for these weights"):
        Team.load(tmp_path / "ckpt").expert(team.cfg.experts[1])  # checked when the encoder is first needed


def test_interrupted_save_keeps_the_previous_checkpoint(team, tmp_path, monkeypatch):
    team, _ = team
    team.save(tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "team.safetensors").read_bytes()

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        team.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "team.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def run_cli(capsys, *argv):
    code = classify.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_answers_and_explains(team, tmp_path, capsys):
    team, _ = team
    team.save(tmp_path / "ckpt")
    code, out, err = run_cli(capsys, "--model", str(tmp_path / "ckpt"), "--json", "--explain", "w1 w2 w3", "w45 w50")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["label"] in ("red", "green", "blue") for r in rows] == [True, True]
    assert {"probabilities", "exit_tier", "experts", "flops", "batch_ms", "batch_rows", "explain", "reason"} <= set(rows[0])
    code, out, _ = run_cli(capsys, "--model", str(tmp_path / "ckpt"), "--tier", "2", "--explain", "w3 w4")
    assert code == 0 and "tier" in out


def test_cli_int8_runs_the_encoders_on_int8_weights(team, tmp_path, capsys):
    """--int8: the same heads over int8 encoders (these folder experts are quantized in memory, said on stderr);
    answers every text, close to the float32 answers but not equal to them."""
    team, _ = team
    saved = team.composition
    team.composition = Composition.every_tier_fused(len(team.cfg.experts), [1.01] * (len(team.cfg.experts) - 1))
    try:
        team.save(tmp_path / "ckpt")  # a team whose every text runs every tier
    finally:
        team.composition = saved
    texts = toy(12, 5).texts
    code, out32, err = run_cli(capsys, "--model", str(tmp_path / "ckpt"), "--json", *texts)
    assert code == 0, err
    code, out8, err = run_cli(capsys, "--model", str(tmp_path / "ckpt"), "--json", "--int8", *texts)
    assert code == 0, err
    rows8 = [json.loads(line) for line in out8.splitlines()]
    assert all(r["exit_tier"] == len(team.cfg.experts) - 1 for r in rows8)
    assert err.count("quantized to int8 in memory") == len(team.cfg.encoders)
    assert len(rows8) == len(texts) and all(r["precision"] == "int8" for r in rows8)
    rows32 = [json.loads(line) for line in out32.splitlines()]
    assert all("precision" not in r for r in rows32)
    p32 = np.array([list(r["probabilities"].values()) for r in rows32])
    p8 = np.array([list(r["probabilities"].values()) for r in rows8])
    assert 0 < np.abs(p8 - p32).max() < 0.1, np.abs(p8 - p32).max()  # near float32's answers, not equal to them
    # the team object switches back and forth; float32 is untouched by it
    loaded = Team.load(tmp_path / "ckpt")
    before, _ = loaded.predict_proba(texts)
    loaded.use_int8()
    assert all(loaded.expert(e).precision == "int8" for e in loaded.cfg.encoders)
    np.testing.assert_allclose(loaded.predict_proba(texts)[0], p8, atol=1e-4)  # the CLI rounds to 4 digits
    loaded.use_int8(False)
    np.testing.assert_array_equal(loaded.predict_proba(texts)[0], before)
    code, _, err = run_cli(capsys, "--model", str(tmp_path / "ckpt"), "--int8", "--ray", "--file", "x.parquet",
                           "--out", str(tmp_path / "o.parquet"))
    assert code == 2 and "--int8 is not supported with --ray" in err


@pytest.mark.parametrize("case", ["no-text", "directory", "binary", "bad-utf8", "not-a-checkpoint", "all-empty"])
def test_cli_bad_input_is_one_line_exit_2(team, tmp_path, capsys, monkeypatch, case):
    team, _ = team
    team.save(tmp_path / "ckpt")
    model = ["--model", str(tmp_path / "ckpt")]
    f = tmp_path / "in.txt"
    if case == "no-text":
        monkeypatch.setattr("sys.stdin.isatty", lambda: True)
        argv = model
    elif case == "directory":
        argv = model + ["--file", str(tmp_path)]
    elif case == "binary":
        f.write_bytes(b"\x00\x01\x02binary\xff")
        argv = model + ["--file", str(f)]
    elif case == "bad-utf8":
        f.write_bytes(b"fine line\n\xc3\x28 broken\n")
        argv = model + ["--file", str(f)]
    elif case == "not-a-checkpoint":
        argv = ["--model", str(tmp_path), "some text"]
    else:
        f.write_text("\n   \n\n")
        argv = model + ["--file", str(f)]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_cli_file_with_empty_and_huge_lines_answers_the_valid_ones(team, tmp_path, capsys):
    team, _ = team
    team.save(tmp_path / "ckpt")
    f = tmp_path / "in.txt"
    f.write_text("w1 w2 w3\n\n" + "w7 " * 350_000 + "\nw44 w45\n")  # a 1 MB line in the middle
    code, out, err = run_cli(capsys, "--model", str(tmp_path / "ckpt"), "--json", "--file", str(f))
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 4 and "error" in rows[1] and "label" in rows[0] and "label" in rows[3]
    assert "cut to its first" in rows[2]["note"]


def test_train_from_lists(tmp_path, monkeypatch, team):
    _, root = team
    monkeypatch.setenv("MINISLM_CACHE_DIR", str(tmp_path / "cache"))
    ds = toy(60, 4)
    names = ["red", "green", "blue"]
    small = dict(experts=[LEXICAL, str(root / "bert")], proj_dim=8, head_hidden=8, folds=2, router_top_k=0,
                 lexical={"n_buckets": 64, "epochs": 2, "lr": 1.0}, train={"epochs": 2, "batch_size": 32})
    t = train_team(ds.texts, [names[i] for i in ds.labels], label_names=names, log=lambda s: None, **small)
    assert t.cfg.label_names == names and len(t.predict(ds.texts[:3])) == 3
    with pytest.raises(ValueError, match="label 'purple' is not one of"):
        train_team(["a", "b"], ["red", "purple"], label_names=names, **small)
    with pytest.raises(ValueError, match="2 texts, 1 labels"):
        train_team(["a", "b"], ["red"], **small)


def test_an_adapted_team_round_trips_through_its_checkpoint(team, tmp_path, monkeypatch):
    """A LoRA-adapted encoder: the checkpoint stores only the delta beside the base's sha256, and the loaded
    team answers exactly as the trained one."""
    _, root = team
    monkeypatch.setenv("MINISLM_CACHE_DIR", str(tmp_path / "cache"))
    from minislm.team import training
    monkeypatch.setattr(training, "ADAPT_CACHE", tmp_path / "adapt")
    bert = str(root / "bert")
    t = train_team(toy(90, 6).texts, [int(y) for y in toy(90, 6).labels], label_names=["red", "green", "blue"],
                   log=lambda s: None, experts=[LEXICAL, bert], proj_dim=8, head_hidden=8, folds=2, router_top_k=0,
                   lexical={"n_buckets": 64, "epochs": 2, "lr": 1.0}, train={"epochs": 2, "batch_size": 32},
                   adapt={bert: {"method": "lora", "rank": 2, "epochs": 1, "batch_size": 16, "max_len": 16}})
    assert bert in t.deltas and t.metrics["adapt"][bert]["trainable_params"] > 0
    t.composition = Composition.every_tier_fused(2, [1.01])  # every row through the adapted encoder
    t.save(tmp_path / "ckpt")
    back = Team.load(tmp_path / "ckpt")
    texts = toy(10, 7).texts
    np.testing.assert_array_equal(back.predict_proba(texts)[0], t.predict_proba(texts)[0])
    meta = json.loads((tmp_path / "ckpt" / "team.json").read_text())
    assert meta["deltas"][bert]["method"] == "lora"
    assert meta["experts"][1]["weights_sha256"] == meta["deltas"][bert]["base_sha256"]
    assert all(k.startswith(("delta/", "stats/", "single/", "tier", "lexical/", "router", "stack"))
               for k in meta["arrays_sha256"])


def test_fold_hook_scores_each_row_once_by_a_fold_that_never_saw_it(team, monkeypatch):
    t, root = team
    monkeypatch.setenv("MINISLM_CACHE_DIR", str(root / "cache"))
    held_by_fold = []

    def hook(fold, rec, held_feats):
        seen = np.concatenate([rec.fit_idx, rec.val_idx])
        held = np.setdiff1d(np.arange(len(rec.dataset)), seen)  # what the fold team never trained or validated on
        assert all(len(f) == len(held) for f in held_feats.values())
        held_by_fold.append(held)
        return {"row": held[:, None].astype(np.float64)}

    fitted = fit(Team(t.cfg), toy(150, 0), log=lambda s: None, progress=False, fold_extra=hook)
    rec = fitted.training
    assert len(held_by_fold) == t.cfg.folds
    assert sorted(np.concatenate(held_by_fold).tolist()) == list(range(len(rec.dataset)))  # each row held once
    np.testing.assert_array_equal(rec.crossfit_extra["row"][:, 0], np.arange(len(rec.dataset)))  # joined in row order
    np.testing.assert_array_equal(rec.crossfit.y, rec.dataset.labels)


def test_team_internals_figure_reads_the_checkpoint_and_results(team, tmp_path):
    from minislm.experiments import figures

    t, _ = team
    mixes = figures.layer_mixes(t)
    assert len(mixes) == 2 * len(t.cfg.encoders)  # each encoder alone and inside the full fusion
    for label, w in mixes.items():
        assert abs(float(np.sum(w)) - 1.0) < 1e-5 and (w > 0).all(), label
    row = {"name": "cascade/checkpoint", "kind": "cascade", "checkpoint": True, "exit_share": [0.5, 0.3, 0.2]}
    router = {"name": "router/top-2", "kind": "cascade", "run_share": {"lexical": 0.9, "L3": 0.6}}
    result = {"rows": [row, router], "composition_by_seed": [{"single_accuracy": {"lexical": 1, "L3": 1, "L6": 1}}]}
    (tmp_path / "ag_news.json").write_text(json.dumps(result))
    assert figures.exit_shares(tmp_path) == {"ag_news": (["lexical", "L3", "L6"], [0.5, 0.3, 0.2])}
    assert figures.router_shares(tmp_path) == {"ag_news": {"lexical": 0.9, "L3": 0.6}}
    assert figures.draw(tmp_path, t, tmp_path / "f.png").stat().st_size > 10_000


def test_too_few_rows_to_cross_fit_fall_back_to_the_validation_rows_and_say_so(team, tmp_path, monkeypatch):
    _, root = team
    monkeypatch.setenv("MINISLM_CACHE_DIR", str(tmp_path / "cache"))
    small = dict(experts=[LEXICAL, str(root / "bert")], proj_dim=8, head_hidden=8, folds=5, router_top_k=0,
                 lexical={"n_buckets": 64, "epochs": 2, "lr": 1.0}, train={"epochs": 2, "batch_size": 32})
    ds, said = toy(30, 4), []
    t = train_team(ds.texts[:4], [0, 1] * 2, log=said.append, **small)  # 4 rows cannot feed 5 fold teams
    assert "too few for 5 fold teams" in t.metrics["crossfit_fallback"]
    assert t.metrics["composition"]["estimate"]["how"].startswith("in-sample: 1 held-apart rows are too few")
    t = train_team(ds.texts[:8], [0, 1] * 4, log=lambda s: None, **small)  # 8 can: 4 folds of 2 for the estimate
    assert "crossfit_fallback" not in t.metrics and t.metrics["composition"]["estimate"]["how"].startswith("4-fold")
    assert any("chosen on the 1 validation rows instead" in line for line in said)
    t = train_team(ds.texts[:20], [0] * 10 + [1] * 9 + [2], log=lambda s: None, **small)  # a class of one row
    assert len(t.predict(ds.texts[:2])) == 2
    with pytest.raises(ValueError, match="too few to fit and validate on"):
        train_team(ds.texts[:3], [0, 1, 2], log=lambda s: None, **small)
