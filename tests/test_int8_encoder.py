"""int8 encoders end to end: the encoder on Int8Weights against a plain NumPy forward with the same quantization
arithmetic, its fidelity to float32 on the real experts, and the int8 folder `python -m minislm.weights quantize`
writes (round trip, size, integrity)."""
import json
import os
import shutil

import numpy as np
import pytest

from minislm import weights as weights_cli
from minislm.encoder import quantize
from minislm.encoder.folder import attention_names, load_folder
from minislm.encoder.model import (Encoder, Workspace, additive_mask, layer_forward, position_ids,
                                   relative_position_bias)
from minislm.experts import load_expert, quantized, registry
from minislm.kernels import gelu
from minislm.kernels.activations import gelu_reference
from minislm.kernels.attention import attention_reference
from minislm.kernels.int8 import Int8Weight, linear_int8_reference, quantize_weight
from minislm.kernels.norm import layer_norm_reference
from tests.model_folders import make_tiny_folder
from tests.test_encoder import padded_ids
from tests.tolerances import INT8_COSINE_MEAN, INT8_COSINE_MIN, INT8_REFERENCE_COSINE

FAMILIES = ("bert", "mpnet")
TEXTS = ["Oil prices climb as supply worries grow in Asia.", "Go!",
         "The striker scored twice as the home side won the cup final after extra time.",
         "Stocks rallied on Wall Street as investors cheered strong quarterly earnings from chip makers.",
         "NASA launches a probe to study the clouds of Venus, scientists said on Tuesday.",
         "The central bank raised interest rates by a quarter point, citing inflation in services.",
         "Rebels and government troops agreed to a ceasefire after talks brokered by neighbouring states.",
         "A new smartphone chip promises twice the battery life, the company claimed at its developer event."]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"tiny8-{request.param}")
    make_tiny_folder(path, request.param)
    return request.param, path


# The float32 operations around the int8 linears, in plain NumPy.
NUMPY_OPS = {"attention": attention_reference, "layer_norm": layer_norm_reference, "gelu": gelu_reference}


def reference_int8_forward(cfg, params, ids, mask, ops=NUMPY_OPS):
    """ids [B, T], mask [B, T] -> hidden states [L+1, B, T, H]: BERT / MPNet written out from the Hugging Face
    tensors, every Linear through linear_int8_reference on quantize_weight of its float32 weight, the rest `ops`."""
    B, T = ids.shape
    M, H = B * T, cfg.hidden
    extra = params["embeddings.position_embeddings.weight"][position_ids(cfg, ids)]
    if cfg.family == "bert":
        extra = extra + params["embeddings.token_type_embeddings.weight"][0]
    x = ops["layer_norm"](params["embeddings.word_embeddings.weight"][ids].reshape(M, H),
                          params["embeddings.LayerNorm.weight"], params["embeddings.LayerNorm.bias"],
                          cfg.layer_norm_eps, residual=np.ascontiguousarray(extra.reshape(M, H)))
    pos_bias = (relative_position_bias(cfg, params["encoder.relative_attention_bias.weight"], T)
                if cfg.family == "mpnet" else None)
    hidden = [x]
    for i in range(cfg.n_layers):
        a, p = attention_names(cfg, i), f"encoder.layer.{i}."

        def lin(inp, name):
            return linear_int8_reference(inp, quantize_weight(params[name + ".weight"]), params[name + ".bias"])

        w_qkv = np.concatenate([params[a[k] + ".weight"] for k in ("query", "key", "value")])
        b_qkv = np.concatenate([params[a[k] + ".bias"] for k in ("query", "key", "value")])
        qkv = linear_int8_reference(x, quantize_weight(w_qkv), b_qkv)
        ctx = ops["attention"](qkv.reshape(B, T, 3 * H), additive_mask(mask), cfg.n_heads, pos_bias).reshape(M, H)
        a1 = ops["layer_norm"](lin(ctx, a["out"]), params[a["ln"] + ".weight"], params[a["ln"] + ".bias"],
                               cfg.layer_norm_eps, residual=x)
        f = lin(ops["gelu"](lin(a1, p + "intermediate.dense")), p + "output.dense")
        x = ops["layer_norm"](f, params[p + "output.LayerNorm.weight"], params[p + "output.LayerNorm.bias"],
                              cfg.layer_norm_eps, residual=a1)
        hidden.append(x)
    return np.stack(hidden).reshape(cfg.n_layers + 1, B, T, H)


