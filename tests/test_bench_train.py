"""The training-step benchmark runs both engines on the same step and reports torch s / minislm s."""
import pytest

from minislm import bench_train

pytestmark = pytest.mark.experts  # times a real expert (the smallest)


def test_train_step_rows_time_both_engines_on_a_small_step(monkeypatch):
    monkeypatch.setattr(bench_train, "B", 2)
    monkeypatch.setattr(bench_train, "T", 8)
    out = bench_train.train_step_rows(("paraphrase-MiniLM-L3-v2",), runs=1, threads=1, log=lambda m: None)
    assert out["shape"] == "B2 x T8" and out["cpu"]["model"]
    for method, key in (("full", "l3_train_step_vs_torch"), ("lora", "l3_lora_step_vs_torch")):
        seconds = out[f"l3_{method}_step_seconds"]
        assert seconds["minislm"] > 0 and seconds["torch"] > 0
        assert out[key] == pytest.approx(seconds["torch"] / seconds["minislm"])
