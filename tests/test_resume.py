"""Experiments resume by unit: an interrupted run, run again, writes the results file an uninterrupted run writes."""
import json

import numpy as np
import pytest

from minislm.experiments import __main__ as cli
from minislm.experiments import seed_run, units
from minislm.team import training
from minislm.team.adaptation import AdaptSettings
from tests.model_folders import make_tiny_folder
from tests.test_team import toy

pytestmark = pytest.mark.experts  # the lexical expert reads the pretrained experts' WordPiece vocabulary

SMALL = dict(proj_dim=8, head_hidden=8, folds=2, lexical={"n_buckets": 256, "epochs": 3, "lr": 1.0})


class Interrupt(Exception):
    pass


@pytest.fixture
def setup(tmp_path, monkeypatch):
    bert = tmp_path / "bert"
    bert.mkdir()
    make_tiny_folder(bert, "bert")
    train, test = toy(120, 0), toy(45, 1)
    train.protocol, test.split = {"dataset": "toy", "note": "synthetic"}, "test"
    monkeypatch.setattr(cli.data, "protocol_splits", lambda name, data_dir=None: (train, test))
    monkeypatch.setattr(cli.aggregate, "plot", lambda result, path: False)
    run_seed = seed_run.run_seed
    monkeypatch.setattr(seed_run, "run_seed", lambda *a, **k: run_seed(*a, **{**SMALL, **k}))
    experts = ["lexical", str(bert)]
    adapt = {str(bert): AdaptSettings(method="lora", rank=4, epochs=1, max_len=32, batch_size=16)}

    def run(where, log):
        """One call of the command in its own folders (units, step checkpoints, features, results)."""
        monkeypatch.setattr(cli, "REPO", tmp_path / where)
        monkeypatch.setattr(training, "ADAPT_CACHE", tmp_path / where / "adapt")
        monkeypatch.setenv("MINISLM_CACHE_DIR", str(tmp_path / where / "features"))
        out = tmp_path / where / "results"
        cli.run_protocol("toy", [0, 1], out, quick=True, experts=experts, adapt=adapt, log=log, search_trials=0)
        return json.loads((out / "toy-quick.json").read_text())

    return run, tmp_path


def timeless(obj):
    """A results file without what the clock decides (durations)."""
    if isinstance(obj, dict):
        return {k: timeless(v) for k, v in obj.items() if "seconds" not in k}
    if isinstance(obj, list):
        return [timeless(v) for v in obj]
    return obj


def test_an_interrupted_run_resumes_by_unit_and_ends_where_an_uninterrupted_one_does(setup, monkeypatch):
    run, root = setup
    whole = run("whole", log=lambda m: None)

    add = seed_run.Table.add
    calls = {"n": 0}

    def failing_add(self, *a, **k):  # seed 0's team unit fails once its adaptation unit is written
        calls["n"] += 1
        raise Interrupt

    monkeypatch.setattr(seed_run.Table, "add", failing_add)
    with pytest.raises(Interrupt):
        run("resumed", log=lambda m: None)
    assert calls["n"] == 1
    folder = next((root / "resumed" / "cache" / "experiments").iterdir())
    assert sorted(p.name for p in folder.iterdir()) == ["seed-0-adapt-lora-r4-bert.json",
                                                        "seed-0-adapt-lora-r4-bert.safetensors"]
    monkeypatch.setattr(seed_run.Table, "add", add)

    lines = []
    resumed = run("resumed", log=lines.append)
    skipped = [m for m in lines if m.startswith("skipped: ")]
    assert skipped == [units.skipped(folder / "seed-0-adapt-lora-r4-bert.json")]
    assert not any(m.startswith("resuming ") for m in lines)  # the adaptation was loaded, not trained on
    assert timeless(resumed) == timeless(whole)

    lines = []
    again = run("resumed", log=lines.append)  # everything done: every unit skipped, the aggregate rebuilt
    assert [m for m in lines if m.startswith("skipped: ")] == [
        units.skipped(folder / n) for n in ("seed-0-adapt-lora-r4-bert.json", "seed-0.json",
                                            "seed-1-adapt-lora-r4-bert.json", "seed-1.json")]
    assert not any(m.startswith("adapted ") or m.startswith("features") for m in lines)
    assert timeless(again) == timeless(whole) and again["seconds"] == resumed["seconds"]
    rows = {r["name"]: r for r in again["rows"]}
    assert rows["lora-r4/" + str(root / "bert")]["accuracy_by_seed"] and len(again["seeds"]) == 2


def test_a_unit_that_does_not_load_is_said_so_and_made_again(setup):
    run, root = setup
    run("a", log=lambda m: None)
    folder = next((root / "a" / "cache" / "experiments").iterdir())
    unit = folder / "seed-1-adapt-lora-r4-bert.json"
    seed_unit = folder / "seed-1.json"
    seed_unit.unlink()
    delta = unit.with_suffix(".safetensors")
    raw = bytearray(delta.read_bytes())
    raw[-5] ^= 0x10  # a flipped byte in the delta: its sha256 no longer matches
    delta.write_bytes(bytes(raw))
    lines = []
    run("a", log=lines.append)
    assert any(m.startswith(unit.name + ": unreadable") and "adapting again" in m for m in lines), lines
    assert seed_unit.exists() and units.read_seed(seed_unit)["seed"] == 1
    seed_unit.write_text('{"seed": 1, "rows": [')  # a damaged seed unit is run again, never aggregated
    lines = []
    run("a", log=lines.append)
    assert any("seed-1.json: unreadable" in m for m in lines)
    assert units.skipped(unit) in lines and units.read_seed(seed_unit)["seed"] == 1
    assert np.isfinite(units.read_seed(seed_unit)["seconds"])