@pytest.mark.parametrize("lengths", [[1], [9], [5, 17, 2, 17], [64, 3], [40] * 8])
def test_int8_encoder_matches_the_numpy_reference(tiny, lengths):
    """Each linear of each layer, on the inputs the layer gave it, equals linear_int8_reference bit for bit (keep=True
    leaves GELU unfused, so its input is seen; the fused epilogue's GELU is test_int8.py's). The
    whole forward against the NumPy forward keeps every token's cosine >= INT8_REFERENCE_COSINE: NumPy's
    attention, layer norm and GELU round differently in their last bits, and where that moves an activation
    across a rounding boundary its 8-bit code differs by one (measured 1 - 3e-4 at worst, MPNet 8 x 40)."""
    family, path = tiny
    hf = load_folder(path)
    cfg, params = hf.config, hf.params
    enc8 = quantize.quantize_encoder(Encoder.from_params(cfg, params))
    assert enc8.precision == "int8" and all(isinstance(getattr(lw, f), Int8Weight)
                                            for lw in enc8.layers for f in quantize.LINEAR_FIELDS)
    ids, mask = padded_ids(cfg.pad_id, lengths, seed=1)
    got = enc8.forward(ids, mask)
    B, T = ids.shape
    pos_bias = (relative_position_bias(cfg, params["encoder.relative_attention_bias.weight"], T)
                if family == "mpnet" else None)
    ws = Workspace.allocate(cfg, B, T)
    for i, lw in enumerate(enc8.layers):
        c = layer_forward(cfg, lw, got[i], additive_mask(mask), pos_bias, np.empty_like(got[i]), ws, keep=True)
        a, p = attention_names(cfg, i), f"encoder.layer.{i}."

        def ref(inp, names):
            w8 = quantize_weight(np.concatenate([params[n + ".weight"] for n in names]))
            return linear_int8_reference(inp, w8, np.concatenate([params[n + ".bias"] for n in names]))

        np.testing.assert_array_equal(c["qkv"], ref(c["x"], [a[k] for k in ("query", "key", "value")]))
        np.testing.assert_array_equal(c["proj"], ref(c["ctx"], [a["out"]]))
        np.testing.assert_array_equal(c["ffn_pre"], ref(c["a"], [p + "intermediate.dense"]))
        np.testing.assert_array_equal(c["f"], ref(gelu(c["ffn_pre"]), [p + "output.dense"]))
    want = reference_int8_forward(cfg, params, ids, mask)
    _, low = quantize.hidden_cosines(want, got, mask)
    print(f"{family} {lengths}: last layer, first values {got[-1, 0, 0, :4]} vs NumPy {want[-1, 0, 0, :4]}; lowest "
          f"token cosine per hidden state {np.round(low, 6)}")
    assert low.min() >= INT8_REFERENCE_COSINE, low
    # and int8 is not float32 in disguise: the float32 encoder is further away than any rounding
    _, low32 = quantize.hidden_cosines(Encoder.from_params(cfg, params).forward(ids, mask), got, mask)
    assert low32[-1] < low[-1]


def test_float32_encoder_is_untouched_by_quantizing(tiny):
    _, path = tiny
    hf = load_folder(path)
    enc = Encoder.from_params(hf.config, hf.params)
    ids, mask = padded_ids(hf.config.pad_id, [7, 3])
    before = enc.forward(ids, mask)
    quantize.quantize_encoder(enc)
    assert enc.precision == "float32"
    np.testing.assert_array_equal(enc.forward(ids, mask), before)


