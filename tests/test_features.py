"""The feature cache: values, content addressing per text, damaged entries, eviction, concurrent writers."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minislm.encoder.pooling import pool_layers
from minislm.experts import features
from minislm.experts import load_expert
from tests.model_folders import make_tiny_folder

TEXTS = [" ".join(f"w{(7 * i + k) % 100}" for k in range(i % 13 + 1)) for i in range(40)]
ATOL = 1e-5  # float32: the same text in another batch (other padding, other matmul blocking)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-mpnet")
    make_tiny_folder(path, "mpnet")
    return path


@pytest.fixture(scope="module")
def expert(folder):
    return load_expert(str(folder))


def direct(expert, texts, max_len=16):
    out = []
    for t in texts:
        ids, mask = expert.tokenizer.encode_batch([t], max_len=max_len)
        out.append(pool_layers(expert.encoder.forward(ids, mask), mask)[0])
    return np.stack(out)


class Interrupt(Exception):
    pass


class Counting:
    """An expert whose encoder counts the batches and texts it runs, and fails after `fail_after` batches."""
    def __init__(self, expert, fail_after=-1):
        self.name, self.weights_sha256, self.tokenizer = expert.name, expert.weights_sha256, expert.tokenizer
        self.config, self.calls, self.texts, self.fail_after, self.inner = expert.config, 0, 0, fail_after, expert.encoder
        self.widths, self.encoder = [], self

    def forward(self, ids, mask):
        if self.calls == self.fail_after:
            raise Interrupt
        self.calls += 1
        self.texts += len(ids)
        self.widths.append(ids.shape[1])
        return self.inner.forward(ids, mask)


def run(model, texts, cache, **kw):
    kw = {"max_len": 16, "batch_size": 8, "progress": False, **kw}
    return features.extract(model, texts, "toy", "train", cache_dir=cache, **kw)


def test_features_equal_each_text_alone_in_length_sorted_batches(expert, tmp_path):
    c = Counting(expert)
    got = run(c, TEXTS, tmp_path)
    assert got.shape == (40, expert.config.n_layers + 1, 2 * expert.config.hidden) and got.dtype == np.float32
    np.testing.assert_allclose(got, direct(expert, TEXTS), atol=ATOL, rtol=0)
    lengths = sorted((len(r) for r in expert.tokenizer.encode(TEXTS, 16)), reverse=True)
    assert c.widths == [lengths[i] for i in range(0, 40, 8)]  # each batch padded to its own longest row only


def test_any_subset_reordering_or_split_is_served_from_the_cache(expert, tmp_path):
    full = run(expert, TEXTS, tmp_path)
    rng = np.random.default_rng(0)
    for idx in (rng.permutation(40), rng.permutation(40)[:13], np.array([5, 5, 3])):
        c = Counting(expert)
        got = features.extract(c, [TEXTS[i] for i in idx], "other", "fold-3", max_len=16, batch_size=4,
                               cache_dir=tmp_path, progress=False)
        assert c.calls == 0
        np.testing.assert_array_equal(got, full[idx])
    # a superset: only its unseen texts run through the encoder
    new = [f"w{i} w{i} w{i}" for i in range(10, 15)]  # not among TEXTS
    c = Counting(expert)
    got = run(c, TEXTS[:20] + new + TEXTS[20:], tmp_path)
    assert c.texts == len(new)
    np.testing.assert_allclose(got[20:25], direct(expert, new), atol=ATOL, rtol=0)
    np.testing.assert_array_equal(got[:20], full[:20])


def test_a_texts_features_do_not_depend_on_its_batch_order_or_subset(expert, tmp_path):
    ref = run(expert, TEXTS, tmp_path / "a", batch_size=8)
    rng = np.random.default_rng(1)
    for k, (bs, idx) in enumerate([(3, rng.permutation(40)), (16, rng.permutation(40)[:9]), (1, np.arange(40))]):
        got = run(expert, [TEXTS[i] for i in idx], tmp_path / f"b{k}", batch_size=bs)
        np.testing.assert_allclose(got, ref[idx], atol=ATOL, rtol=0)


def test_the_key_holds_weights_tokenizer_max_len_truncation_and_layers(expert, tmp_path):
    full = run(expert, TEXTS, tmp_path)
    for kw in ({"max_len": 8}, {"max_len": 8, "head": 2}, {"layers": [0, -1]}):
        c = Counting(expert)
        got = run(c, TEXTS, tmp_path, **kw)
        assert c.texts == len(TEXTS), kw  # another space: computed, never mixed with the first
        assert run(Counting(expert, fail_after=0), TEXTS, tmp_path, **kw).shape == got.shape  # then cached
    np.testing.assert_array_equal(run(expert, TEXTS, tmp_path, layers=[0, -1]), full[:, [0, -1]])
    rows = expert.tokenizer.encode(TEXTS, 8, 2)
    np.testing.assert_allclose(run(expert, TEXTS, tmp_path, max_len=8, head=2),
                               features.pooled_features(expert, None, rows=rows), atol=ATOL, rtol=0)
    other = Counting(expert)
    other.weights_sha256 = "0" * 64  # as if other weights
    run(other, TEXTS, tmp_path)
    assert other.texts == len(TEXTS)
    assert len(list(tmp_path.glob("*/*/space.json"))) == 5


def test_an_interrupted_fill_keeps_its_finished_shards(expert, tmp_path, monkeypatch):
    monkeypatch.setattr(features, "SHARD_TEXTS", 8)
    with pytest.raises(Interrupt):
        run(Counting(expert, fail_after=3), TEXTS, tmp_path, batch_size=4)
    resumed = Counting(expert)
    got = run(resumed, TEXTS, tmp_path, batch_size=4)
    assert resumed.texts == 40 - 8  # the first two batches made a shard before the failure
    np.testing.assert_allclose(got, direct(expert, TEXTS), atol=ATOL, rtol=0)


def damage_truncate(npy, manifest):
    npy.write_bytes(npy.read_bytes()[:-100])


def damage_flip(npy, manifest):
    raw = bytearray(npy.read_bytes())
    raw[-7] ^= 0x40
    npy.write_bytes(bytes(raw))


def damage_json(npy, manifest):
    manifest.write_text(manifest.read_text()[:-20])


def damage_shape(npy, manifest):  # a consistent file of the wrong shape: the hash is updated, the shape is not
    import hashlib
    import io

    buf = io.BytesIO()
    np.save(buf, np.zeros((3, 4), np.float32))
    npy.write_bytes(buf.getvalue())
    meta = json.loads(manifest.read_text())
    meta["npy_sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    manifest.write_text(json.dumps(meta))


def damage_texts(npy, manifest):
    meta = json.loads(manifest.read_text())
    meta["texts"] = meta["texts"][:-1]
    manifest.write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", [damage_truncate, damage_flip, damage_json, damage_shape, damage_texts])
def test_a_damaged_shard_is_reported_discarded_and_recomputed(expert, tmp_path, monkeypatch, damage):
    monkeypatch.setattr(features, "SHARD_TEXTS", 16)
    run(expert, TEXTS, tmp_path)
    manifests = sorted(p for p in tmp_path.glob("*/*/*.json") if p.name != "space.json")
    assert len(manifests) == 3  # 16 + 16 + 8 texts
    victim = manifests[1]
    n = len(json.loads(victim.read_text())["texts"])
    damage(victim.with_suffix(".npy"), victim)
    lines, c = [], Counting(expert)
    got = run(c, TEXTS, tmp_path, log=lines.append)
    assert len(lines) == 1 and "damaged shard" in lines[0] and victim.name in lines[0], lines
    assert c.texts == n and not victim.exists()
    np.testing.assert_allclose(got, direct(expert, TEXTS), atol=ATOL, rtol=0)
    lines, c = [], Counting(expert)
    run(c, TEXTS, tmp_path, log=lines.append)
    assert c.texts == 0 and lines == []


def shard_bytes(tmp_path):
    return sum(f.stat().st_size for f in tmp_path.glob("*/*/*") if f.name != "space.json")


def test_the_least_recently_used_shards_are_evicted_past_the_bound(expert, tmp_path, monkeypatch):
    a, b, c = TEXTS[:10], TEXTS[10:20], TEXTS[20:30]
    run(expert, a, tmp_path)
    one = shard_bytes(tmp_path)  # one shard of 10 texts
    monkeypatch.setenv("MINISLM_FEATURE_CACHE_GB", str(2.5 * one / 1e9))
    run(expert, b, tmp_path)
    old = time.time() - 100
    for m in tmp_path.glob("*/*/*.json"):
        os.utime(m, (old, old))
    run(expert, a, tmp_path)     # a is read again: now the most recently used
    run(expert, c, tmp_path)     # over the bound: b goes
    for texts, cached in ((a, True), (c, True), (b, False)):
        n = Counting(expert)
        run(n, texts, tmp_path)
        assert (n.texts == 0) == cached
    assert shard_bytes(tmp_path) <= 2.5 * one
    monkeypatch.setenv("MINISLM_FEATURE_CACHE_GB", "lots")
    with pytest.raises(ValueError, match="MINISLM_FEATURE_CACHE_GB"):
        features.max_bytes_default()


FILLER = """
import sys, time
import numpy as np
from minislm.experts import features, load_expert
features.SHARD_TEXTS = 4
e = load_expert(sys.argv[1])
forward = e.encoder.forward
def slow(ids, mask):
    time.sleep(0.05)  # so the two writers interleave
    return forward(ids, mask)
