"""The whole encoder's backward against transformers' autograd, for every parameter.

The loss reads several hidden states at once (every layer pooled both ways, the last one token by token), as
the heads do, so every path of encoder_backward is taken: gradients entering at several layers, the sparse
word rows, the token types (BERT) and the relative-position bias table shared by all layers (MPNet). Ours run
in float32, transformers in float64 on the same weights.
"""
import numpy as np
import pytest
import torch

from minislm.encoder.backward import SparseRows, encoder_backward, encoder_params, kept_bytes, lowest_layer
from minislm.encoder.folder import expected_shapes, load_folder
from minislm.encoder.model import Encoder
from minislm.encoder.pooling import pool_layers_backward
from tests.model_folders import make_tiny_folder
from tests.test_encoder import padded_ids
from tests.tolerances import BACKWARD_KERNEL_ATOL, BACKWARD_KERNEL_RTOL, ENCODER_GRAD_ATOL, ENCODER_GRAD_RTOL


@pytest.fixture(scope="module", params=("bert", "mpnet"))
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"tiny-bw-{request.param}")
    model = make_tiny_folder(path, request.param)
    hf = load_folder(path)
    return hf.config, Encoder.from_params(hf.config, hf.params), model.double()


def loss_weights(cfg, mask, seed=0):
    """Random weights of the test's loss: W [B, L+1, 2H] on the pooled layers, R [B, T, H] on the last layer's
    real tokens."""
    rng = np.random.default_rng(seed)
    B, T = mask.shape
    W = rng.standard_normal((B, cfg.n_layers + 1, 2 * cfg.hidden))
    R = rng.standard_normal((B, T, cfg.hidden)) * mask[:, :, None]
    return W, R


def ours(enc, ids, mask, W, R, names, keep=True):
    hidden, caches = enc.forward(ids, mask, keep=keep)
    d_hidden = pool_layers_backward(W.astype(np.float32), mask)
    d_hidden[enc.config.n_layers] += R.astype(np.float32)
    return encoder_backward(enc, ids, mask, caches, d_hidden, names)


def torch_grads(model, ids, mask, W, R):
    """The same loss through transformers in float64 -> {name: gradient} of every encoder parameter."""
    m = torch.from_numpy(mask.astype(np.float64))[:, :, None]
    out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                output_hidden_states=True)
    loss = (out.hidden_states[-1] * torch.from_numpy(R)).sum()
    for layer, h in enumerate(out.hidden_states):
        mean = (h * m).sum(1) / m.sum(1).clamp(min=1)
        pooled = torch.cat([mean, h[:, 0]], dim=-1)
        loss = loss + (pooled * torch.from_numpy(W[:, layer])).sum()
    model.zero_grad()
    loss.backward()
    return {n: p.grad.numpy().copy() for n, p in model.named_parameters() if not n.startswith("pooler.")}


def assert_grads_close(got, want, what):
    top = max(np.abs(g).max() for g in want.values())
    for name, w in want.items():
        g = got[name].dense(w.shape[0]) if isinstance(got[name], SparseRows) else got[name]
        diff = np.abs(g - w)
        worst = np.unravel_index(np.argmax(diff), diff.shape)
        assert np.all(diff <= ENCODER_GRAD_ATOL * top + ENCODER_GRAD_RTOL * np.abs(w)), (
            f"{what} {name}: got {g.ravel()[:3]}, want {w.ravel()[:3]}, max |diff| {diff.max():.3g} at {worst} "
            f"(largest gradient {top:.3g})")


@pytest.mark.parametrize("lengths", [[9, 4, 13], [1, 6]])
def test_every_parameter_matches_autograd(tiny, lengths):
    cfg, enc, model = tiny
    ids, mask = padded_ids(cfg.pad_id, lengths)
    W, R = loss_weights(cfg, mask)
    want = torch_grads(model, ids, mask, W, R)
    assert set(want) == set(expected_shapes(cfg))
    got = ours(enc, ids, mask, W, R, want)
    assert set(got) == set(want)
    assert_grads_close(got, want, cfg.family)
    word = got["embeddings.word_embeddings.weight"]
    np.testing.assert_array_equal(word.ids, np.unique(ids))  # the rows the batch read, and only those


