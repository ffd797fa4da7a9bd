"""Feature extraction: values, the cache key, and resuming an interrupted run."""
import json

import numpy as np
import pytest

from minislm.encoder.pooling import pool_layers
from minislm.experts import features
from minislm.experts import load_expert
from tests.model_folders import make_tiny_folder

TEXTS = [" ".join(f"w{(7 * i + k) % 100}" for k in range(i % 13 + 1)) for i in range(40)]


@pytest.fixture(scope="module")
def expert(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-mpnet")
    make_tiny_folder(path, "mpnet")
    return load_expert(str(path))


def direct(expert, texts):
    out = []
    for t in texts:
        ids, mask = expert.tokenizer.encode_batch([t], max_len=16)
        out.append(pool_layers(expert.encoder.forward(ids, mask), mask)[0])
    return np.stack(out)


def test_features_equal_each_text_alone(expert, tmp_path):
    got = features.extract(expert, TEXTS, "toy", "train", max_len=16, batch_size=8, cache_dir=tmp_path,
                           progress=False)
    assert got.shape == (40, expert.config.n_layers + 1, 2 * expert.config.hidden)
    np.testing.assert_allclose(got, direct(expert, TEXTS), atol=1e-5, rtol=0)


class Interrupt(Exception):
    pass


class Flaky:
    """An expert whose encoder fails after `fail_after` batches, counting the batches it ran."""
    def __init__(self, expert, fail_after):
        self.name, self.weights_sha256, self.tokenizer = expert.name, expert.weights_sha256, expert.tokenizer
        self.config, self.calls, self.fail_after, self.inner = expert.config, 0, fail_after, expert.encoder
        self.encoder = self

    def forward(self, ids, mask):
        if self.calls == self.fail_after:
            raise Interrupt
        self.calls += 1
        return self.inner.forward(ids, mask)


def test_interrupted_extraction_resumes(expert, tmp_path, monkeypatch):
    monkeypatch.setattr(features, "SAVE_EVERY", 2)
    flaky = Flaky(expert, fail_after=3)
    with pytest.raises(Interrupt):
        features.extract(flaky, TEXTS, "toy", "train", max_len=16, batch_size=4, cache_dir=tmp_path, progress=False)
    resumed = Flaky(expert, fail_after=-1)
    got = features.extract(resumed, TEXTS, "toy", "train", max_len=16, batch_size=4, cache_dir=tmp_path,
                           progress=False)
    assert resumed.calls == 10 - 2  # two batches were saved before the failure, the rest ran now
    np.testing.assert_allclose(got, direct(expert, TEXTS), atol=1e-5, rtol=0)


def test_a_cache_for_other_inputs_is_rebuilt(expert, tmp_path):
    features.extract(expert, TEXTS, "toy", "train", max_len=16, batch_size=8, cache_dir=tmp_path, progress=False)
    meta_file = next(tmp_path.rglob("meta.json"))
    meta = json.loads(meta_file.read_text())
    meta["key"]["content_sha256"] = "0" * 64  # as if made for other texts
    meta_file.write_text(json.dumps(meta))
    counting = Flaky(expert, fail_after=-1)
    features.extract(counting, TEXTS, "toy", "train", max_len=16, batch_size=8, cache_dir=tmp_path, progress=False)
    assert counting.calls == 5  # rebuilt from scratch
    again = Flaky(expert, fail_after=-1)
    features.extract(again, TEXTS, "toy", "train", max_len=16, batch_size=8, cache_dir=tmp_path, progress=False)
    assert again.calls == 0  # a matching cache is reused
    other = features.extract(expert, TEXTS[:-1], "toy", "train", max_len=16, batch_size=8, cache_dir=tmp_path,
                             progress=False)
    assert other.shape[0] == 39