e.encoder.forward = slow
texts = [" ".join(f"w{(7 * i + k) % 100}" for k in range(i % 13 + 1)) for i in range(int(sys.argv[3]), int(sys.argv[4]))]
x = features.extract(e, texts, max_len=16, batch_size=4, cache_dir=sys.argv[2], progress=False)
np.save(sys.argv[5], x)
"""


def test_two_processes_filling_the_cache_at_once_leave_it_whole(folder, expert, tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    jobs = [subprocess.Popen([sys.executable, "-c", FILLER, str(folder), str(cache), lo, hi, str(tmp_path / out)],
                             env=env, stderr=subprocess.PIPE, text=True)
            for lo, hi, out in (("0", "30", "a.npy"), ("10", "40", "b.npy"))]
    for j in jobs:
        _, err = j.communicate(timeout=600)
        assert j.returncode == 0, err
        assert "damaged" not in err
    want = direct(expert, TEXTS)
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), want[:30], atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.load(tmp_path / "b.npy"), want[10:], atol=ATOL, rtol=0)
    assert not list(cache.rglob(".tmp-*"))
    lines, c = [], Counting(expert)
    got = run(c, TEXTS, cache, batch_size=4, log=lines.append)
    assert c.texts == 0 and lines == []  # every shard both wrote is whole and every text is found
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
