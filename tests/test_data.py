"""Datasets: local folders, user files, the hub path, stratification, and bad input.

Most tests read the small committed sets in tests/fixtures/ (tests/fixtures/make_fixtures.py writes them); the
ones named *_real check the real AG News, IMDB and DBpedia-14 copies and fail, naming them, when they are absent.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from minislm import data

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIXTURE_DATA = FIXTURES / "data"


def test_ag_news_real(real_dataset):
    folder = real_dataset("ag_news", "train", "test")
    test = data.load("ag_news", "test", data_dir=folder)
    assert len(test) == 7600 and test.label_names == ["World", "Sports", "Business", "Sci/Tech"]
    assert np.bincount(test.labels).tolist() == [1900] * 4
    train = data.load("ag_news", "train", data_dir=folder)
    assert len(train) == 13675 and set(train.texts).isdisjoint(test.texts)


def test_protocols_never_score_a_training_row_real(real_dataset):
    for name, splits in (("imdb", ("train", "test")), ("dbpedia_14", ("test",))):
        train, test = data.protocol_splits(name, data_dir=real_dataset(name, *splits))
        assert set(train.texts).isdisjoint(test.texts), name
        if name == "imdb":
            assert len(train) == len(test) == 2000 and abs(np.bincount(test.labels)[0] - 1000) <= 5
        else:
            assert len(train) + len(test) == 7600 and len(test) == 3800


def test_missing_real_dataset_fails_naming_it(real_dataset, tmp_path, monkeypatch):
    # with MINISLM_DATA_DIR pointing at an empty folder and no other copy, the helper must fail, not skip
    monkeypatch.setenv("MINISLM_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(data, "search_dirs", lambda data_dir=None: [tmp_path])
    with pytest.raises(pytest.fail.Exception, match="needs the real imdb dataset .*imdb/train.parquet.*"
                                                   "set MINISLM_DATA_DIR"):
        real_dataset("imdb", "train")


def test_local_folder_layout():
    train = data.load("ag_news", "train", data_dir=FIXTURE_DATA)
    test = data.load("ag_news", "test", data_dir=FIXTURE_DATA)
    assert train.label_names == test.label_names == ["World", "Sports", "Business", "Sci/Tech"]
    assert len(train) == 35 and len(test) == 16 and np.bincount(test.labels).tolist() == [4] * 4
    assert train.source == str(FIXTURE_DATA / "ag_news" / "train.parquet") and test.split == "test"
    assert train.labels.dtype == np.int64 and "" in train.texts and "原油价格上涨" in train.texts[-1]
    assert train.protocol == data.PROTOCOLS["ag_news"]


def test_protocol_drops_test_rows_seen_in_train():
    train, test = data.protocol_splits("ag_news", data_dir=FIXTURE_DATA)
    assert set(train.texts).isdisjoint(test.texts)
    assert len(test) == 15 and test.protocol["test_rows_dropped_as_in_train"] == 1
    assert test.protocol["n_train"] == len(train) == 35


def test_protocol_split_fraction_halves_one_split():
    train, test = data.protocol_splits("dbpedia_14", data_dir=FIXTURE_DATA)
    assert len(train) == len(test) == 28 and set(train.texts).isdisjoint(test.texts)
    assert np.bincount(test.labels).tolist() == [2] * 14 and test.split == "test-held"
    again, _ = data.protocol_splits("dbpedia_14", data_dir=FIXTURE_DATA)
    assert again.texts == train.texts  # a fixed seed: the same half every time


def test_clean_training_on_a_loaded_split():
    train = data.load("ag_news", "train", data_dir=FIXTURE_DATA)
    out, facts = data.clean_training(train)
    assert facts["counts"] == {"rows_in": 35, "rows_used": 33, "empty": 1, "duplicates": 1,
                               "conflicting_duplicates": 0}
    assert "" not in out.texts and len(set(out.texts)) == len(out)


def test_committed_user_files():
    csv = data.load_file(FIXTURES / "files" / "toy_news.csv")
    assert csv.label_names == ["Business", "Sci/Tech", "Sports", "World"]   # class names, sorted
    assert csv.texts[2] == 'Talks resume\nafter a week of "silence"'         # quoted newline and quotes kept
    assert csv.texts[3] == "1e308" and csv.labels.tolist() == [0, 2, 3, 1, 1, 2]
    labels = ["World", "Sports", "Business", "Sci/Tech"]
    jsonl = data.load_file(FIXTURES / "files" / "toy_news.jsonl", label_names=labels)
    assert jsonl.texts == csv.texts and jsonl.label_names == labels
    assert [labels[i] for i in jsonl.labels] == [csv.label_names[i] for i in csv.labels]
    assert data.read_column(FIXTURES / "files" / "toy_news.csv") == csv.texts


def test_fixtures_are_what_the_script_writes(tmp_path, monkeypatch):
    # the committed files must be reproducible from make_fixtures.py, so nobody edits them by hand
    import importlib.util
    import shutil

    copy = tmp_path / "fixtures"
    shutil.copytree(FIXTURES, copy, ignore=shutil.ignore_patterns("data", "files", "__pycache__"))
    spec = importlib.util.spec_from_file_location("make_fixtures", copy / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main()
    for rel in ("data/ag_news/train.parquet", "data/ag_news/test.parquet", "data/ag_news/labels.json",
                "data/dbpedia_14/test.parquet", "data/dbpedia_14/labels.json", "files/toy_news.csv",
                "files/toy_news.jsonl"):
        if rel.endswith(".parquet"):
            got = data.load_local(*Path(rel).parts[1:2], Path(rel).stem, copy / "data")
            want = data.load_local(*Path(rel).parts[1:2], Path(rel).stem, FIXTURE_DATA)
            assert got.texts == want.texts and got.labels.tolist() == want.labels.tolist(), rel
        else:
            assert (copy / rel).read_bytes() == (FIXTURES / rel).read_bytes(), rel


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
