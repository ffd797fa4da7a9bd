"""The lexical expert: hashing, the sparse backward against torch, training, save/load."""
import numpy as np
import pytest
import torch

from minislm.experts import lexical
from minislm.experts.lexical import LexicalConfig, LexicalModel
from minislm.encoder.tokenizer import Tokenizer
from tests.gradcheck import numeric_grad
from tests.model_folders import tiny_tokenizer
from tests.tolerances import FD_ATOL, FD_RTOL, GRAD_ATOL, GRAD_RTOL


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tiny_tokenizer("bert").save(str(path))
    return Tokenizer.from_file(path, max_len=64, pad_id=0)


def test_hash_is_deterministic_and_seeded():
    a, b = np.arange(1000), np.arange(1000)[::-1]
    h0 = lexical.bigram_buckets(a, b, 1 << 16, seed=0)
    assert np.array_equal(h0, lexical.bigram_buckets(a, b, 1 << 16, seed=0))
    assert (h0 != lexical.bigram_buckets(a, b, 1 << 16, seed=1)).mean() > 0.99
    assert (h0 != lexical.bigram_buckets(b, a, 1 << 16, seed=0)).mean() > 0.99  # order matters
    assert h0.min() >= 0 and h0.max() < 1 << 16
    # the splitmix64 finaliser on a known input (its published first output for state 0 + golden gamma)
    assert int(lexical.splitmix64(np.array([0x9E3779B97F4A7C15], dtype=np.uint64))[0]) == 0xE220A8397B1DCDAF


def test_ngram_rows_by_hand():
    cfg = LexicalConfig(vocab_size=50, n_buckets=8, special_ids=(0, 2, 3))
    rows = lexical.ngram_rows([2, 7, 9, 11, 3, 0], cfg)
    expect_b = lexical.bigram_buckets([7, 9], [9, 11], 8, 0)
    assert rows.tolist() == [7, 9, 11, 50 + expect_b[0], 50 + expect_b[1]]
    assert lexical.ngram_rows([2, 3], cfg).size == 0
    assert lexical.ngram_rows([2, 5, 3], cfg).tolist() == [5]


def _batch(rng, cfg, B=5):
    bags = [rng.integers(0, cfg.vocab_size + cfg.n_buckets, size=rng.integers(0, 7)) for _ in range(B)]
    bags[1] = np.array([3, 3, 3, 4])  # a repeated row
    bags[2] = np.zeros(0, dtype=np.int64)  # an empty text
    return lexical.pack(bags)


def test_backward_matches_torch_embedding_bag():
    rng = np.random.default_rng(0)
    cfg = LexicalConfig(vocab_size=20, n_buckets=10, dim=6, n_classes=3)
    p = {"table": rng.standard_normal((30, 6)), "w": rng.standard_normal((3, 6)), "b": rng.standard_normal(3)}
    offsets, rows = _batch(rng, cfg)
    bag, logits = lexical.forward(p, offsets, rows)
    dlogits = rng.standard_normal(logits.shape)
    g = lexical.backward(p, offsets, rows, bag, dlogits)

    table = torch.tensor(p["table"], requires_grad=True)
    w, b = torch.tensor(p["w"], requires_grad=True), torch.tensor(p["b"], requires_grad=True)
    tbag = torch.nn.functional.embedding_bag(torch.from_numpy(rows), table, torch.from_numpy(offsets[:-1]),
                                             mode="mean")
    tlogits = tbag @ w.T + b
    (tlogits * torch.from_numpy(dlogits)).sum().backward()
    np.testing.assert_allclose(bag, tbag.detach().numpy(), atol=GRAD_ATOL, rtol=GRAD_RTOL)
    uniq, grows = g["table"]
    dense = np.zeros_like(p["table"])
    dense[uniq] = grows
    np.testing.assert_allclose(dense, table.grad.numpy(), atol=GRAD_ATOL, rtol=GRAD_RTOL)
    assert set(uniq.tolist()) == set(rows.tolist())  # sparse: only touched rows
    np.testing.assert_allclose(g["w"], w.grad.numpy(), atol=GRAD_ATOL, rtol=GRAD_RTOL)
    np.testing.assert_allclose(g["b"], b.grad.numpy(), atol=GRAD_ATOL, rtol=GRAD_RTOL)

    def loss(table_):
        return float((lexical.forward(dict(p, table=table_), offsets, rows)[1] * dlogits).sum())
    np.testing.assert_allclose(dense, numeric_grad(loss, p["table"]), atol=FD_ATOL, rtol=FD_RTOL)


def test_training_separates_a_toy_task_and_round_trips(tok, tmp_path):
    rng = np.random.default_rng(0)
    texts, labels = [], []
    for i in range(300):
        y = i % 3
        words = [f"w{10 * y + int(k)}" for k in rng.integers(0, 10, 4)] + [f"w{int(k)}" for k in rng.integers(40, 90, 3)]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(y)
    m = LexicalModel.create(tok, 3, n_buckets=64, dim=8, special_ids=(0, 2, 3))
    m.fit(texts[:240], labels[:240], epochs=10, lr=1.0)
    acc = (m.predict_proba(texts[240:]).argmax(1) == np.array(labels[240:])).mean()
    assert acc > 0.95
    m.save(tmp_path)
    back = LexicalModel.load(tmp_path, tok)
    assert back.cfg == m.cfg
    np.testing.assert_array_equal(back.predict_proba(texts), m.predict_proba(texts))
    assert back.bag(["", "   "]).tolist() == [[0.0] * 8] * 2  # empty text: an empty bag, the zero vector


def test_bad_labels(tok):
    m = LexicalModel.create(tok, 2, n_buckets=16, dim=4)
    with pytest.raises(ValueError, match="3 texts but 2 labels"):
        m.fit(["a", "b", "c"], [0, 1])
    with pytest.raises(ValueError, match="labels must lie in 0..1"):
        m.fit(["a", "b"], [0, 5])
