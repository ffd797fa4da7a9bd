"""Streaming a file through the team: answers equal Team.predict_proba's, rows keep their order and ids, every
format in and out, resume after an interruption, a changed input or changed settings refused, empty texts noted."""
import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minislm import stream
from minislm.team.composition import Composition
from minislm.team import Team, TeamConfig
from minislm.team.team import LEXICAL
from minislm.team.training import fit
from tests.model_folders import make_tiny_folder
from tests.test_team import toy

pytestmark = pytest.mark.experts  # the lexical expert reads the pretrained experts' WordPiece vocabulary

PROB_ATOL = 1e-6   # the same float32 numbers pass through Parquet / CSV / JSON: only printing could differ
N = 240            # rows per test file
CHUNK = 50         # rows per part: N / CHUNK is not whole, so the last part is short


@pytest.fixture(scope="module")
def saved_team(tmp_path_factory):
    """A tiny three-tier team (lexical, tiny BERT, tiny MPNet) saved as a checkpoint -> (Team, folder)."""
    root = tmp_path_factory.mktemp("team")
    for fam in ("bert", "mpnet"):
        (root / fam).mkdir()
        make_tiny_folder(root / fam, fam)
    cfg = TeamConfig(dataset="toy", label_names=["red", "green", "blue"],
                     experts=[LEXICAL, str(root / "bert"), str(root / "mpnet")], proj_dim=16, head_hidden=16,
                     folds=2, lexical={"n_buckets": 256, "epochs": 3, "lr": 1.0},
                     train={"epochs": 4, "batch_size": 32, "patience": 4})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINISLM_CACHE_DIR", str(root / "cache"))
        team = fit(Team(cfg), toy(150, 0), log=lambda s: None, progress=False)
    # thresholds at the confidences' medians: every tier answers some rows, so the stream crosses all three
    texts = toy(N, 1).texts
    lexical_conf = team.lexical.predict_proba(texts).max(1)
    team.composition = Composition.every_tier_fused(3, [float(np.median(lexical_conf)), 1.01])
    probs, info = team.predict_proba(texts)
    team.composition.thresholds = [float(np.median(lexical_conf)), float(np.median(probs[info["exit_tier"] == 2].max(1)))]
    team.save(root / "ckpt")
    return Team.load(root / "ckpt"), root / "ckpt"


def corpus(n=N, seed=1):
    """-> (texts, ids): toy texts with ids that are not the row numbers, so order and ids are both checked."""
    texts = toy(n, seed).texts
    return texts, [f"doc-{(7 * i) % n:04d}-{i}" for i in range(n)]


def write_input(path, texts, ids, id_column="doc_id"):
    """texts (None = missing cell) and ids -> a .parquet / .csv / .jsonl file with an extra column to ignore."""
    rows = [{id_column: i, "text": t, "other": 1} for i, t in zip(ids, texts)]
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=37)  # groups that cut across chunks
    elif path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow([id_column, "text", "other"])
            for r in rows:
                w.writerow([r[id_column], r["text"] or "", r["other"]])
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_output(path):
    """An output file -> list of row dicts, values typed as in Parquet (CSV cells parsed back)."""
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    typed = []
    for r in rows:
        t = {}
        for k, v in r.items():
            if k in ("label", "note", "doc_id"):
                t[k] = v
            elif k == "exit_tier":
                t[k] = int(v) if v != "" else None
            else:
                t[k] = float(v) if v != "" else None
        typed.append(t)
    return typed


def assert_matches_team(rows, team, texts, ids):
    """The streamed rows equal Team.predict_proba on the same texts, in order, with their ids."""
    probs, info = team.predict_proba(texts)
    names = team.cfg.label_names
    assert [r["doc_id"] for r in rows] == ids
    assert [r["label"] for r in rows] == [names[j] for j in probs.argmax(1)]
    got = np.array([[r[f"p_{n}"] for n in names] for r in rows])
    np.testing.assert_allclose(got, probs, atol=PROB_ATOL, rtol=0)
    np.testing.assert_allclose([r["confidence"] for r in rows], probs.max(1), atol=PROB_ATOL, rtol=0)
    assert [r["exit_tier"] for r in rows] == info["exit_tier"].tolist()
    np.testing.assert_allclose([r["flops"] for r in rows], info["flops"], rtol=1e-12)
    assert all(r["note"] == "" for r in rows)


@pytest.mark.parametrize("src,dst", [(".parquet", ".parquet"), (".csv", ".csv"), (".jsonl", ".jsonl"),
                                     (".csv", ".parquet"), (".parquet", ".jsonl")])
