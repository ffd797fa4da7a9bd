"""FLOP formulas: matmul counts equal torch's FlopCounterMode on the transformers model, exactly."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from minislm import flops
from minislm.hf_folder import load_folder
from tests.model_folders import make_tiny_folder, reference_model


def torch_flops(model, B, T):
    model.pooler = None  # minislm's encoder has no pooler; torch would count its dense layer
    ids = torch.randint(5, 100, (B, T))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return counter.get_total_flops()


@pytest.mark.parametrize("family", ["bert", "mpnet"])
@pytest.mark.parametrize("B,T", [(1, 1), (2, 7), (3, 33)])
def test_tiny_encoder_matmuls_equal_torch(tmp_path, family, B, T):
    model = make_tiny_folder(tmp_path, family)
    cfg = load_folder(tmp_path).config
    assert flops.encoder(cfg, B, T)["matmul"] == torch_flops(model, B, T)


@pytest.mark.experts
@pytest.mark.parametrize("name", ["paraphrase-MiniLM-L3-v2", "all-MiniLM-L6-v2", "all-mpnet-base-v2"])
def test_real_experts_matmuls_equal_torch(prepared_experts, name):
    cfg = load_folder(prepared_experts[name]).config
    model = reference_model(prepared_experts[name], cfg.family)
    assert flops.encoder(cfg, 2, 40)["matmul"] == torch_flops(model, 2, 40)


def test_hand_formulas():
    assert flops.matmul(3, 4, 5) == 120
    assert flops.linear(2, 3, 4, bias=True, gelu=True) == {"matmul": 48, "other": 8 + 8 * 8}
    a = flops.attention(B=2, T=3, n_heads=4, head_dim=5)
    assert a["matmul"] == 2 * 4 * (2 * 3 * 5 * 3) * 2 and a["other"] == 2 * 4 * 9 * 7
    assert flops.layer_norm(10, 6) == {"matmul": 0, "other": 10 * 6 * 9}
    assert flops.mlp_head(4, [8, 16, 3]) == (2 * 4 * 8 * 16 + 4 * 16 * 9) + (2 * 4 * 16 * 3 + 4 * 3)


def test_per_sample_and_padding(tmp_path):
    make_tiny_folder(tmp_path, "bert")
    cfg = load_folder(tmp_path).config
    real = flops.encoder_per_sample(cfg, [3, 10])
    padded = flops.encoder_per_sample(cfg, [3, 10], padded_to=10)
    assert real[0] < real[1] == padded[0] == padded[1]
    assert flops.encoder(cfg, 2, 10)["total"] == pytest.approx(padded.sum())


def test_ledger():
    led = flops.FlopLedger(3)
    led.add("L6/encoder", [0, 2], [10.0, 20.0])
    led.add("head", [0, 1, 2], 1.0)
    assert led.per_row.tolist() == [11.0, 1.0, 21.0] and led.total == 33.0
    assert led.by_part == {"L6/encoder": 30.0, "head": 3.0}