def test_int8_encoder_refuses_a_backward(tiny):
    _, path = tiny
    hf = load_folder(path)
    enc8 = quantize.quantize_encoder(Encoder.from_params(hf.config, hf.params))
    ids, mask = padded_ids(hf.config.pad_id, [4])
    with pytest.raises(ValueError, match="int8 encoder runs inference only"):
        enc8.forward(ids, mask, keep=True)


def test_int8_tensors_round_trip(tiny, tmp_path):
    _, path = tiny
    hf = load_folder(path)
    enc8 = quantize.quantize_encoder(Encoder.from_params(hf.config, hf.params))
    tensors = quantize.int8_tensors(enc8)
    assert tensors["encoder.layer.0.intermediate.dense.weight_codes"].dtype == np.int8
    assert "encoder.layer.0.intermediate.dense.weight" not in tensors
    from minislm.atomic import save_safetensors
    save_safetensors(tmp_path / "w.safetensors", tensors)
    back = quantize.encoder_from_int8_tensors(hf.config, quantize.read_int8_weights(tmp_path / "w.safetensors",
                                                                                    hf.config))
    ids, mask = padded_ids(hf.config.pad_id, [11, 5])
    np.testing.assert_array_equal(back.forward(ids, mask), enc8.forward(ids, mask))
    tensors["encoder.layer.1.output.dense.weight_codes"] = tensors["encoder.layer.1.output.dense.weight_codes"][:, :5]
    save_safetensors(tmp_path / "bad.safetensors", {k: np.ascontiguousarray(v) for k, v in tensors.items()})
    with pytest.raises(ValueError, match="output.dense.weight_codes.*quantize the expert again"):
        quantize.read_int8_weights(tmp_path / "bad.safetensors", hf.config)


@pytest.mark.experts
@pytest.mark.parametrize("name", ["paraphrase-MiniLM-L3-v2", "all-MiniLM-L6-v2"])
def test_real_expert_int8_stays_close_to_float32(name):
    """Every hidden state's token vectors keep a cosine to float32 above INT8_COSINE_MEAN on average and above
    INT8_COSINE_MIN for every token (measured: L3 mean >= 0.9993, min >= 0.998; L6 mean >= 0.997, min >= 0.987)."""
    expert = load_expert(name)
    ids, mask = expert.tokenizer.encode_batch(TEXTS)
    layers = quantize.layer_fidelity(expert.encoder, quantize.quantize_encoder(expert.encoder), ids, mask)
    print(name, "cosine mean", [round(r["cosine_mean"], 5) for r in layers],
          "min", [round(r["cosine_min"], 4) for r in layers])
    assert len(layers) == expert.config.n_layers + 1 and layers[0]["cosine_min"] > 1 - 1e-6  # embeddings: float32
    for r in layers:
        assert r["cosine_mean"] > INT8_COSINE_MEAN and r["cosine_min"] > INT8_COSINE_MIN, r


def small_store(root, tiny_path, name="paraphrase-MiniLM-L3-v2"):
    """A store holding the tiny model under a registry name, prepared (manifest) as fetch would leave it."""
    folder = root / name
    shutil.copytree(tiny_path, folder)
    registry.write_manifest(folder, name)
    return folder