def test_stream_equals_predict_proba(saved_team, tmp_path, src, dst):
    team, folder = saved_team
    texts, ids = corpus()
    inp = write_input(tmp_path / f"in{src}", texts, ids)
    out = tmp_path / f"out{dst}"
    summary = stream.classify_file(team, folder, inp, out, stream.StreamSettings(id_column="doc_id",
                                                                                 chunk_size=CHUNK))
    assert summary["rows"] == N and summary["chunks"] == -(-N // CHUNK)
    rows = read_output(out)
    assert list(rows[0]) == stream.output_columns(team.cfg.label_names, "doc_id")
    assert_matches_team(rows, team, texts, ids)
    assert len(set(summary["tier_counts"]) - {0}) == 3, "the test should cross every tier"
    assert not stream.work_dir(out).exists()


def test_parquet_ids_keep_their_type(saved_team, tmp_path):
    team, folder = saved_team
    texts, _ = corpus(60)
    ids = np.arange(1000, 1060, dtype=np.int32)
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"n": pa.array(ids), "text": texts}), inp)
    stream.classify_file(team, folder, inp, tmp_path / "out.parquet", stream.StreamSettings(id_column="n"))
    col = pq.read_table(tmp_path / "out.parquet").column("n")
    assert col.type == pa.int32() and col.to_pylist() == ids.tolist()


class Interrupt(Exception):
    pass


def interrupt_at(k_stop):
    def hook(k, rows_done):
        if k == k_stop:
            raise Interrupt(f"stopped after chunk {k}")
    return hook


@pytest.mark.parametrize("fmt", [".parquet", ".csv", ".jsonl"])
def test_resume_after_an_interruption_equals_an_uninterrupted_run(saved_team, tmp_path, fmt):
    team, folder = saved_team
    texts, ids = corpus()
    inp = write_input(tmp_path / f"in{fmt}", texts, ids)
    settings = stream.StreamSettings(id_column="doc_id", chunk_size=CHUNK)
    whole = tmp_path / "whole.parquet"
    stream.classify_file(team, folder, inp, whole, settings)

    out = tmp_path / "resumed.parquet"
    with pytest.raises(Interrupt):  # stopped after the 3rd of 5 chunks: about half way
        stream.classify_file(team, folder, inp, out, settings, on_chunk=interrupt_at(2))
    assert not out.exists()
    manifest = json.loads((stream.work_dir(out) / "manifest.json").read_text())
    assert manifest["chunks_done"] == 3 and manifest["rows_done"] == 3 * CHUNK
    seen = []
    summary = stream.classify_file(team, folder, inp, out, settings, on_chunk=lambda k, r: seen.append(k))
    assert summary["resumed_from"] == 3 and seen == [3, 4]  # only the missing chunks were classified
    assert pq.read_table(out).equals(pq.read_table(whole))
    assert not stream.work_dir(out).exists()


def test_an_interruption_inside_a_chunk_leaves_only_whole_parts(saved_team, tmp_path, monkeypatch):
    team, folder = saved_team
    texts, ids = corpus()
    inp = write_input(tmp_path / "in.parquet", texts, ids)
    settings = stream.StreamSettings(id_column="doc_id", chunk_size=CHUNK)
    stream.classify_file(team, folder, inp, tmp_path / "whole.parquet", settings)
    real = stream.write_part

    def dies_in_part_2(work, k, table):
        if k == 2:
            raise KeyboardInterrupt
        real(work, k, table)

    monkeypatch.setattr(stream, "write_part", dies_in_part_2)
    out = tmp_path / "out.parquet"
    with pytest.raises(KeyboardInterrupt):
        stream.classify_file(team, folder, inp, out, settings)
    monkeypatch.setattr(stream, "write_part", real)
    assert sorted(p.name for p in stream.work_dir(out).iterdir()) == ["manifest.json", "part-000000.parquet",
                                                                       "part-000001.parquet"]
    assert stream.classify_file(team, folder, inp, out, settings)["resumed_from"] == 2
    assert pq.read_table(out).equals(pq.read_table(tmp_path / "whole.parquet"))


def test_a_stop_after_the_last_part_only_concatenates(saved_team, tmp_path):
    team, folder = saved_team
    texts, ids = corpus()
    inp = write_input(tmp_path / "in.jsonl", texts, ids)
    settings = stream.StreamSettings(id_column="doc_id", chunk_size=CHUNK)
    out = tmp_path / "out.csv"
    with pytest.raises(Interrupt):
        stream.classify_file(team, folder, inp, out, settings, on_chunk=interrupt_at(4))  # the last chunk
    seen = []
    assert stream.classify_file(team, folder, inp, out, settings, on_chunk=lambda k, r: seen.append(k))["rows"] == N
    assert seen == []
    assert_matches_team(read_output(out), team, texts, ids)


