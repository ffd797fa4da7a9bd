"""Adapting an expert: LoRA, top-k and full fine-tuning on tiny random models, against torch where it has one.

    LoRA merged (W + s B A packed) runs the same function as LoRA unmerged, and its gradients are the
    full-weight gradients projected (dB = s dW A^T, dA = s B^T dW, checked through the tested encoder_backward)
    a 20-step full fine-tuning run follows torch's loss trajectory (same weights, batches and AdamW settings)
    top-k with the frozen layers cached on disk trains the same weights as without the cache
    a run interrupted and resumed ends with the same weights as one never interrupted
    deltas re-apply exactly, and refuse other base weights; head + tail truncation keeps the right tokens
"""
import numpy as np
import pytest
import torch

from minislm.collab import heads
from minislm.collab.optim import leaves
from minislm.encoder.backward import encoder_backward, encoder_params
from minislm.experts import adapt, load_expert
from minislm.team.finetune import FinetuneConfig, finetune, learning_rate, length_sorted_batches
from tests.model_folders import make_tiny_folder, reference_model
from tests.test_encoder import padded_ids
from tests.tolerances import ENCODER_ATOL, ENCODER_GRAD_ATOL, ENCODER_GRAD_RTOL, FLOAT16_CACHE_RTOL, TRAJECTORY_RTOL


@pytest.fixture(scope="module", params=("bert", "mpnet"))
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"tiny-adapt-{request.param}")
    make_tiny_folder(path, request.param)
    return path, load_expert(str(path))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-adapt-bert-only")
    make_tiny_folder(path, "bert")
    return path, load_expert(str(path))