def run_weights(capsys, *argv):
    code = weights_cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_quantize_command_round_trip(tiny, tmp_path, monkeypatch, capsys):
    family, path = tiny
    name = "paraphrase-MiniLM-L3-v2"
    store = tmp_path / "store"
    fp32_folder = small_store(store, path, name)
    monkeypatch.setenv("MINISLM_WEIGHTS_DIR", str(store))
    code, out, err = run_weights(capsys, "quantize", name)
    assert code == 0, err
    folder = store / f"{name}-int8"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model-int8.safetensors", "prepared.json",
                                                         "quantized.json", "tokenizer.json"]
    assert not [p for p in store.iterdir() if p.name.startswith(".")]  # assembled aside, renamed into place
    meta = json.loads((folder / "quantized.json").read_text())
    assert meta["precision"] == "int8" and meta["source"]["sha256"] == registry.sha256_of(fp32_folder / "model.safetensors")
    ratio = meta["linear_bytes"]["float32"] / meta["linear_bytes"]["int8"]
    assert 3.5 < ratio < 4.0, ratio  # 1 byte + a 4-byte scale per row of K instead of 4 bytes: K=48 gives 3.72
    manifest = registry.read_manifest(folder)
    assert set(manifest["files"]) == {"config.json", "model-int8.safetensors", "quantized.json", "tokenizer.json"}
    # loading it gives the int8 encoder, equal to quantizing in memory, with an identity of its own
    e8, fp32 = load_expert(f"{name}-int8"), load_expert(name)
    mem = quantized.int8_of(fp32)
    assert e8.precision == "int8" and e8.source_sha256 == fp32.weights_sha256
    assert e8.weights_sha256 == mem.weights_sha256 != fp32.weights_sha256
    ids, mask = padded_ids(fp32.config.pad_id, [9, 4])
    np.testing.assert_array_equal(e8.encoder.forward(ids, mask), mem.encoder.forward(ids, mask))
    assert quantized.saved_int8(name).name == f"{name}-int8"
    # a second run keeps the intact folder; verify hashes it too
    code, out, _ = run_weights(capsys, "quantize", name)
    assert code == 0 and "already written" in out
    code, out, _ = run_weights(capsys, "verify")
    assert code == 0 and f"{name}-int8" in out


def test_corrupt_int8_folder_is_one_clear_error(tiny, tmp_path, monkeypatch, capsys):
    _, path = tiny
    name = "paraphrase-MiniLM-L3-v2"
    store = tmp_path / "store"
    small_store(store, path, name)
    monkeypatch.setenv("MINISLM_WEIGHTS_DIR", str(store))
    assert run_weights(capsys, "quantize", name)[0] == 0
    weights_file = store / f"{name}-int8" / "model-int8.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[-100] ^= 0xFF  # one byte of a tensor flipped: same size, new mtime -> hashed again
    weights_file.write_bytes(bytes(data))
    with pytest.raises(registry.DamagedExpertError, match=f"int8 version of '{name}'.*sha256 differs.*"
                                                          f"python -m minislm.weights quantize {name}"):
        load_expert(f"{name}-int8")
    code, out, err = run_weights(capsys, "verify")
    assert code == 2 and "damaged" in out and f"python -m minislm.weights quantize {name}" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    # quantize repairs it
    assert run_weights(capsys, "quantize", name)[0] == 0
    assert load_expert(f"{name}-int8").precision == "int8"
    # an int8 folder made from other float32 weights is refused, naming the remedy
    with pytest.raises(registry.DamagedExpertError, match="quantized from weights .* not from 000000000000"):
        quantized.saved_int8(name, expected_sha256="0" * 64)


def test_quantize_command_errors_exit_2_without_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINISLM_WEIGHTS_DIR", str(tmp_path))
    code, _, err = run_weights(capsys, "quantize", "all-MiniLM-L6-v2")
    assert code == 2 and "not prepared" in err and "python -m minislm.weights fetch" in err
    code, _, err = run_weights(capsys, "quantize", "bert-huge")
    assert code == 2 and "unknown expert 'bert-huge'" in err
    assert "Traceback" not in err
    os.makedirs(tmp_path / "all-MiniLM-L6-v2-int8")  # a folder without its manifest
    with pytest.raises(registry.DamagedExpertError, match="no readable prepared.json"):
        registry.int8_dir("all-MiniLM-L6-v2")