def test_a_changed_input_or_changed_settings_is_refused(saved_team, tmp_path):
    team, folder = saved_team
    texts, ids = corpus()
    inp = write_input(tmp_path / "in.csv", texts, ids)
    settings = stream.StreamSettings(id_column="doc_id", chunk_size=CHUNK)
    out = tmp_path / "out.csv"
    with pytest.raises(Interrupt):
        stream.classify_file(team, folder, inp, out, settings, on_chunk=interrupt_at(1))
    with pytest.raises(stream.ResumeError, match="chunk_size: 50 then, 60 now.*--restart"):
        stream.classify_file(team, folder, inp, out, stream.StreamSettings(id_column="doc_id", chunk_size=60))
    texts[200] = "w1 w2 w3 edited"
    write_input(inp, texts, ids)
    with pytest.raises(stream.ResumeError, match="another input.*restart=True"):
        stream.classify_file(team, folder, inp, out, settings)
    assert not out.exists()
    summary = stream.classify_file(team, folder, inp, out, settings, restart=True)
    assert summary["resumed_from"] == 0
    assert_matches_team(read_output(out), team, texts, ids)


def test_empty_and_missing_texts_are_noted_not_fatal(saved_team, tmp_path):
    team, folder = saved_team
    texts, ids = corpus(30)
    holes = {0: None, 7: "", 8: "   ", 29: None}
    raw = [holes.get(i, t) for i, t in enumerate(texts)]
    for fmt in (".parquet", ".jsonl", ".csv"):
        inp = write_input(tmp_path / f"in{fmt}", raw, ids)
        out = tmp_path / f"out-{fmt[1:]}.parquet"
        stream.classify_file(team, folder, inp, out, stream.StreamSettings(id_column="doc_id", chunk_size=8))
        rows = pq.read_table(out).to_pylist()
        assert [r["doc_id"] for r in rows] == ids
        for i in holes:
            assert rows[i]["label"] == "" and rows[i]["note"] == stream.EMPTY_NOTE
            assert rows[i]["confidence"] is None and rows[i]["exit_tier"] is None and rows[i]["p_red"] is None
        kept = [i for i in range(30) if i not in holes]
        assert_matches_team([rows[i] for i in kept], team, [texts[i] for i in kept], [ids[i] for i in kept])
    only_empty = write_input(tmp_path / "empty.jsonl", [None, ""], ["a", "b"])
    stream.classify_file(team, folder, only_empty, tmp_path / "e.csv", stream.StreamSettings(id_column="doc_id"))
    assert [r["label"] for r in read_output(tmp_path / "e.csv")] == ["", ""]


def test_bad_input_is_one_clear_error(saved_team, tmp_path):
    team, folder = saved_team
    texts, ids = corpus(10)
    inp = write_input(tmp_path / "in.parquet", texts, ids)
    cases = [
        (dict(input_path=inp, out=tmp_path / "o.parquet", settings=stream.StreamSettings(text_column="body")),
         "no text column 'body'.*--column"),
        (dict(input_path=inp, out=tmp_path / "o.parquet", settings=stream.StreamSettings(id_column="key")),
         "no id column 'key'.*--id-column"),
        (dict(input_path=inp, out=tmp_path / "o.xlsx"), "unknown output type '.xlsx'"),
        (dict(input_path=tmp_path / "nope.csv", out=tmp_path / "o.csv"), "does not exist"),
        (dict(input_path=inp, out=inp), "is the input"),
        (dict(input_path=inp, out=tmp_path / "o.csv", settings=stream.StreamSettings(chunk_size=0)), "chunk_size"),
        (dict(input_path=inp, out=tmp_path / "o.csv", settings=stream.StreamSettings(id_column="label")),
         "name of an output column"),
    ]
    for kw, message in cases:
        with pytest.raises(stream.StreamError, match=message):
            stream.classify_file(team, folder, **kw)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(stream.StreamError, match="line 2 is a JSON list"):
        stream.classify_file(team, folder, bad, tmp_path / "o.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("text\n", encoding="utf-8")
    with pytest.raises(stream.StreamError, match="has no rows"):
        stream.classify_file(team, folder, empty, tmp_path / "o.csv")


def test_run_stream_shows_docs_per_second_and_the_tier_mix(saved_team, tmp_path, capsys):
    team, folder = saved_team
    texts, ids = corpus(120)
    inp = write_input(tmp_path / "in.parquet", texts, ids)
    summary = stream.run_stream(inp, tmp_path / "out.jsonl", folder, id_column="doc_id", chunk_size=40)
    err = capsys.readouterr().err
    assert "120/120" in err and "docs/s" in err and "t0 " in err and "t2 " in err
    assert summary["rows"] == 120 and summary["docs_per_s"] > 0
