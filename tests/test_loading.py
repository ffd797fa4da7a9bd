"""Bad files and bad text: every failure names the problem, every odd text still encodes."""
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from minislm.encoder.config import ConfigError
from minislm.experts import load_expert
from minislm.encoder.folder import WeightsError, load_folder
from tests.model_folders import make_tiny_folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bert")
    make_tiny_folder(path, "bert")
    return path


@pytest.fixture
def copy(tiny_bert, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_bert, dst)
    return dst


def test_truncated_safetensors(copy):
    f = copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(WeightsError, match="not a readable safetensors file.*truncated or corrupt"):
        load_folder(copy)


def test_garbage_safetensors(copy):
    (copy / "model.safetensors").write_bytes(b"\x00\x01 this is not a safetensors file" * 10)
    with pytest.raises(WeightsError, match="model.safetensors is not a readable safetensors file"):
        load_folder(copy)


def edit_weights(folder, change):
    """Apply change(params) to a copied folder's model.safetensors and write it back -> the file."""
    f = folder / "model.safetensors"
    params = load_file(f)
    change(params)
    save_file(params, f)
    return f


def test_wrong_shape_names_file_tensor_and_shapes(copy):
    f = edit_weights(copy, lambda p: p.update({"encoder.layer.1.intermediate.dense.weight":
                                               np.zeros((80, 47), dtype=np.float32)}))
    with pytest.raises(WeightsError) as e:
        load_folder(copy)
    msg = str(e.value)
    assert str(f) in msg and "encoder.layer.1.intermediate.dense.weight" in msg
    assert "(80, 47)" in msg and "expected (80, 48)" in msg


def test_wrong_dtype(copy):
    edit_weights(copy, lambda p: p.update({"embeddings.LayerNorm.bias": p["embeddings.LayerNorm.bias"].astype(np.float16)}))
    with pytest.raises(WeightsError, match="'embeddings.LayerNorm.bias' has dtype F16, expected F32"):
        load_folder(copy)


def test_missing_tensor(copy):
    edit_weights(copy, lambda p: p.pop("encoder.layer.2.output.dense.bias"))
    with pytest.raises(WeightsError, match="missing tensor 'encoder.layer.2.output.dense.bias'"):
        load_folder(copy)


def test_position_ids_and_pooler_are_ignored(copy):
    edit_weights(copy, lambda p: p.update({"embeddings.position_ids": np.arange(72, dtype=np.int64)[None]}))
    hf = load_folder(copy)
    assert "embeddings.position_ids" in hf.ignored and "pooler.dense.weight" in hf.ignored
    assert "embeddings.position_ids" not in hf.params


def test_missing_tokenizer_json(copy):
    (copy / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        load_expert(str(copy))


def test_corrupt_tokenizer_json(copy):
    (copy / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        load_expert(str(copy))


def test_unknown_model_type(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unknown model_type 'gpt2'.*'bert' or 'mpnet'"):
        load_folder(copy)


def test_config_not_json(copy):
    (copy / "config.json").write_text("model_type: bert")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        load_folder(copy)


def test_not_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a known expert"):
        load_expert(str(tmp_path / "nowhere"))


ODD_TEXTS = [
    "",
    "   \t\n  ",
    "news " * 20_000,  # 100,000 characters
    "a" * 100_000,  # one 100,000-character word: WordPiece gives it a single [UNK]
    "nul\x00byte and \x07 bell \x1b[31m escape",
    "emoji 😀🚀👩‍👩‍👧 and flags 🇹🇼",
    "中文文本，日本語のテキスト，한국어",
    "\ud800 lone surrogate".encode("utf-8", "replace").decode("utf-8"),
]


@pytest.mark.experts
@pytest.mark.parametrize("name", ["all-MiniLM-L6-v2", "all-mpnet-base-v2"])
def test_odd_texts_encode_and_long_text_is_truncated(name):
    expert = load_expert(name)
    ids, mask = expert.tokenizer.encode_batch(ODD_TEXTS)
    assert ids.shape[0] == len(ODD_TEXTS)
    assert ids.shape[1] == expert.config.max_tokens  # the 100,000-character texts were cut to the limit
    lengths = mask.sum(axis=1)
    assert lengths[0] == 2 and lengths[1] == 2  # empty and blank text: just the two special tokens
    assert lengths[2] == expert.config.max_tokens and lengths[3] == 3
    last = ids[2, expert.config.max_tokens - 1]
    assert last == ids[0, 1]  # the closing special token survives truncation
    vecs = expert.embed(ODD_TEXTS, max_len=64)
    assert vecs.shape == (len(ODD_TEXTS), expert.config.hidden) and np.isfinite(vecs).all()


def test_texts_must_be_strings(tiny_bert):
    expert = load_expert(str(tiny_bert))
    with pytest.raises(TypeError, match="text 1 is a int"):
        expert.tokenizer.encode_batch(["ok", 3])
    with pytest.raises(TypeError, match="wrap a single text"):
        expert.tokenizer.encode_batch("a single string")
