"""The lexical expert: hashing, TF-IDF rows against scikit-learn, the CSR kernels against their references, the
loss's gradient and Hessian-vector product against torch, the Newton-CG against torch's L-BFGS, training,
save/load, determinism and bad input."""
import numpy as np
import pytest
import torch

from minislm.experts import lexical
from minislm.experts import lexical_solver as solver
from minislm.experts.lexical import LexicalModel
from minislm.encoder.tokenizer import Tokenizer
from tests.gradcheck import numeric_grad
from tests.model_folders import tiny_tokenizer
from tests.tolerances import FD_ATOL, FD_RTOL, GRAD_ATOL, GRAD_RTOL, KERNEL_ATOL, KERNEL_RTOL

SOLVER_ATOL = 1e-6   # Newton-CG vs torch L-BFGS on the same strictly convex loss: parameters and loss
TINY = dict(special_ids=(0, 1, 2, 3))   # the tiny tokenizer's [PAD] [UNK] [CLS] [SEP]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tiny_tokenizer("bert").save(str(path))
    return Tokenizer.from_file(path, max_len=64, pad_id=0)


def toy_task(n=300, seed=0):
    """Three classes, each with its own 10 words among shared noise words."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        y = i % 3
        words = [f"w{10 * y + int(k)}" for k in rng.integers(0, 10, 4)]    # the class's own words
        words += [f"w{int(k)}" for k in rng.integers(40, 90, 3)]          # noise shared by every class
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(y)
    return texts, np.array(labels)


def test_hash_is_deterministic_and_seeded():
    t, doc = np.arange(1000, dtype=np.uint64), np.zeros(1000, dtype=np.int64)
    h0, _ = lexical.ngram_buckets(t, doc, 2, 2, 1 << 16, seed=0)
    assert np.array_equal(h0, lexical.ngram_buckets(t, doc, 2, 2, 1 << 16, seed=0)[0])
    assert (h0 != lexical.ngram_buckets(t, doc, 2, 2, 1 << 16, seed=1)[0]).mean() > 0.99
    assert (h0 != lexical.ngram_buckets(t[::-1].copy(), doc, 2, 2, 1 << 16, seed=0)[0][::-1]).mean() > 0.99  # order
    assert (h0 != lexical.ngram_buckets(t, doc, 2, 10, 1 << 16, seed=0)[0]).mean() > 0.99  # kind
    assert h0.min() >= 0 and h0.max() < 1 << 16
    # the splitmix64 finaliser on a known input (its published first output for state 0 + golden gamma)
    assert int(lexical.splitmix64(np.array([0x9E3779B97F4A7C15], dtype=np.uint64))[0]) == 0xE220A8397B1DCDAF


def test_ngrams_by_hand_stay_inside_each_text():
    tokens = np.array([5, 6, 7, 8, 9], dtype=np.uint64)
    doc = np.array([0, 0, 0, 1, 1])
    b, d = lexical.ngram_buckets(tokens, doc, 2, 2, 1 << 20, seed=0)
    assert d.tolist() == [0, 0, 1]                                    # (5 6) (6 7) (8 9), not (7 8)
    one = lambda a, c: lexical.ngram_buckets(np.array([a, c], dtype=np.uint64), np.zeros(2, dtype=np.int64),
                                             2, 2, 1 << 20, 0)[0][0]  # noqa: E731
    assert b.tolist() == [one(5, 6), one(6, 7), one(8, 9)]
    assert lexical.ngram_buckets(tokens[:1], doc[:1], 2, 2, 8, 0)[0].size == 0


def test_bags_count_every_ngram_of_the_whole_text(tok):
    m = LexicalModel.create(tok, 2, n_buckets=1 << 20, **TINY)
    texts = ["w1 w2 w3", "", "W1, w2!", " ".join(["w5"] * 600) + " w7"]
    offsets, rows = m.bags(texts)
    # words: 3 + 2 bigrams; WordPieces (word-level here): 3 ("," and "!" are [UNK] WordPieces, dropped)
    assert np.diff(offsets).tolist() == [8, 0, 5, 601 + 600 + 601]
    assert set(rows[offsets[0]:offsets[1]]) >= set(rows[offsets[2]:offsets[3]])  # case and punctuation go
    # the last word of a 601-word text counts: the text is not truncated
    long_a, long_b = (m.bags([" ".join(["w5"] * 600) + end])[1] for end in (" w7", " w8"))
    assert set(long_a) != set(long_b)


def test_tfidf_rows_match_scikit_learn(tok):
    from sklearn.feature_extraction import text as sk                 # the test extra installs it
    texts, _ = toy_task(60)
    texts = [t + " " + t.split()[0] for t in texts]                  # a repeated word: tf = 2
    m = LexicalModel.create(tok, 3, n_buckets=1 << 20, word_ngrams=2, piece_ngrams=0, **TINY)
    doc, bucket, count = lexical.term_counts(*m.bags(texts), m.cfg.n_buckets)
    idf = lexical.fit_idf(doc, bucket, len(texts), m.cfg.n_buckets)
    indptr, cols, vals = lexical.tfidf_rows(doc, bucket, count, idf, len(texts), np.float64)
    ref = sk.TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1).fit_transform(texts)
    assert len(np.unique(cols)) == ref.shape[1]                       # no collision at 2^20 buckets
    for i in range(len(texts)):                                       # same values, up to the column order
        np.testing.assert_allclose(np.sort(vals[indptr[i]:indptr[i + 1]]), np.sort(ref[i].data), rtol=KERNEL_RTOL)
    # an n-gram no training text holds has idf 0: it neither scores nor changes the norm
    m.params["idf"] = idf
    unseen = m.features([texts[0] + " w119"])
    np.testing.assert_allclose(unseen[2], vals[indptr[0]:indptr[1]][np.argsort(cols[indptr[0]:indptr[1]])],
                               rtol=KERNEL_RTOL)


def _random_csr(rng, B=7, F=11):
    rows = [np.sort(rng.choice(F, size=rng.integers(0, 6), replace=False)) for _ in range(B)]
    rows[2] = np.zeros(0, dtype=np.int64)                             # an empty row
    indptr = np.zeros(B + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(r) for r in rows])
    cols = np.concatenate(rows).astype(np.int64)
    return indptr, cols, rng.standard_normal(len(cols))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_csr_kernels_match_references_and_dense(dtype):
    rng = np.random.default_rng(0)
    indptr, cols, vals = _random_csr(rng)
    vals = vals.astype(dtype)
    dense = np.zeros((7, 11))
    for i in range(7):
        dense[i, cols[indptr[i]:indptr[i + 1]]] = vals[indptr[i]:indptr[i + 1]]
    w, g = rng.standard_normal((11, 3)).astype(dtype), rng.standard_normal((7, 3)).astype(dtype)
    mm = solver.csr_matmul(indptr, cols, vals, w)
    rmm = solver.csr_rmatmul(indptr, cols, vals, g, 11)
    assert mm.dtype == dtype and rmm.dtype == dtype
    np.testing.assert_allclose(mm, solver.csr_matmul_reference(indptr, cols, vals, w),
                               atol=KERNEL_ATOL, rtol=KERNEL_RTOL)
    np.testing.assert_allclose(mm, dense @ w, atol=KERNEL_ATOL, rtol=KERNEL_RTOL)
    np.testing.assert_allclose(rmm, solver.csr_rmatmul_reference(indptr, cols, vals, g, 11),
                               atol=KERNEL_ATOL, rtol=KERNEL_RTOL)
    np.testing.assert_allclose(rmm, dense.T @ g, atol=KERNEL_ATOL, rtol=KERNEL_RTOL)
    with pytest.raises(ValueError, match="columns must lie in"):
        solver.csr_matmul(indptr, cols, vals, w[:int(cols.max())])
    with pytest.raises(TypeError, match="int64"):
        solver.csr_matmul(indptr.astype(np.int32), cols, vals, w)


def _problem(rng, lam=0.3, B=7, F=11, C=3):
    X = _random_csr(rng, B, F)
    return solver.Problem(X, rng.integers(0, C, B), C, F, lam), X


def _dense(X, n_features):
    """CSR -> dense float64 torch tensor [B, F]."""
    indptr, cols, vals = X
    dense = torch.zeros(len(indptr) - 1, n_features, dtype=torch.float64)
    for i in range(len(indptr) - 1):
        dense[i, cols[indptr[i]:indptr[i + 1]]] = torch.from_numpy(vals[indptr[i]:indptr[i + 1]])
    return dense


def _torch_loss(dense, y, lam, theta):
    """The same loss in torch float64 from a dense X [B, F], theta [F+1, C]: the independent reference."""
    logits = dense @ theta[:-1] + theta[-1]
    return torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)) + 0.5 * lam * (theta[:-1] ** 2).sum()


def test_loss_gradient_and_hvp_match_torch_and_finite_differences():
    rng = np.random.default_rng(0)
    prob, X = _problem(rng)
    theta, v = rng.standard_normal((12, 3)), rng.standard_normal((12, 3))
    loss, g, P = prob.loss_grad(theta)
    hv = prob.hvp(P, v)

    t = torch.tensor(theta, requires_grad=True)
    tl = _torch_loss(_dense(X, 11), prob.y, 0.3, t)
    (tg,) = torch.autograd.grad(tl, t, create_graph=True)
    (thv,) = torch.autograd.grad((tg * torch.from_numpy(v)).sum(), t)
    print("grad ours ", g.ravel()[:4], "\ngrad torch", tg.detach().numpy().ravel()[:4])
    np.testing.assert_allclose(loss, tl.item(), atol=GRAD_ATOL, rtol=GRAD_RTOL)
    np.testing.assert_allclose(g, tg.detach().numpy(), atol=GRAD_ATOL, rtol=GRAD_RTOL)
    np.testing.assert_allclose(hv, thv.numpy(), atol=GRAD_ATOL, rtol=GRAD_RTOL)
    np.testing.assert_allclose(g, numeric_grad(prob.loss, theta), atol=FD_ATOL, rtol=FD_RTOL)
    np.testing.assert_allclose(hv, numeric_grad(lambda th: float((prob.loss_grad(th)[1] * v).sum()), theta),
                               atol=FD_ATOL, rtol=FD_RTOL)


def test_newton_cg_reaches_the_torch_lbfgs_optimum():
    rng = np.random.default_rng(1)
    prob, X = _problem(rng, lam=0.05, B=40, F=15, C=4)
    theta, info = solver.newton_cg(prob, np.zeros((16, 4)), max_newton=50, tol=1e-10)

    dense = _dense(X, 15)
    t = torch.zeros(16, 4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([t], lr=1.0, max_iter=2000, tolerance_grad=1e-12, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _torch_loss(dense, prob.y, 0.05, t)
        loss.backward()
        return loss
    opt.step(closure)
    ref = t.detach().numpy()
    ref = ref - ref[-1].mean() * np.eye(16)[-1][:, None]              # the bias is defined up to a constant
    ours = theta - theta[-1].mean() * np.eye(16)[-1][:, None]
    print("ours ", ours.ravel()[:4], "\ntorch", ref.ravel()[:4], "\nmax diff", np.abs(ours - ref).max())
    assert info["grad_norm"] < 1e-9
    np.testing.assert_allclose(info["loss"], _torch_loss(dense, prob.y, 0.05, t).item(), atol=SOLVER_ATOL)
    np.testing.assert_allclose(ours, ref, atol=SOLVER_ATOL)


def test_training_separates_a_toy_task_and_round_trips(tok, tmp_path):
    texts, labels = toy_task()
    m = LexicalModel.create(tok, 3, n_buckets=256, **TINY)
    m.fit(texts[:240], labels[:240], epochs=10, lr=1.0)
    acc = (m.predict_proba(texts[240:]).argmax(1) == labels[240:]).mean()
    assert acc > 0.95
    assert m.info["c"] in m.cfg.c_grid and set(m.info["holdout_accuracy"]) == set(m.cfg.c_grid)
    arrays, meta = m.state()
    assert {k: (v.dtype, v.shape) for k, v in arrays.items()} == {
        "idf": (np.float32, (256,)), "w": (np.float32, (256, 3)), "b": (np.float32, (3,))}
    back = LexicalModel.from_state(arrays, meta, tok)
    assert back.cfg == m.cfg
    np.testing.assert_array_equal(back.predict_proba(texts), m.predict_proba(texts))
    m.save(tmp_path)
    np.testing.assert_array_equal(LexicalModel.load(tmp_path, tok).predict_proba(texts), m.predict_proba(texts))
    np.testing.assert_array_equal(back.bag(["", "   "]), np.tile(m.params["b"], (2, 1)))  # empty text: the bias


def test_fit_is_deterministic_given_the_seed(tok):
    texts, labels = toy_task(120)
    fit = lambda seed: LexicalModel.create(tok, 3, n_buckets=128, **TINY).fit(texts, labels, seed=seed)  # noqa: E731
    a, b = fit(0), fit(0)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    fit_rows, val_rows = lexical.holdout_split(labels, 0.15, seed=0)
    assert sorted([*fit_rows, *val_rows]) == list(range(120)) and np.bincount(labels[val_rows]).tolist() == [6] * 3
    assert not np.array_equal(val_rows, lexical.holdout_split(labels, 0.15, seed=1)[1])  # the seed moves it


def test_flops_by_hand(tok):
    m = LexicalModel.create(tok, 4, n_buckets=64, **TINY)
    offsets, _ = m.bags(["w1 w2 w3", ""])
    per = lexical.HASH_OPS + lexical.WEIGHT_OPS + 2 * 4
    tail = 1 + 4 + lexical.SOFTMAX_FLOPS_PER_ELEM * 4
    assert m.flops(offsets).tolist() == [8 * per + tail, tail]


def test_bad_input(tok):
    m = LexicalModel.create(tok, 2, n_buckets=16)
    with pytest.raises(ValueError, match="3 texts but 2 labels"):
        m.fit(["a", "b", "c"], [0, 1])
    with pytest.raises(ValueError, match="labels must lie in 0..1"):
        m.fit(["a", "b"], [0, 5])
    with pytest.raises(ValueError, match="labels must lie in 0..1"):
        m.fit(["a", "b"], [-1, 0])
    arrays, meta = m.state()
    with pytest.raises(ValueError, match="'w' should be float32"):
        LexicalModel.from_state(dict(arrays, w=arrays["w"][:8]), meta, tok)
    with pytest.raises(ValueError, match="'idf' should be float32"):
        LexicalModel.from_state(dict(arrays, idf=arrays["idf"].astype(np.float64)), meta, tok)
    with pytest.raises(ValueError, match="earlier embedding-bag"):
        old_meta = dict(meta, config=dict(meta["config"], dim=2))
        LexicalModel.from_state({"table": np.zeros((4, 2), np.float32)}, old_meta, tok)
