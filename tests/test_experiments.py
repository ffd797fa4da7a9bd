"""The experiments pipeline end to end on tiny encoders: one seed's rows, the aggregate, the selection."""
import numpy as np
import pytest

from minislm.experiments import aggregate, seed_run
from tests.model_folders import make_tiny_folder
from tests.test_team import toy

pytestmark = pytest.mark.experts  # the lexical expert reads the pretrained experts' WordPiece vocabulary


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    for fam in ("bert", "mpnet"):
        (root / fam).mkdir()
        make_tiny_folder(root / fam, fam)
    train, test = toy(150, 0), toy(60, 1)
    test.split = "test"
    small = dict(experts=["lexical", str(root / "bert"), str(root / "mpnet")], proj_dim=8, head_hidden=8, folds=2,
                 lexical={"n_buckets": 256, "epochs": 3, "lr": 1.0}, crossfit_below=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINISLM_CACHE_DIR", str(root / "cache"))
        out = [seed_run.run_seed("toy", train, test, s, quick=True, log=lambda m: None, search_trials=1 - s, int8=True,
                                 **small)[0] for s in (0, 1)]
    return out, test


@pytest.fixture(scope="module")
def crossfit_seed(tmp_path_factory):
    """One seed in small-data mode: every choice cross-fitted over all training rows."""
    root = tmp_path_factory.mktemp("exp-cf")
    (root / "bert").mkdir()
    make_tiny_folder(root / "bert", "bert")
    train, test = toy(120, 0), toy(60, 1)
    test.split = "test"
    small = dict(experts=["lexical", str(root / "bert")], proj_dim=8, head_hidden=8, folds=2,
                 lexical={"n_buckets": 256, "epochs": 3, "lr": 1.0}, crossfit_below=10 ** 6)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINISLM_CACHE_DIR", str(root / "cache"))
        return seed_run.run_seed("toy", train, test, 0, quick=True, log=lambda m: None, **small)[0], test


def test_small_data_rows_are_chosen_on_out_of_fold_accuracy(crossfit_seed):
    result, test = crossfit_seed
    by = {r["name"]: r for r in result["rows"]}
    fusions = [r["name"] for r in result["rows"] if r["kind"] == "fusion"]
    assert len(fusions) == len(seed_run.FUSIONS) + 2  # five learned fusions, prob-average, stacking
    for name in ["lexical", *fusions, "cascade/checkpoint"]:
        assert by[name]["val_basis"].startswith("out-of-fold over all 120"), name
        assert by[name].get("selectable", True)
    assert by["cascade/checkpoint"]["val_accuracy"] == result["composition"]["estimate"]["accuracy"]
    assert by["lexical"]["val_accuracy"] == result["composition"]["single_accuracy"]["lexical"]
    for name in ("cascade/budget=10%", "cascade/every-tier-fused", "tfidf-lr"):
        if name in by:
            assert by[name]["selectable"] is False and "validation split" in by[name]["val_basis"]
    # a row scored on the small split never wins, however high its number
    rigged = [dict(r, val_accuracy=1.0) if not r.get("selectable", True) else r for r in result["rows"]]
    rows, preds = aggregate.combine([dict(result, rows=rigged)])
    sel = aggregate.select(rows, preds, np.asarray(test.labels))
    assert by[sel["best_team"]].get("selectable", True) and by[sel["best_single"]].get("selectable", True)
    assert "out-of-fold" in sel["validation"]


def test_every_row_has_validation_and_test_numbers(seeds):
    results, test = seeds
    rows = results[0]["rows"]
    kinds = {r["kind"] for r in rows}
    assert {"single", "fusion", "cascade", "ablation"} <= kinds
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and len(r["preds"]) == len(test)
        assert r["gflops_per_sample"] >= 0 and r["params"] >= 0
    assert sum(r.get("checkpoint", False) for r in rows) == 1
    assert len(results[0]["search"]) == 2 and results[0]["search"][0]["default"]


def test_aggregate_selects_on_validation_only(seeds):
    results, test = seeds
    rows, preds = aggregate.combine(results)
    y = np.asarray(test.labels)
    sel = aggregate.select(rows, preds, y)
    singles = [r for r in rows if r["kind"] == "single"]
    assert sel["best_single"] == max(singles, key=lambda r: (r["val_accuracy"], -r["gflops_per_sample"]))["name"]
    by = {r["name"]: r for r in rows}
    assert len(by[sel["best_single"]]["accuracy_by_seed"]) == 2
    # flipping the test labels changes test accuracies but never the selection
    flipped = [dict(s, rows=[dict(r, accuracy=1 - r["accuracy"]) for r in s["rows"]]) for s in results]
    rows2, _ = aggregate.combine(flipped)
    assert aggregate.select(rows2, preds, y)["best_team"] == sel["best_team"]
    abl = aggregate.ablations(rows, preds, y)
    assert abl and all(a["holm_p"] >= a["mcnemar_p"] for a in abl)
    assert {"without the lexical expert", "plain mean vs gated fusion", "last-layer"} <= {a["isolates"] for a in abl}
    text = aggregate.markdown({"protocol": {"dataset": "toy"}, "seeds": [0, 1], "command": "test", "seconds": 1,
                               "rows": rows, "selected": sel, "ablations": abl,
                               "composition_by_seed": [r["composition"] for r in results], "search": []})
    assert sel["best_team"] in text and "Ablations" in text


def test_fusion_guide_reads_only_what_the_results_show(seeds, tmp_path):
    from minislm.experiments import guide

    results, test = seeds
    rows, preds = aggregate.combine(results)
    y = np.asarray(test.labels)
    result = {"protocol": {"dataset": "ag_news", "n_train": 150}, "seeds": [0, 1], "rows": rows,
              "selected": aggregate.select(rows, preds, y)}
    (tmp_path / "ag_news.json").write_text(__import__("json").dumps(result))
    md = guide.write(tmp_path)
    g = __import__("json").loads((tmp_path / "fusion_guide.json").read_text())
    strategies = g["protocols"]["ag_news"]["strategies"]
    assert {"concat", "gated", "stacking", "cascade/checkpoint"} <= set(strategies)
    best = max(strategies, key=lambda s: (strategies[s]["val_accuracy"], -strategies[s]["gflops_per_sample"]))
    assert g["protocols"]["ag_news"]["validation_best_strategy"] == best
    single = {r["name"]: r for r in rows}[result["selected"]["best_single"]]
    for s, v in strategies.items():
        assert abs(v["vs_best_single_points"] - 100 * (v["accuracy"] - single["accuracy"])) < 1e-9
    assert "| gated |" in md and "Best frozen single expert" in md
    from minislm.experiments import summary

    line = summary.table(tmp_path).splitlines()[4]
    assert line.startswith("| ag_news | 2 | ") and result["selected"]["best_single"] in line
    assert result["selected"]["best_team"] in line


def test_an_adapted_run_adds_its_rows_to_the_frozen_runs_file(seeds, tmp_path, monkeypatch):
    import json

    from minislm.experiments import __main__ as cli
    from minislm.team.adaptation import AdaptSettings

    results, test = seeds
    frozen = results[0]
    experts = [r["name"] for r in frozen["rows"] if r["kind"] == "single"]
    bert = experts[1]
    adapt = {bert: AdaptSettings(method="lora", rank=4, epochs=1, max_len=32, batch_size=16)}
    small = dict(experts=experts, proj_dim=8, head_hidden=8, folds=2, lexical={"n_buckets": 256, "epochs": 3, "lr": 1.0},
                 crossfit_below=0, adapt=adapt)
    monkeypatch.setenv("MINISLM_CACHE_DIR", str(tmp_path / "cache"))
    adapted, _ = seed_run.run_seed("toy", seed_run_train(), test, 0, quick=True, log=lambda m: None, **small)
    by = {r["name"]: r for r in adapted["rows"]}
    row = by[f"lora-r4/{bert}"]
    assert row["kind"] == "adapted" and row["expert"] == bert and 0 < row["trainable_params"]
    assert not any(r.get("checkpoint") for r in adapted["rows"])  # the served team is the frozen run's
    assert any(n.startswith("cascade/checkpoint (lora-r4-") for n in by)
    assert any(n.startswith("stacking/") and f"lora-r4-{bert}" in n for n in by)
    assert not any(r["kind"] in ("ablation", "baseline") for r in adapted["rows"])

    # both runs' seed files, then the protocol's results file holds the frozen rows and the adapted ones once
    monkeypatch.setattr(cli, "REPO", tmp_path)
    for s, res in ((0, results[0]), (1, results[1])):  # the frozen run without int8 rows, a --int8 run beside it
        cli.write_json(cli.seed_file("toy", s, False, experts), dict(res, rows=[r for r in res["rows"]
                                                                              if r["kind"] != "int8"]))
    cli.write_json(cli.seed_file("toy", 0, False, experts, int8=True), results[0])
    cli.write_json(cli.seed_file("toy", 0, False, experts, adapt), adapted)
    monkeypatch.setattr(cli.aggregate, "plot", lambda result, path: False)
    train = seed_run_train()
    train.protocol = {"dataset": "toy", "note": "synthetic"}
    out = cli.write_results("toy", train, test, tmp_path, False, 0.0, experts)
    names = [r["name"] for r in out["rows"]]
    assert len(names) == len(set(names)) and f"lora-r4/{bert}" in names and bert in names
    assert [r["seeds"] for r in out["adapted_runs"]] == [[0], [0]] and out["seeds"] == [0, 1]
    assert sum(r["kind"] == "int8" for r in out["rows"]) == 3  # the two encoders and the cascade, once each
    assert sum(r.get("checkpoint", False) for r in out["rows"]) == 1
    pair = [a for a in out["ablations"] if a["isolates"] == "adapted vs frozen"]
    assert pair and pair[0]["row"] == f"lora-r4/{bert}" and pair[0]["compared_with"] == bert
    assert json.loads((tmp_path / "toy.json").read_text())["adapted_runs"]


def seed_run_train():
    return toy(150, 0)


def test_int8_rows_score_the_single_encoders_and_the_checkpoint_on_int8_weights(seeds):
    results, test = seeds
    rows = {r["name"]: r for r in results[0]["rows"]}
    encoders = [n for n, r in rows.items() if r["kind"] == "single" and n != "lexical"]
    int8 = {n: r for n, r in rows.items() if r["kind"] == "int8"}
    assert set(int8) == {f"int8/{e}" for e in encoders} | {"int8/cascade/checkpoint"}
    for name, r in int8.items():
        ref = rows[r["float32_row"]]
        assert r["float32_row"] == name.removeprefix("int8/")
        assert r["gflops_per_sample"] == ref["gflops_per_sample"] and r["params"] == ref["params"]
        assert len(r["preds"]) == len(test) and 0 <= r["val_accuracy"] <= 1
        # the same heads on int8 features: mostly the same answers (tiny random encoders, so not all)
        assert r["agreement"] == np.mean(np.array(r["preds"]) == np.array(ref["preds"])) and r["agreement"] > 0.5
    assert abs(sum(int8["int8/cascade/checkpoint"]["exit_share"]) - 1) < 1e-9
    # int8 rows are reported, never chosen, and the tables take them
    agg, preds = aggregate.combine(results)
    sel = aggregate.select(agg, preds, np.asarray(test.labels))
    assert not sel["best_single"].startswith("int8/") and not sel["best_team"].startswith("int8/")
    text = aggregate.markdown({"protocol": {"dataset": "toy"}, "seeds": [0, 1], "command": "test", "seconds": 1,
                               "rows": agg, "selected": sel, "ablations": [],
                               "composition_by_seed": [r["composition"] for r in results], "search": []})
    assert "| int8 | int8/cascade/checkpoint |" in text
