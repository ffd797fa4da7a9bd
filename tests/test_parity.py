"""Whole-encoder parity: minislm vs transformers on the three real pretrained experts, every layer."""
import numpy as np
import pytest
import torch

from minislm.experts import load_expert
from tests.model_folders import reference_hidden_states, reference_model
from tests.tolerances import ENCODER_ATOL

EXPERTS = ("paraphrase-MiniLM-L3-v2", "all-MiniLM-L6-v2", "all-mpnet-base-v2")

# Varied real sentences: short, long, punctuation, numbers, non-ASCII; lengths differ so the batch pads heavily.
SENTENCES = [
    "Stocks rallied on Wall Street after the central bank held interest rates steady.",
    "Hi!",
    "The quarterback threw for 300 yards as the home team clinched a playoff spot in overtime, "
    "ending a three-game losing streak that had worried fans and coaches alike for most of October.",
    "NASA's new telescope captured images of a galaxy 13 billion light-years away.",
    "Café owners in Zürich say prices rose 4.5% — the fastest pace since 2008.",
    "A",
    "Apple unveils a faster chip; analysts expect strong holiday sales of laptops and tablets " * 10,
]


@pytest.fixture(scope="module", params=EXPERTS)
def pair(request, prepared_experts):
    name = request.param
    expert = load_expert(name)
    return name, expert, reference_model(prepared_experts[name], expert.config.family)


@pytest.mark.experts
@pytest.mark.parametrize("backend", ["numba", "blas"])
def test_every_layer_matches_transformers(pair, backend, monkeypatch):
    from minislm.kernels import matmul

    monkeypatch.setattr(matmul, "BACKEND", backend)  # both matmul paths of the encoder
    name, expert, model = pair
    ids, mask = expert.tokenizer.encode_batch(SENTENCES, max_len=128)
    assert mask.sum(axis=1).min() <= 4 and ids.shape[1] == 128  # heavy padding, and one row truncated
    ours = expert.encoder.forward(ids, mask)
    ref = reference_hidden_states(model, ids, mask)
    assert ours.shape == ref.shape == (expert.config.n_layers + 1, len(SENTENCES), 128, expert.config.hidden)
    for layer in range(ours.shape[0]):
        diff = max(np.abs(ours[layer, b, m] - ref[layer, b, m]).max() for b, m in enumerate(mask))
        assert diff <= ENCODER_ATOL, f"{name} layer {layer}: max abs diff {diff:.2e} > {ENCODER_ATOL}"


@pytest.mark.experts
def test_sentence_embeddings_match_sentence_transformers_recipe(pair):
    name, expert, model = pair
    ours = expert.embed(SENTENCES, max_len=128, batch_size=3)
    ids, mask = expert.tokenizer.encode_batch(SENTENCES, max_len=128)
    with torch.no_grad():
        last = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask.astype(np.int64)))[0]
    m = torch.from_numpy(mask).unsqueeze(-1).float()
    ref = ((last * m).sum(1) / m.sum(1).clamp(min=1e-9)).numpy()  # sentence-transformers' MEAN pooling
    np.testing.assert_allclose(ours, ref, atol=ENCODER_ATOL, rtol=0, err_msg=name)
