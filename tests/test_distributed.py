"""Ray Data on a local 2-CPU instance: answers equal the single-process stream's, in order with their ids; a
batch that fails stops the job with its cause; embeddings equal the expert's own.

Needs the `distributed` extra (ray[data]); without it every test here fails with a message naming the extra,
never skips."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minislm import distributed, stream
from minislm.experts.load import load_expert
from tests.test_stream import PROB_ATOL, corpus, saved_team, write_input  # noqa: F401 (saved_team: a fixture)

pytestmark = pytest.mark.experts
ROWS = 300          # a few hundred texts, several batches per worker
BATCH = 64
EMBED_ATOL = 1e-6   # the same kernels on the same texts; only the batch composition can differ


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance for 2 CPUs of workers (plus the slot for reading, see connect), shut down after."""
    ray = distributed.require_ray()  # a DistributedError naming the `distributed` extra when ray is missing
    distributed.connect(num_cpus=2)
    yield ray
    ray.shutdown()


class FailsOnBoom(distributed.TeamPredictor):
    """A predictor whose batches containing the text "boom" fail, as a broken worker would."""

    def answer(self, batch):
        if "boom" in batch.column(self.text_column).to_pylist():
            raise RuntimeError("a worker fell over")
        return super().answer(batch)


def test_ray_answers_equal_the_single_process_stream(ray_local, saved_team, tmp_path):
    team, folder = saved_team
    texts, ids = corpus(ROWS, seed=3)
    texts[5], texts[200] = "", None
    inp = write_input(tmp_path / "in.parquet", texts, ids)
    local = tmp_path / "local.parquet"
    stream.classify_file(team, folder, inp, local, stream.StreamSettings(id_column="doc_id", chunk_size=BATCH))
    out = tmp_path / "ray.parquet"
    summary = distributed.classify_ray(inp, out, folder, id_column="doc_id", workers=2, batch_size=BATCH)
    assert summary["rows"] == ROWS
    want, got = pq.read_table(local), pq.read_table(out)
    assert got.column_names == want.column_names
    assert got.column("doc_id").to_pylist() == ids                      # order and ids kept
    for col in ("label", "exit_tier", "note"):
        assert got.column(col).to_pylist() == want.column(col).to_pylist(), col
    for col in [c for c in want.column_names if c.startswith("p_")] + ["confidence"]:
        a = np.array(got.column(col).to_pylist(), dtype=float)
        b = np.array(want.column(col).to_pylist(), dtype=float)
        np.testing.assert_allclose(a, b, atol=PROB_ATOL, rtol=0, equal_nan=True, err_msg=col)
    np.testing.assert_allclose(np.array(got.column("flops").to_pylist(), dtype=float),
                               np.array(want.column("flops").to_pylist(), dtype=float), rtol=1e-12, equal_nan=True)


def test_a_failed_batch_is_reported_not_lost(ray_local, saved_team, tmp_path):
    _, folder = saved_team
    texts, ids = corpus(ROWS, seed=4)
    texts[150] = "boom"
    inp = write_input(tmp_path / "in.parquet", texts, ids)
    out = tmp_path / "ray.parquet"
    with pytest.raises(distributed.BatchError, match=r"batch of \d+ rows \(ids .*\) failed: RuntimeError: a "
                                                      r"worker fell over; nothing was written"):
        distributed.classify_ray(inp, out, folder, id_column="doc_id", workers=2, batch_size=BATCH,
                                 predictor=FailsOnBoom)
    assert not out.exists()


def test_ray_embeddings_equal_the_experts_own(ray_local, saved_team, tmp_path):
    team, _ = saved_team
    bert = team.cfg.encoders[0]
    texts, ids = corpus(120, seed=5)
    texts[3] = ""
    inp = write_input(tmp_path / "in.parquet", texts, ids)
    out = tmp_path / "emb.parquet"
    distributed.extract_ray(inp, out, bert, id_column="doc_id", workers=2, batch_size=BATCH)
    got = pq.read_table(out)
    assert got.column("doc_id").to_pylist() == ids
    assert got.column("embedding")[3].as_py() is None and got.column("note")[3].as_py() == stream.EMPTY_NOTE
    keep = [i for i in range(len(texts)) if i != 3]
    vectors = np.array([got.column("embedding")[i].as_py() for i in keep], dtype=np.float32)
    np.testing.assert_allclose(vectors, load_expert(bert).embed([texts[i] for i in keep]), atol=EMBED_ATOL)


def test_the_embed_and_classify_commands_take_the_ray_path(ray_local, saved_team, tmp_path, capsys):
    from minislm import classify, embed

    team, folder = saved_team
    texts, ids = corpus(40, seed=6)
    inp = write_input(tmp_path / "in.parquet", texts, ids)
    assert embed.main(["--file", str(inp), "--out", str(tmp_path / "e.parquet"), "--experts", team.cfg.encoders[0],
                       "--id-column", "doc_id"]) == 0
    assert pq.read_table(tmp_path / "e.parquet").column("doc_id").to_pylist() == ids
    assert classify.main(["--file", str(inp), "--out", str(tmp_path / "c.parquet"), "--ray", "--model", str(folder),
                          "--id-column", "doc_id"]) == 0
    got = pq.read_table(tmp_path / "c.parquet")
    assert got.column("doc_id").to_pylist() == ids
    assert got.column("label").to_pylist() == team.predict(texts)


def test_bad_arguments_are_clear(ray_local, saved_team, tmp_path):
    _, folder = saved_team
    csv_file = tmp_path / "in.csv"
    csv_file.write_text("text\nw1\n", encoding="utf-8")
    with pytest.raises(distributed.DistributedError, match="Parquet only.*minislm.stream"):
        distributed.classify_ray(csv_file, tmp_path / "o.parquet", folder)
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["w1"]}), inp)
    with pytest.raises(distributed.DistributedError, match="no column 'doc'"):
        distributed.classify_ray(inp, tmp_path / "o.parquet", folder, id_column="doc")
    with pytest.raises(distributed.DistributedError, match="workers"):
        distributed.classify_ray(inp, tmp_path / "o.parquet", folder, workers=0)
    with pytest.raises(distributed.DistributedError, match="leave none of the cluster's 3 CPUs.*at most 2 workers"):
        distributed.classify_ray(inp, tmp_path / "o.parquet", folder, workers=3)