def test_top_layers_alone_keep_one_layer_and_give_the_same_gradients(tiny):
    cfg, enc, model = tiny
    ids, mask = padded_ids(cfg.pad_id, [7, 12])
    W, R = loss_weights(cfg, mask, seed=1)
    top = cfg.n_layers - 1
    names = [n for n in expected_shapes(cfg) if n.startswith(f"encoder.layer.{top}.")]
    assert lowest_layer(names) == top
    hidden, caches = enc.forward(ids, mask, keep={top})
    assert [c is None for c in caches] == [True] * top + [False]
    got = ours(enc, ids, mask, W, R, names, keep={top})
    full = ours(enc, ids, mask, W, R, expected_shapes(cfg))
    assert set(got) == set(names)
    # Layers that are not kept run GELU fused into their matmul's epilogue, which may round the last bit
    # differently from the kept layers' separate GELU: the top layer then sees inputs equal to ~1 ulp, an error
    # that scales with the tensor's gradients, so the absolute tolerance is relative to the largest of them.
    for name in names:
        scale = max(1.0, float(np.abs(full[name]).max()))
        np.testing.assert_allclose(got[name], full[name], rtol=BACKWARD_KERNEL_RTOL,
                                   atol=BACKWARD_KERNEL_ATOL * scale, err_msg=name)
    with pytest.raises(ValueError, match="not kept"):
        encoder_backward(enc, ids, mask, caches, {cfg.n_layers: R.astype(np.float32)}, names[:1] + [
            "embeddings.LayerNorm.weight"])


def test_unknown_names_and_empty_sets_are_refused(tiny):
    cfg, enc, _ = tiny
    ids, mask = padded_ids(cfg.pad_id, [3])
    hidden, caches = enc.forward(ids, mask, keep=True)
    with pytest.raises(ValueError, match="not a tensor"):
        encoder_backward(enc, ids, mask, caches, {}, ["encoder.layer.0.query.weight"])
    with pytest.raises(ValueError, match="nothing to train"):
        encoder_backward(enc, ids, mask, caches, {}, [])


def test_encoder_params_round_trip(tiny):
    cfg, enc, model = tiny
    params = encoder_params(enc)
    for name, p in model.named_parameters():
        if not name.startswith("pooler."):
            np.testing.assert_array_equal(params[name], p.detach().numpy().astype(np.float32), err_msg=name)
    rebuilt = Encoder.from_params(cfg, params)
    ids, mask = padded_ids(cfg.pad_id, [5, 2])
    np.testing.assert_array_equal(rebuilt.forward(ids, mask), enc.forward(ids, mask))


def test_kept_bytes_of_the_docstring():
    from minislm.encoder.config import EncoderConfig

    l6 = EncoderConfig("bert", 30522, 384, 6, 12, 1536, 512, 2, 1e-12, 0)
    assert kept_bytes(l6, 32, 128, 1) == 69_206_016  # 7 M H + M F floats, M = 4096
    mpnet = EncoderConfig("mpnet", 30527, 768, 12, 12, 3072, 514, 0, 1e-5, 1, 32)
    assert kept_bytes(mpnet, 32, 128, 12) == 1_660_944_384


@pytest.mark.experts
def test_real_expert_on_a_padded_batch():
    from transformers import AutoModel

    from minislm.experts import load_expert

    expert = load_expert("paraphrase-MiniLM-L3-v2")
    texts = ["A short one.", "The film was long, slow and in the end rather moving.", "Great!"]
    ids, mask = expert.tokenizer.encode_batch(texts)
    model = AutoModel.from_pretrained(expert.folder, attn_implementation="eager", dtype=torch.float64).eval()
    W, R = loss_weights(expert.config, mask, seed=2)
    want = torch_grads(model, ids, mask, W, R)
    got = ours(expert.encoder, ids, mask, W, R, want)
    assert_grads_close(got, want, expert.name)