def toy_task(n=40, seed=0):
    """Texts of 3..19 words whose class is the half of the vocabulary they are drawn from."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    texts = [" ".join(f"w{rng.integers(0, 50) + 50 * c}" for _ in range(rng.integers(3, 20))) for c in y]
    return texts, y


def lora_with_nonzero_b(expert, seed=1):
    lora = adapt.LoRA(expert, rank=3, alpha=6.0, dropout=0.0, ffn=True, seed=seed)
    rng = np.random.default_rng(seed)
    for name, p in lora.params.items():
        if name.endswith("lora_B"):
            p[...] = rng.standard_normal(p.shape) * 0.2  # B starts at 0: make the branches do something
    return lora


def test_lora_merged_equals_unmerged(tiny):
    _, expert = tiny
    lora = lora_with_nonzero_b(expert)
    ids, mask = padded_ids(expert.config.pad_id, [11, 4, 7])
    unmerged, _ = lora.forward(ids, mask, keep=())
    merged = lora.encoder().forward(ids, mask)
    base = expert.encoder.forward(ids, mask)
    L = expert.config.n_layers
    for b, n in enumerate([11, 4, 7]):
        np.testing.assert_allclose(merged[L, b, :n], unmerged[L][b, :n], atol=ENCODER_ATOL, rtol=0)
    assert np.abs(merged[L] - base[L]).max() > 100 * ENCODER_ATOL  # the branches changed the function


def test_lora_gradients_are_the_merged_weights_gradients_projected(tiny):
    _, expert = tiny
    cfg = expert.config
    lora = lora_with_nonzero_b(expert, seed=2)
    ids, mask = padded_ids(cfg.pad_id, [9, 5])
    R = {cfg.n_layers: (np.random.default_rng(0).standard_normal((2, 9, cfg.hidden)) * mask[:, :, None])
         .astype(np.float32)}
    _, state = lora.forward(ids, mask)
    got = lora.backward(state, R)
    assert set(got) == set(lora.params)
    merged = lora.encoder()
    hidden, caches = merged.forward(ids, mask, keep=True)
    weights = [n for layer in lora.adapters for a in layer.values() for n in a.names]
    dW = encoder_backward(merged, ids, mask, caches, R, [n + ".weight" for n in weights])
    want = {}
    for layer in lora.adapters:
        for a in layer.values():
            for name, A, B in zip(a.names, a.A, a.B):
                want[name + ".lora_B"] = a.scale * dW[name + ".weight"] @ A.T
                want[name + ".lora_A"] = a.scale * B.T @ dW[name + ".weight"]
    top = max(np.abs(w).max() for w in want.values())
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, atol=ENCODER_GRAD_ATOL * top, rtol=ENCODER_GRAD_RTOL, err_msg=name)


def test_lora_gradients_match_torch_autograd(tiny):
    # the same branches hooked onto transformers' Linears: x -> W x + b + s (x A^T) B^T, loss = <R, h_L>
    path, expert = tiny
    cfg = expert.config
    lora = lora_with_nonzero_b(expert, seed=4)
    ids, mask = padded_ids(cfg.pad_id, [9, 5, 7])
    R = (np.random.default_rng(1).standard_normal((3, 9, cfg.hidden)) * mask[:, :, None]).astype(np.float32)
    _, state = lora.forward(ids, mask)
    got = lora.backward(state, {cfg.n_layers: R})

    model = reference_model(path, cfg.family)
    tensors = {}
    for layer in lora.adapters:
        for a in layer.values():
            for name, A, B in zip(a.names, a.A, a.B):
                tA = torch.tensor(A, dtype=torch.float64, requires_grad=True)
                tB = torch.tensor(B, dtype=torch.float64, requires_grad=True)
                tensors[name] = (tA, tB)
                model.get_submodule(name).register_forward_hook(
                    lambda mod, inp, out, tA=tA, tB=tB, s=float(a.scale): out + s * (inp[0] @ tA.T) @ tB.T)
    model = model.double()
    h = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask.astype(np.int64)))[0]
    (h * torch.from_numpy(R).double()).sum().backward()
    for name, (tA, tB) in tensors.items():
        for suffix, t in ((".lora_A", tA), (".lora_B", tB)):
            want = t.grad.numpy()
            np.testing.assert_allclose(got[name + suffix], want, rtol=ENCODER_GRAD_RTOL,
                                       atol=ENCODER_GRAD_ATOL * np.abs(want).max(), err_msg=name + suffix)


def test_full_finetuning_follows_torch_loss_trajectory(tiny_bert):
    path, expert = tiny_bert
    texts, y = toy_task(40)
    cfg = FinetuneConfig(method="full", lr=3e-3, head_lr=3e-3, epochs=4, batch_size=8, warmup=0.2, clip=1.0,
                         weight_decay=0.01, patience=10, seed=3)
    ours = finetune(expert, texts, y, texts[:4], y[:4], cfg, progress=False, log=lambda s: None)
    assert len(ours.losses) == 20

    model = reference_model(path, "bert")  # eval: no dropout, as ours
    head = torch.nn.Linear(expert.config.hidden, 2)
    h0 = heads.init(np.random.default_rng(cfg.seed), expert.config.hidden, 2)  # the same draw as finetune's head
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(h0["out"]["w"]))
        head.bias.copy_(torch.from_numpy(h0["out"]["b"]))
    params = [p for n, p in model.named_parameters() if not n.startswith("pooler.")] + list(head.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=cfg.lr)
    rows = expert.tokenizer.encode(texts, cfg.max_len)
    batches = length_sorted_batches([len(r) for r in rows], cfg.batch_size)
    total, theirs, step = cfg.epochs * len(batches), [], 0
    for epoch in range(cfg.epochs):
        for j in np.random.default_rng([cfg.seed, epoch]).permutation(len(batches)):
            ids, mask = expert.tokenizer.pad([rows[i] for i in batches[j]])
            m = torch.from_numpy(mask.astype(np.float32))[:, :, None]
            h = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask.astype(np.int64)))[0]
            loss = torch.nn.functional.cross_entropy(head((h * m).sum(1) / m.sum(1).clamp(min=1)),
                                                     torch.from_numpy(y[batches[j]]))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            for g in opt.param_groups:
                g["lr"] = learning_rate(step, total, cfg.lr, int(round(cfg.warmup * total)), cfg.schedule)
            opt.step()
            theirs.append(loss.item())
            step += 1
    print("step  ours      torch")
    for s in (0, 1, 5, 10, 19):
        print(f"{s:4d}  {ours.losses[s]:.6f}  {theirs[s]:.6f}")
    assert theirs[-1] < theirs[0] - 0.05  # the run learns something, so following it means something
    np.testing.assert_allclose(ours.losses, theirs, rtol=TRAJECTORY_RTOL)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_top_k_with_the_disk_cache_equals_top_k_without(tiny, tmp_path, dtype):
    _, expert = tiny
    texts, y = toy_task(24)
    cfg = FinetuneConfig(method="topk", top_k=1, pooling="mix", epochs=2, batch_size=8, lr=3e-3, seed=1,
                         cache_dtype=dtype)
    quiet = dict(progress=False, log=lambda s: None)
    cached = finetune(expert, texts, y, texts[:4], y[:4], cfg, work_dir=tmp_path, **quiet)
    assert len(list(tmp_path.glob("topk-*/done.json"))) == 1
    plain = finetune(expert, texts, y, texts[:4], y[:4], cfg, work_dir=None, **quiet)
    base = encoder_params(expert.encoder)
    pairs = list(zip(leaves(cached.adaptation.params), leaves(plain.adaptation.params)))
    if dtype == "float32":  # the same batches through the same layers: the same floats
        for (name, a), (_, b) in pairs:
            np.testing.assert_array_equal(a, b, err_msg=name)
    else:  # rounded inputs: the same training, up to a small part of how far it moved the weights (all tensors
        # together: a key bias's true gradient is 0, so Adam's steps on it are float noise either way)
        change = np.sqrt(sum(np.sum((b - base[name]) ** 2) for (name, _), (_, b) in pairs))
        diff = np.sqrt(sum(np.sum((a - b) ** 2) for (_, a), (_, b) in pairs))
        assert change > 0 and diff <= FLOAT16_CACHE_RTOL * change, (diff, change)
    assert set(cached.adaptation.params) == set(adapt.top_layer_names(expert.config, 1))


def test_resume_after_an_interruption_gives_the_same_weights(tiny_bert, tmp_path):
    _, expert = tiny_bert
    texts, y = toy_task(24, seed=5)
    cfg = FinetuneConfig(method="lora", dropout=0.2, epochs=3, batch_size=8, checkpoint_every=2, seed=4,
                         head_dropout=0.1, head_hidden=16)
    quiet = dict(progress=False, log=lambda s: None)
    whole = finetune(expert, texts, y, texts[:6], y[:6], cfg, work_dir=tmp_path / "a", **quiet)
    first = finetune(expert, texts, y, texts[:6], y[:6], cfg, work_dir=tmp_path / "b", max_steps=5, **quiet)
    assert not first.finished and first.steps == 5
    rest = finetune(expert, texts, y, texts[:6], y[:6], cfg, work_dir=tmp_path / "b", **quiet)
    assert rest.finished and rest.steps == whole.steps == 9
    assert rest.losses == whole.losses
    for (name, a), (_, b) in zip(leaves({"e": whole.adaptation.params, "h": whole.head}),
                                 leaves({"e": rest.adaptation.params, "h": rest.head})):
        np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("method", ["lora", "topk", "full"])
def test_delta_applies_exactly_and_only_to_its_base(tiny, method, tmp_path):
    path, expert = tiny
    adaptation = lora_with_nonzero_b(expert) if method == "lora" else adapt.make(expert, method, top_k=1)
    if method != "lora":
        for p in adaptation.params.values():
            p += 0.01
        adaptation.after_step()
    arrays, meta = adaptation.delta()
    if method == "topk":
        assert all(n.startswith(f"encoder.layer.{expert.config.n_layers - 1}.") for n in arrays)
    ids, mask = padded_ids(expert.config.pad_id, [6, 3])
    applied = adapt.apply(expert, arrays, meta)
    np.testing.assert_array_equal(applied.encoder.forward(ids, mask), adaptation.encoder().forward(ids, mask))
    assert applied.weights_sha256 != expert.weights_sha256
    with pytest.raises(ValueError, match="trained on weights"):
        adapt.apply(expert, arrays, dict(meta, base_sha256="0" * 64))
    arrays[next(iter(arrays))] = arrays[next(iter(arrays))] + 1
    with pytest.raises(ValueError, match="corrupt"):
        adapt.apply(expert, arrays, meta)


def test_head_tail_truncation_keeps_the_specials_and_the_right_tokens(tiny):
    _, expert = tiny
    tok = expert.tokenizer
    text = " ".join(f"w{i}" for i in range(40))
    full = tok.encode([text], 512)[0]                              # [first] w0 .. w39 [last], one id a word
    first, words, last = full[0], full[1:-1], full[-1]
    got = tok.encode([text], 12, head=3)[0]
    assert got == [first] + words[:3] + words[-7:] + [last]        # head 3, tail 12 - 2 - 3
    assert tok.encode([text], 12, head=10)[0] == tok.encode([text], 12)[0]  # all head: plain truncation
    assert tok.encode([text], 12, head=0)[0] == [first] + words[-10:] + [last]
    assert tok.encode(["w1 w2"], 12, head=3)[0] == tok.encode(["w1 w2"], 12)[0]  # short texts untouched
    with pytest.raises(ValueError, match="head=11"):
        tok.encode([text], 12, head=11)
