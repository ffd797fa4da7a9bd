"""The training-step benchmark runs both engines on the same step and reports torch s / minislm s."""
import pytest

from minislm import bench_train

pytestmark = pytest.mark.experts  # times a real expert (the smallest)


def test_train_step_rows_time_both_engines_on_a_small_step(monkeypatch):
    monkeypatch.setattr(bench_train, "B", 2)
    monkeypatch.setattr(bench_train, "T", 8)
    out = bench_train.train_step_rows(("paraphrase-MiniLM-L3-v2",), runs=1, threads=1, log=lambda m: None)
    assert out["shape"] == "B2 x T8" and out["cpu"]["model"]
    sec = out["l3_step_seconds"]
    assert all(v > 0 for v in sec.values()) and set(sec) == {"full", "lora", "top2_cached", "torch_full", "torch_lora"}
    assert out["l3_train_step_vs_torch"] == pytest.approx(sec["torch_full"] / sec["full"])
    assert out["l3_lora_step_vs_torch"] == pytest.approx(sec["torch_lora"] / sec["lora"])
    assert out["l3_lora_vs_full_step"] == pytest.approx(sec["lora"] / sec["full"])
    assert out["l3_top2_cached_vs_full_step"] == pytest.approx(sec["top2_cached"] / sec["full"])
