"""FLOP formulas: matmul counts equal torch's FlopCounterMode exactly; whole counts equal ones written out by hand."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from minislm import flops
from minislm.collab import heads
from minislm.encoder import flops as encoder_flops
from minislm.encoder.config import EncoderConfig
from minislm.encoder.folder import load_folder
from minislm.kernels.attention import attention_flops
from minislm.kernels.matmul import linear_flops, matmul_flops
from minislm.kernels.norm import layer_norm_flops
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
    assert encoder_flops.encoder(cfg, B, T)["matmul"] == torch_flops(model, B, T)


@pytest.mark.experts
@pytest.mark.parametrize("name", ["paraphrase-MiniLM-L3-v2", "all-MiniLM-L6-v2", "all-mpnet-base-v2"])
def test_real_experts_matmuls_equal_torch(prepared_experts, name):
    cfg = load_folder(prepared_experts[name]).config
    model = reference_model(prepared_experts[name], cfg.family)
    assert encoder_flops.encoder(cfg, 2, 40)["matmul"] == torch_flops(model, 2, 40)


def test_hand_formulas():
    assert matmul_flops(3, 4, 5) == 120
    assert linear_flops(2, 3, 4, bias=True, gelu=True) == {"matmul": 48, "other": 8 + 8 * 8}
    a = attention_flops(B=2, T=3, n_heads=4, head_dim=5)
    assert a["matmul"] == 2 * 4 * (2 * 3 * 5 * 3) * 2 and a["other"] == 2 * 4 * 9 * 7
    assert layer_norm_flops(10, 6) == 10 * 6 * 9
    # a row of an MLP head 8 -> 16 (GELU) -> 3: two matmuls, two bias adds, one GELU of 8 FLOPs per element
    assert heads.flops([8, 16, 3]) == (2 * 8 * 16 + 16 + 16 * 8) + (2 * 16 * 3 + 3)


def test_a_whole_tiny_encoder_counted_by_hand():
    """One BERT layer, H = 4, F = 8, 2 heads of D = 2, on one row of T = 3 tokens, every term written out."""
    cfg = EncoderConfig(family="bert", vocab_size=10, hidden=4, n_layers=1, n_heads=2, ffn=8, max_positions=8,
                        type_vocab_size=2, layer_norm_eps=1e-12, pad_id=0, relative_buckets=0,
                        relative_max_distance=128)
    T, H, F = 3, 4, 8
    embeddings = 2 * T * H + 8 * T * H                     # word + position + type adds, then LN (no residual)
    qkv = 2 * T * H * 3 * H + T * 3 * H                    # fused q, k, v with bias
    scores = 2 * (2 * T * 2 * T)                           # q k^T per head: [T, D] x [D, T], two heads
    weighted = 2 * (2 * T * T * 2)                         # p v per head: [T, T] x [T, D]
    softmax_etc = 2 * T * T * (5 + 2)                      # softmax 5, scale + mask 2 per score
    out_proj = 2 * T * H * H + T * H
    ln = 8 * T * H + T * H                                 # LN with the residual add fused
    ffn = (2 * T * H * F + T * F + 8 * T * F) + (2 * T * F * H + T * H)
    by_hand = embeddings + qkv + scores + weighted + softmax_etc + out_proj + ln + ffn + ln
    assert encoder_flops.encoder(cfg, 1, T)["total"] == by_hand


def test_per_sample_and_padding(tmp_path):
    make_tiny_folder(tmp_path, "bert")
    cfg = load_folder(tmp_path).config
    real = encoder_flops.encoder_per_sample(cfg, [3, 10])
    padded = encoder_flops.encoder_per_sample(cfg, [3, 10], padded_to=10)
    assert real[0] < real[1] == padded[0] == padded[1]
    assert encoder_flops.encoder(cfg, 2, 10)["total"] == pytest.approx(padded.sum())


def test_ledger():
    led = flops.FlopLedger(3)
    led.add("L6/encoder", [0, 2], [10.0, 20.0])
    led.add("head", [0, 1, 2], 1.0)
    assert led.per_row.tolist() == [11.0, 1.0, 21.0] and led.total == 33.0
    assert led.by_part == {"L6/encoder": 30.0, "head": 3.0}
