"""The encoder against transformers on tiny random BERT and MPNet models (no download)."""
import numpy as np
import pytest
import torch

from minislm.encoder.model import Encoder, relative_buckets
from minislm.encoder.pooling import pool_cls, pool_mean
from minislm.experts import load_expert
from minislm.encoder.folder import load_folder
from tests.model_folders import make_tiny_folder, reference_hidden_states
from tests.tolerances import ENCODER_ATOL

FAMILIES = ("bert", "mpnet")


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model = make_tiny_folder(path, request.param)
    return request.param, path, model


def padded_ids(pad_id, lengths, vocab=120, seed=0):
    """Random real ids (avoiding the pad id) for each length, right-padded -> ids [B, T], mask [B, T]."""
    rng = np.random.default_rng(seed)
    T = max(lengths)
    ids = np.full((len(lengths), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(lengths), T), dtype=bool)
    for b, n in enumerate(lengths):
        row = rng.integers(2, vocab, size=n)
        ids[b, :n] = row
        mask[b, :n] = True
    return ids, mask


@pytest.mark.parametrize("lengths", [[1], [7], [5, 17, 2, 17], [64, 3], [70]])  # 70: tiny MPNet's limit
@pytest.mark.parametrize("backend", ["numba", "blas"])
def test_every_layer_matches_transformers(tiny, lengths, backend, monkeypatch):
    from minislm.kernels import matmul

    monkeypatch.setattr(matmul, "BACKEND", backend)
    family, path, model = tiny
    hf = load_folder(path)
    enc = Encoder.from_params(hf.config, hf.params)
    ids, mask = padded_ids(hf.config.pad_id, lengths)
    ours = enc.forward(ids, mask)
    ref = reference_hidden_states(model, ids, mask)
    assert ours.shape == ref.shape == (hf.config.n_layers + 1, len(lengths), max(lengths), hf.config.hidden)
    for layer in range(ours.shape[0]):
        for b, n in enumerate(lengths):  # padding positions are not compared: they are free to differ
            np.testing.assert_allclose(ours[layer, b, :n], ref[layer, b, :n], atol=ENCODER_ATOL, rtol=0,
                                       err_msg=f"{family} layer {layer} row {b}")


def test_padded_batch_equals_each_row_alone(tiny):
    family, path, _ = tiny
    hf = load_folder(path)
    enc = Encoder.from_params(hf.config, hf.params)
    lengths = [3, 40, 11, 1, 40]
    ids, mask = padded_ids(hf.config.pad_id, lengths, seed=3)
    batch = enc.forward(ids, mask)
    for b, n in enumerate(lengths):
        alone = enc.forward(ids[b:b + 1, :n], mask[b:b + 1, :n])
        np.testing.assert_allclose(batch[:, b, :n], alone[:, 0], atol=ENCODER_ATOL, rtol=0)


def test_keep_returns_the_same_states_and_intermediates(tiny):
    _, path, _ = tiny
    hf = load_folder(path)
    enc = Encoder.from_params(hf.config, hf.params)
    ids, mask = padded_ids(hf.config.pad_id, [9, 4])
    plain = enc.forward(ids, mask)
    kept, caches = enc.forward(ids, mask, keep=True)
    np.testing.assert_allclose(kept, plain, atol=ENCODER_ATOL, rtol=0)
    assert len(caches) == hf.config.n_layers
    B, T, H = 2, 9, hf.config.hidden
    for i, c in enumerate(caches):
        np.testing.assert_array_equal(c["x"], kept[i].reshape(B * T, H))
        np.testing.assert_array_equal(c["y"], kept[i + 1].reshape(B * T, H))
        assert c["ffn_pre"].shape == (B * T, hf.config.ffn)


def test_relative_buckets_match_transformers():
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

    rel = np.arange(-700, 701)
    ref = MPNetEncoder.relative_position_bucket(torch.from_numpy(rel), num_buckets=32, max_distance=128).numpy()
    np.testing.assert_array_equal(relative_buckets(rel, 32, 128), ref)


def test_pooling():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=bool)
    mean = pool_mean(h, mask)
    for b in range(3):
        np.testing.assert_allclose(mean[b], h[b, mask[b]].mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(pool_cls(h), h[:, 0])


def test_expert_from_folder_embeds_texts(tiny):
    family, path, model = tiny
    expert = load_expert(str(path))
    texts = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9 w10 w11", "W1 unknownword"]
    vecs = expert.embed(texts, batch_size=2)
    for i, t in enumerate(texts):
        ids, mask = expert.tokenizer.encode_batch([t])
        ref = reference_hidden_states(model, ids, mask)[-1]
        np.testing.assert_allclose(vecs[i], ref[0].mean(axis=0), atol=ENCODER_ATOL, rtol=0)


def test_wrong_ids_are_refused(tiny):
    _, path, _ = tiny
    hf = load_folder(path)
    enc = Encoder.from_params(hf.config, hf.params)
    with pytest.raises(ValueError, match="another model's tokenizer"):
        enc.forward(np.array([[2, 500]]), np.ones((1, 2), dtype=bool))
    too_long = hf.config.max_tokens + 1
    with pytest.raises(ValueError, match="exceed this model's limit"):
        enc.forward(np.full((1, too_long), 2), np.ones((1, too_long), dtype=bool))
