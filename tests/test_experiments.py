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
    text = aggregate.markdown({"protocol": {"dataset": "toy"}, "seeds": [0, 1], "command": "test", "seconds": 1,
                               "rows": rows, "selected": sel, "ablations": abl,
                               "composition_by_seed": [r["composition"] for r in results], "search": []})
    assert sel["best_team"] in text and "Ablations" in text


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
