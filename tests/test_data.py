"""Datasets: local folders, user files, the hub path, stratification, and bad input."""
import json

import numpy as np
import pytest

from minislm import data


def test_ag_news_local():
    test = data.load("ag_news", "test")
    assert len(test) == 7600 and test.label_names == ["World", "Sports", "Business", "Sci/Tech"]
    assert np.bincount(test.labels).tolist() == [1900] * 4
    train = data.load("ag_news", "train")
    assert len(train) == 13675 and set(train.texts).isdisjoint(test.texts)


def test_protocols_never_score_a_training_row():
    for name in ("imdb", "dbpedia_14"):
        train, test = data.protocol_splits(name)
        assert set(train.texts).isdisjoint(test.texts), name
    train, test = data.protocol_splits("dbpedia_14")
    assert len(train) + len(test) == 7600 and len(test) == 3800
    train, test = data.protocol_splits("imdb")
    assert len(train) == len(test) == 2000 and abs(np.bincount(test.labels)[0] - 1000) <= 5


def test_stratified_subsample_keeps_shares_and_is_deterministic():
    labels = np.array([0] * 700 + [1] * 200 + [2] * 100)
    idx = data.stratified_indices(labels, 100, seed=3)
    assert np.bincount(labels[idx]).tolist() == [70, 20, 10]
    assert np.array_equal(idx, data.stratified_indices(labels, 100, seed=3))
    assert not np.array_equal(idx, data.stratified_indices(labels, 100, seed=4))


def test_kfold_partitions_every_row_once():
    labels = np.repeat(np.arange(3), [50, 31, 19])
    folds = data.kfold(labels, 5, seed=1)
    val = np.concatenate([v for _, v in folds])
    assert sorted(val.tolist()) == list(range(100))
    for tr, va in folds:
        assert np.intersect1d(tr, va).size == 0 and len(tr) + len(va) == 100
        assert abs(np.sum(labels[va] == 0) - 10) <= 1


@pytest.mark.parametrize("ext", ["csv", "parquet", "jsonl"])
def test_user_files(tmp_path, ext):
    import datasets

    rows = {"review": ["good film", "bad film", "fine", "awful"], "y": ["pos", "neg", "pos", "neg"]}
    path = tmp_path / f"mine.{ext}"
    ds = datasets.Dataset.from_dict(rows)
    {"csv": ds.to_csv, "parquet": ds.to_parquet, "jsonl": ds.to_json}[ext](str(path))
    got = data.load_file(path, text_column="review", label_column="y")
    assert got.texts == rows["review"] and got.label_names == ["neg", "pos"]
    assert got.labels.tolist() == [1, 0, 1, 0]


def test_bad_input(tmp_path):
    import datasets

    path = tmp_path / "x.csv"
    datasets.Dataset.from_dict({"body": ["a"], "label": [0]}).to_csv(str(path))
    with pytest.raises(data.DataError, match="no column 'text' \\(columns: body, label\\); name the right one with --text-column"):
        data.load_file(path)
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": ["pos", "meh"]}).to_csv(str(path))
    with pytest.raises(data.DataError, match="label 'meh' is not one of the known labels \\(neg, pos\\)"):
        data.load_file(path, label_names=["neg", "pos"])
    header_only = tmp_path / "e.csv"
    header_only.write_text("text,label\n")
    with pytest.raises(data.DataError, match="the file (is empty|has no rows)"):
        data.load_file(header_only)
    with pytest.raises(data.DataError, match="unknown file type '.txt'"):
        (tmp_path / "a.txt").write_text("x")
        data.load_file(tmp_path / "a.txt")
    folder = tmp_path / "ag_news"
    folder.mkdir()
    datasets.Dataset.from_dict({"text": ["a"], "label": [7]}).to_parquet(str(folder / "test.parquet"))
    (folder / "labels.json").write_text(json.dumps(["World", "Sports", "Business", "Sci/Tech"]))
    with pytest.raises(data.DataError, match="label 7 is outside labels.json"):
        data.load("ag_news", "test", data_dir=tmp_path)


def test_hub_fallback_and_offline_error(tmp_path, monkeypatch):
    import datasets

    class Fake(list):
        features = {"label": type("L", (), {"names": ["neg", "pos"]})()}

        def __getitem__(self, key):
            return {"text": ["nice", "bad"], "label": [1, 0]}[key]

    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, split: Fake())
    got = data.load("imdb", "test", data_dir=tmp_path)
    assert got.source == "stanfordnlp/imdb" and got.labels.tolist() == [1, 0]

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(data.DataError, match="not found locally .*set MINISLM_DATA_DIR"):
        data.load("imdb", "test", data_dir=tmp_path)


def test_label_mapping_rule():
    ids, names = data.map_labels([3, 1, 3, 5])
    assert ids.tolist() == [1, 0, 1, 2] and names == ["1", "3", "5"]       # sorted values, named by value
    ids, names = data.map_labels([2.0, 0.0, 1.0])
    assert ids.tolist() == [2, 0, 1] and names == ["0", "1", "2"]
    ids, names = data.map_labels([" pos", "neg ", "pos"])
    assert ids.tolist() == [1, 0, 1] and names == ["neg", "pos"]             # spaces stripped
    ids, names = data.map_labels(["b", "a"], label_names=["b", "a"])
    assert ids.tolist() == [0, 1] and names == ["b", "a"]
    with pytest.raises(data.DataError, match=r"row 1 has the label 1.5, not a whole number"):
        data.map_labels([1.0, 1.5])
    with pytest.raises(data.DataError, match=r"row 2 has no label"):
        data.map_labels([1, 0, float("nan")])
    with pytest.raises(data.DataError, match=r"labels \['Pos', 'pos'\] differ only in case"):
        data.map_labels(["pos", "Pos", "neg"])
    with pytest.raises(data.DataError, match="labels mix text and numbers"):
        data.map_labels(["pos", 1])
    with pytest.raises(data.DataError, match="boolean label"):
        data.map_labels([True, False])
    ids, names = data.map_labels([1e308, 0])                                  # no range is built from values
    assert ids.tolist() == [1, 0] and len(names) == 2


def test_clean_training_removes_empty_and_repeated_texts():
    ds = data.TextDataset(["a b", "", "c d", "a b", "  ", "a b", "e"], np.array([0, 1, 1, 0, 0, 1, 1]),
                          ["x", "y"], "t", "train", "memory")
    out, facts = data.clean_training(ds)
    assert out.texts == ["a b", "c d", "e"] and out.labels.tolist() == [0, 1, 1]
    assert facts["counts"] == {"rows_in": 7, "rows_used": 3, "empty": 2, "duplicates": 2,
                               "conflicting_duplicates": 1}
    one_class = data.TextDataset(["a", "b"], np.array([1, 1]), ["x", "y"], "t", "train", "memory")
    with pytest.raises(data.DataError, match="only one class \\('y'\\) has rows"):
        data.clean_training(one_class)
    empty = data.TextDataset(["", " "], np.array([0, 1]), ["x", "y"], "t", "train", "memory")
    with pytest.raises(data.DataError, match="every text is empty"):
        data.clean_training(empty)


def test_read_column_never_parses_texts_as_labels(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text\n1e308\n\n7\n")
    col = data.read_column(path, "text")
    assert col[0] == "1e308" and col[-1] == "7" and all(c is None or isinstance(c, str) for c in col)
