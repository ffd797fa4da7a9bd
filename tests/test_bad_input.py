"""Bad input, end to end: every case exits 2 (or gives a correct answer), says in one line on stderr what is
wrong and what to do, prints no traceback, and changes no file.

One tiny team (a random BERT folder, its tokenizer also the lexical expert's) is trained once per module and
saved; the CLIs run in-process through `main(argv)`, and as real processes where a signal, a closed pipe or a
full disk needs one. Cases that train through `python -m minislm.train` need the pretrained experts (the CLI's
lexical expert reads all-MiniLM-L6-v2's vocabulary) and are marked `experts`.
"""
import hashlib
import io
import json
import os
import pty
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minislm import classify, train, weights
from minislm.experts import fetch as fetch_lib
from minislm.experts import load_expert, registry
from minislm.team.composition import Composition
from minislm.team import CheckpointError, Team, TeamConfig, checkpoint, train_team
from minislm.team.team import LEXICAL
from minislm.team.training import fit
from tests.model_folders import make_tiny_folder
from tests.test_team import toy

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "weights" / "ag_news"


# ---- helpers ------------------------------------------------------------------------------------------------
def snapshot(*roots):
    """path -> sha256 of every file under roots (a folder's entry marks it), to prove nothing was changed."""
    out = {}
    for root in map(Path, roots):
        if not root.exists():
            continue
        for p in sorted([root, *root.rglob("*")]) if root.is_dir() else [root]:
            out[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def one_line(err, *words):
    """err is one `error: <what>; <what to do>` line naming every word, with no traceback."""
    assert "Traceback" not in err, err
    assert err.startswith("error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    assert "; " in err, f"no remedy after the problem: {err}"
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"


def run(main, capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def flip_byte(path, offset=-100, keep_mtime=True):
    """Change one byte in place, size kept (and the mtime restored: only a full hash can see it)."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END if offset < 0 else os.SEEK_SET)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x55]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def env():
    """The environment of a real classify process: this one's (MINISLM_WEIGHTS_DIR too), stdout buffered."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


def texts_with_duplicates():
    """90 toy rows plus a second copy of 30 of them: duplicates must never straddle fit and validation."""
    ds = toy(90, 0)
    idx = np.concatenate([np.arange(90), np.arange(0, 90, 3)])
    return ds.subset(idx)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    (root / "bert").mkdir()
    make_tiny_folder(root / "bert", "bert")
    cfg = TeamConfig(dataset="toy", label_names=["red", "green", "blue"], experts=[LEXICAL, str(root / "bert")],
                     proj_dim=8, head_hidden=8, folds=2, router_top_k=0,
                     lexical={"n_buckets": 64, "epochs": 2, "lr": 1.0},
                     train={"epochs": 2, "batch_size": 32, "patience": 2})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINISLM_CACHE_DIR", str(root / "cache"))
        team = fit(Team(cfg, lexical_tokenizer=str(root / "bert")), texts_with_duplicates(), log=lambda s: None,
                   progress=False)
        # both tiers active, whatever the toy data's composition chose, so every case can reach the encoder
        team.composition = Composition.every_tier_fused(2, [0.9])
        team.save(root / "ckpt", command="test")
        yield type("Tiny", (), {"team": team, "root": root, "ckpt": root / "ckpt", "bert": root / "bert"})


@pytest.fixture
def unchanged(tiny, tmp_path):
    """Asserts after the test that neither the shared team's files nor the test's own folder changed: every
    input is written first, then `unchanged.start()` takes the snapshot the end is compared with."""
    state = {}

    class Guard:
        def start(self):
            state["before"] = snapshot(tiny.ckpt, tiny.bert, tmp_path)

    yield Guard()
    assert "before" in state and snapshot(tiny.ckpt, tiny.bert, tmp_path) == state["before"]


# ---- classify: flags and inputs -----------------------------------------------------------------------------
def _write(tmp_path, name, data):
    f = tmp_path / name
    f.write_bytes(data) if isinstance(data, bytes) else f.write_text(data, encoding="utf-8")
    return f


CLASSIFY_CASES = {  # case -> (argv after --model, given tmp_path; words the message must hold)
    "tier -1": (lambda d: ["--tier", "-1", "w1"], ["--tier", "-1", "0 to 1"]),
    "tier 99": (lambda d: ["--tier", "99", "w1"], ["--tier", "99"]),
    "tier not a number": (lambda d: ["--tier", "abc", "w1"], ["--tier", "abc", "--help"]),
    "max-flops 0": (lambda d: ["--max-flops", "0", "w1"], ["--max-flops", "positive"]),
    "max-flops nan": (lambda d: ["--max-flops", "nan", "w1"], ["--max-flops", "nan"]),
    "max-flops inf": (lambda d: ["--max-flops", "inf", "w1"], ["--max-flops", "inf"]),
    "batch-size 0": (lambda d: ["--batch-size", "0", "w1"], ["--batch-size", "at least 1"]),
    "unknown flag": (lambda d: ["--frobnicate", "w1"], ["--frobnicate", "--help"]),
    "missing file": (lambda d: ["--file", d / "nope.txt"], ["nope.txt", "check the path"]),
    "missing csv": (lambda d: ["--file", d / "nope.csv"], ["nope.csv", "check the path"]),
    "a directory": (lambda d: ["--file", d], ["is a directory"]),
    "binary file": (lambda d: ["--file", _write(d, "in.bin", b"\x00\x01\x02binary\xff")], ["binary"]),
    "invalid UTF-8": (lambda d: ["--file", _write(d, "in.txt", b"fine\n\xc3\x28 broken\n")], ["UTF-8", "line 2"]),
    "empty file": (lambda d: ["--file", _write(d, "in.txt", b"")], ["empty"]),
    "only empty lines": (lambda d: ["--file", _write(d, "in.txt", "\n  \n\n")], ["every input text (3) is empty"]),
    "wrong --column": (lambda d: ["--file", _write(d, "in.csv", "body,label\nw1,a\n"), "--column", "text"],
                       ["--column", "'text'", "body"]),
    "wrong --column jsonl": (lambda d: ["--file", _write(d, "in.jsonl", '{"body": "w1"}\n'), "--column", "text"],
                             ["--column", "body"]),
    "empty csv": (lambda d: ["--file", _write(d, "in.csv", b"")], ["empty"]),
    "header-only csv": (lambda d: ["--file", _write(d, "in.csv", "text,label\n")], ["no rows"]),
    "binary csv": (lambda d: ["--file", _write(d, "in.csv", b"text\n\xff\xfe\x00\x01\n")], ["UTF-8"]),
    "argument not UTF-8": (lambda d: [os.fsdecode(b"w1 \xff w2")], ["text argument 1", "UTF-8"]),
}


@pytest.mark.parametrize("case", list(CLASSIFY_CASES))
def test_classify_bad_input(tiny, tmp_path, capsys, unchanged, case):
    argv, words = CLASSIFY_CASES[case]
    argv = argv(tmp_path)
    unchanged.start()
    code, out, err = run(classify.main, capsys, "--model", tiny.ckpt, *argv)
    assert code == 2 and out == ""
    one_line(err, *words)


def test_classify_no_input_at_a_terminal_shows_how(tiny, capsys, monkeypatch, unchanged):
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    unchanged.start()
    code, out, err = run(classify.main, capsys, "--model", tiny.ckpt)
    assert code == 2 and out == ""
    one_line(err, "no text given", "--file", "python -m minislm.classify")


def test_classify_empty_standard_input(tiny, capsys, monkeypatch, unchanged):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"")))
    unchanged.start()
    code, out, err = run(classify.main, capsys, "--model", tiny.ckpt)
    assert code == 2 and out == ""
    one_line(err, "the input is empty")


def test_classify_numeric_looking_csv_text_and_an_empty_cell(tiny, tmp_path, capsys, unchanged):
    """"1e308" is a text to classify, not a number; an empty cell is skipped, not a TypeError."""
    f = _write(tmp_path, "in.csv", 'text,label\n1e308,x\n,y\n"w1 w2",z\n')
    unchanged.start()
    code, out, err = run(classify.main, capsys, "--model", tiny.ckpt, "--file", f, "--column", "text", "--json")
    assert code == 0 and err == ""
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["text"] for r in rows] == ["1e308", "", "w1 w2"]
    assert rows[0]["label"] in ("red", "green", "blue") and "error" in rows[1] and "label" in rows[2]
    code, out, err = run(classify.main, capsys, "--model", tiny.ckpt, "--file", f)
    assert code == 0 and out.splitlines()[1].startswith("-          (skipped: empty text")


def test_classify_huge_line_and_huge_csv_cell_are_cut(tiny, tmp_path, capsys, unchanged):
    big = "w7 " * 60_000  # 180,000 characters: over csv's default field limit and over MAX_TEXT_CHARS
    files = _write(tmp_path, "in.txt", f"w1 w2\n{big}\n"), _write(tmp_path, "in.csv", f"text\nw1 w2\n{big}\n")
    unchanged.start()
    for f in files:
        code, out, err = run(classify.main, capsys, "--model", tiny.ckpt, "--json", "--file", f)
        assert code == 0, err
        rows = [json.loads(line) for line in out.splitlines()]
        assert len(rows) == 2 and "cut to its first" in rows[1]["note"]


@pytest.mark.experts
def test_classify_tier_out_of_range_on_the_shipped_team(capsys):
    before = snapshot(SHIPPED)
    code, out, err = run(classify.main, capsys, "--tier", "99", "Stocks rallied")
    assert code == 2 and out == ""
    experts = json.loads((SHIPPED / "team.json").read_text())["config"]["experts"]
    one_line(err, "--tier", f"0 to {len(experts) - 1}", experts[-1])
    assert snapshot(SHIPPED) == before


# ---- damaged or foreign checkpoints ---------------------------------------------------------------------------
def _meta_edit(fn):
    def edit(folder):
        meta = json.loads((folder / "team.json").read_text())
        fn(meta)
        (folder / "team.json").write_text(json.dumps(meta))
    return edit


CHECKPOINT_CASES = {  # case -> (damage done to a copy of the checkpoint, words the error must hold)
    "flipped bytes in the arrays": (lambda d: flip_byte(d / "team.safetensors"), ["sha256", "damaged"]),
    "flipped byte in the header": (lambda d: flip_byte(d / "team.safetensors", offset=3), ["team.safetensors"]),
    "truncated arrays": (lambda d: (d / "team.safetensors").write_bytes((d / "team.safetensors").read_bytes()[:999]),
                         ["team.safetensors", "damaged"]),
    "no arrays file": (lambda d: (d / "team.safetensors").unlink(), ["team.safetensors"]),
    "no team.json": (lambda d: (d / "team.json").unlink(), ["no team.json"]),
    "team.json not JSON": (lambda d: (d / "team.json").write_text("{not json"), ["team.json", "not valid JSON"]),
    "team.json a list": (lambda d: (d / "team.json").write_text("[1]"), ["team.json", "not a minislm"]),
    "missing key": (_meta_edit(lambda m: m.pop("tiers")), ["team.json", "missing key 'tiers'"]),
    "missing config": (_meta_edit(lambda m: m.pop("config")), ["team.json", "missing key 'config'"]),
    "experts a string": (_meta_edit(lambda m: m["config"].__setitem__("experts", "lexical")),
                         ["team.json", "experts and label_names must be lists"]),
    "label names a number": (_meta_edit(lambda m: m["config"].__setitem__("label_names", 3)),
                             ["team.json", "must be lists"]),
    "lexical settings a string": (_meta_edit(lambda m: m["config"].__setitem__("lexical", "x")),
                                  ["team.json", "LexicalSettings"]),
    "thresholds wrong type": (_meta_edit(lambda m: m["composition"].__setitem__("thresholds", "x")), ["team.json"]),
    "unknown config field": (_meta_edit(lambda m: m["config"].__setitem__("colour", 1)), ["'colour'"]),
    "unknown expert": (_meta_edit(lambda m: m["config"].__setitem__("experts", [LEXICAL, "bert-huge"])),
                       ["'bert-huge'", "neither a pretrained expert"]),
    "older version": (_meta_edit(lambda m: m.__setitem__("version", 1)), ["version 1", "train it again"]),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_damaged_checkpoint_is_refused_by_classify_and_load(tiny, tmp_path, capsys, case):
    damage, words = CHECKPOINT_CASES[case]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny.ckpt, ckpt)
    damage(ckpt)
    before = snapshot(tmp_path)
    code, out, err = run(classify.main, capsys, "--model", ckpt, "w1 w2")
    assert code == 2 and out == ""  # never an answer, least of all a NaN one
    one_line(err, *words)
    with pytest.raises(CheckpointError):
        Team.load(ckpt)
    assert snapshot(tmp_path) == before


def test_model_that_is_not_a_checkpoint(tiny, tmp_path, capsys, unchanged):
    unchanged.start()
    for model in (tmp_path / "none", tiny.bert / "config.json", tiny.bert):
        code, out, err = run(classify.main, capsys, "--model", model, "w1")
        assert code == 2 and out == ""
        one_line(err, str(model))


def test_changed_expert_weights_are_caught_not_served(tiny, tmp_path, capsys):
    """The team's encoder is a user's folder: its weights are hashed against the checkpoint's record."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny.ckpt, ckpt)
    _meta_edit(lambda m: m["composition"].__setitem__("thresholds", [1.01]))(ckpt)  # every row reaches the encoder
    original = (tiny.bert / "model.safetensors").read_bytes()
    try:
        flip_byte(tiny.bert / "model.safetensors")
        code, out, err = run(classify.main, capsys, "--model", ckpt, "w1 w2")
        assert code == 2 and out == ""
        one_line(err, "train a new team for these weights")
    finally:
        (tiny.bert / "model.safetensors").write_bytes(original)


# ---- classify as a real process: Ctrl-C, a closed pipe, a full disk, a terminal ----------------------------------
def _long_input(tmp_path, n=20_000):
    return _write(tmp_path, "long.txt", "".join(f"w{i % 100} w{(7 * i) % 100} w{(3 * i) % 100}\n" for i in range(n)))


def _classify_cmd(tiny, *argv):
    return [sys.executable, "-m", "minislm.classify", "--model", str(tiny.ckpt), *map(str, argv)]


def test_ctrl_c_keeps_every_answer_printed(tiny, tmp_path):
    f = _long_input(tmp_path)
    # bufsize=0: readline must not read ahead, since communicate() below reads the pipe's descriptor directly
    # and would never see lines left in a buffer
    p = subprocess.Popen(_classify_cmd(tiny, "--json", "--batch-size", "1", "--file", f), cwd=REPO, env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    first = p.stdout.readline()
    p.send_signal(signal.SIGINT)
    rest, err = p.communicate(timeout=60)
    err = err.decode()
    assert p.returncode == 130 and err.count("\n") == 1 and "Traceback" not in err, err
    lines = (first + rest).decode().splitlines(keepends=True)
    assert all(line.endswith("\n") and "label" in json.loads(line) for line in lines)  # none cut in half
    assert err.startswith(f"interrupted after {len(lines)} answers")
    assert len(lines) < 20_000


def test_closed_pipe_ends_quietly(tiny, tmp_path):
    """`classify ... | head -1`: the reader goes away; no traceback, the rest is not an error."""
    f = _long_input(tmp_path)
    p = subprocess.Popen(_classify_cmd(tiny, "--batch-size", "1", "--file", f), cwd=REPO, env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 0
    assert err.startswith("output closed after ") and err.count("\n") == 1 and "Traceback" not in err, err


def test_full_disk_is_one_line(tiny, tmp_path):
    with open("/dev/full", "w") as full:  # every write fails with ENOSPC
        r = subprocess.run(_classify_cmd(tiny, "w1 w2", "w3"), cwd=REPO, env=env(), stdout=full,
                           stderr=subprocess.PIPE, timeout=60)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    one_line(err, "cannot write the answers", "No space left")


def test_no_input_at_a_real_terminal(tiny):
    primary, secondary = pty.openpty()
    try:
        r = subprocess.run(_classify_cmd(tiny), cwd=REPO, env=env(), stdin=secondary, capture_output=True,
                           timeout=60)
    finally:
        os.close(primary)
        os.close(secondary)
    assert r.returncode == 2 and r.stdout == b""
    one_line(r.stderr.decode(), "no text given", "pipe them in")


# ---- train: settings and destinations, all refused before any work -----------------------------------------------
@pytest.fixture
def csv_file(tmp_path):
    ds = toy(60, 4)
    rows = "".join(f"{t},{ds.label_names[y]}\n" for t, y in zip(ds.texts, ds.labels))
    return _write(tmp_path, "train.csv", "text,label\n" + rows)


TRAIN_FLAG_CASES = {
    "epochs 0": (["--epochs", "0"], ["--epochs", "got 0"]),
    "batch-size 0": (["--batch-size", "0"], ["--batch-size", "got 0"]),
    "lr -1": (["--lr", "-1"], ["--lr", "-1"]),
    "max-len 1": (["--max-len", "1"], ["--max-len", "[2, 512]"]),
    "val-fraction 2": (["--val-fraction", "2"], ["--val-fraction", "2.0"]),
    "balance nan": (["--balance", "nan"], ["--balance", "nan"]),
    "first tier not lexical": (["--experts", "all-MiniLM-L6-v2"], ["first tier must be 'lexical'"]),
    "unknown expert": (["--experts", LEXICAL, "bert-huge"], ["'bert-huge'", "neither a pretrained expert"]),
    "lexical twice": (["--experts", LEXICAL, LEXICAL], ["twice"]),
    "unknown fusion": (["--fusion", "blend"], ["--fusion", "blend", "--help"]),
    "epochs not a number": (["--epochs", "many"], ["--epochs", "--help"]),
}


@pytest.mark.parametrize("case", list(TRAIN_FLAG_CASES))
def test_train_bad_setting(tmp_path, capsys, csv_file, case):
    flags, words = TRAIN_FLAG_CASES[case]
    before = snapshot(tmp_path)
    code, out, err = run(train.main, capsys, "--file", csv_file, "--out", tmp_path / "out", *flags)
    assert code == 2 and out == ""  # refused before the data is read: nothing logged
    one_line(err, *words)
    assert snapshot(tmp_path) == before


def _user_folder(d):
    (d / "mine").mkdir()
    (d / "mine" / "notes.txt").write_text("my notes")
    return d / "mine"


def _checkpoint_with_a_user_file(d, tiny):
    shutil.copytree(tiny.ckpt, d / "ckpt")
    (d / "ckpt" / "README.md").write_text("what this team is")
    return d / "ckpt"


def _symlink(d, tiny):
    shutil.copytree(tiny.ckpt, d / "real")
    (d / "link").symlink_to(d / "real")
    return d / "link"


OUT_CASES = {  # --out that must be refused before any work, every file left as it was
    "a folder of the user's files": (lambda d, t: _user_folder(d), ["not a minislm checkpoint", "nothing was changed"]),
    "a file": (lambda d, t: _write(d, "model.bin", b"mine"), ["is a file"]),
    "under a file (cannot be created)": (lambda d, t: _write(d, "model.bin", b"mine") / "sub", ["cannot write"]),
    "under /proc (not writable)": (lambda d, t: Path("/proc/minislm-out"), ["cannot write", "writable folder"]),
    "a checkpoint that also holds a user's file": (_checkpoint_with_a_user_file, ["README.md", "nothing was changed"]),
    "a symbolic link": (_symlink, ["symbolic link"]),
}


@pytest.mark.parametrize("case", list(OUT_CASES))
def test_train_refuses_an_unsafe_out(tiny, tmp_path, capsys, csv_file, monkeypatch, case):
    make, words = OUT_CASES[case]
    out_path = make(tmp_path, tiny)
    before = snapshot(tmp_path)
    monkeypatch.setattr(train.data, "load_file", lambda *a: pytest.fail("data was read before --out was checked"))
    code, out, err = run(train.main, capsys, "--file", csv_file, "--out", out_path)
    assert code == 2 and out == ""
    one_line(err, "--out", *words)
    assert snapshot(tmp_path) == before


def test_train_refuses_missing_experts_before_reading_data(tmp_path, capsys, csv_file, monkeypatch):
    monkeypatch.setenv("MINISLM_WEIGHTS_DIR", str(tmp_path / "empty-store"))
    monkeypatch.setattr(train.data, "load_file", lambda *a: pytest.fail("data was read before the experts"))
    code, out, err = run(train.main, capsys, "--file", csv_file, "--out", tmp_path / "out", "--experts", LEXICAL)
    assert code == 2 and out == ""
    one_line(err, "all-MiniLM-L6-v2", "python -m minislm.weights fetch")
    assert not (tmp_path / "out").exists()


# ---- train: the data ---------------------------------------------------------------------------------------------
DATA_CASES = {  # case -> (file name, contents, words)
    "one class only": ("d.csv", "text,label\nw1,a\nw2,a\nw3,a\n", ["['a']", "two classes"]),
    "one class left after cleaning": ("d.csv", "text,label\nw1,a\nw2,a\n,b\n", ["only one class ('a')"]),
    "float labels": ("d.csv", "text,label\nw1,1.5\nw2,0\nw3,1\n", ["1.5", "whole number"]),
    "NaN label": ("d.jsonl", '{"text": "w1", "label": NaN}\n{"text": "w2", "label": 1}\n', ["row 0", "no label"]),
    "empty label cell": ("d.csv", "text,label\nw1,\nw2,b\n", ["row 0", "no label"]),
    "labels differing in case": ("d.csv", "text,label\nw1,Red\nw2,red\nw3,blue\n", ["differ only in case"]),
    "all-empty texts": ("d.csv", 'text,label\n"",a\n"  ",b\n,a\n', ["every text is empty"]),
    "missing file": (None, None, ["does not exist", "check the path"]),
    "a directory": ("", None, ["is a directory"]),
    "text file": ("d.txt", "w1\n", ["unknown file type", ".csv"]),
    "binary file": ("d.csv", b"\x00\x9f\x92\x96binary", ["UTF-8"]),
    "invalid UTF-8": ("d.csv", b"text,label\nw1,a\n\xc3\x28,b\n", ["UTF-8"]),
    "empty file": ("d.csv", b"", ["empty"]),
    "mixed label kinds": ("d.jsonl", '{"text": "w1", "label": "a"}\n{"text": "w2", "label": 1}\n', ["mix"]),
}


@pytest.mark.experts
@pytest.mark.parametrize("case", list(DATA_CASES))
def test_train_bad_data(tmp_path, capsys, case):
    name, contents, words = DATA_CASES[case]
    f = tmp_path / (name if name is not None else "nope.csv")
    if contents is not None:
        _write(tmp_path, name, contents)
    before = snapshot(tmp_path)
    code, out, err = run(train.main, capsys, "--file", f, "--out", tmp_path / "out")
    assert code == 2
    one_line(err, *words)
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


@pytest.mark.experts
@pytest.mark.parametrize("flag", ["--text-column", "--label-column"])
def test_train_wrong_column_names_the_flag(tmp_path, capsys, csv_file, flag):
    before = snapshot(tmp_path)
    code, out, err = run(train.main, capsys, "--file", csv_file, "--out", tmp_path / "out", flag, "nope")
    assert code == 2
    one_line(err, flag, "'nope'", "columns: text, label")
    assert snapshot(tmp_path) == before


@pytest.mark.experts
def test_train_lexical_alone_works_end_to_end(tmp_path, capsys, csv_file):
    code, out, err = run(train.main, capsys, "--file", csv_file, "--out", tmp_path / "out", "--experts", LEXICAL,
                         "--epochs", "2")
    assert code == 0, err
    code, out, err = run(classify.main, capsys, "--model", tmp_path / "out", "--json", "w1 w2 w3")
    assert code == 0, err
    row = json.loads(out)
    assert row["exit_tier"] == 0 and row["experts"] == [LEXICAL]


@pytest.mark.experts
def test_failed_save_keeps_the_old_checkpoint(tiny, tmp_path, capsys, csv_file, monkeypatch):
    """A full disk while the new checkpoint is written: exit 2, the old checkpoint whole, no temporary left."""
    out_path = tmp_path / "ckpt"
    shutil.copytree(tiny.ckpt, out_path)
    before = snapshot(out_path)
    monkeypatch.setattr(train, "fit", lambda team, ds, log: tiny.team)  # training is not what is tested here

    def full_disk(path, tensors, metadata=None):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_safetensors", full_disk)
    code, out, err = run(train.main, capsys, "--file", csv_file, "--out", out_path)
    assert code == 2
    one_line(err, "--out", "No space left", "nothing was replaced")
    assert snapshot(out_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "train.csv"]


@pytest.mark.parametrize("exchange", [True, False])
def test_checkpoint_swap_never_leaves_the_path_empty(tiny, tmp_path, monkeypatch, exchange):
    """Every rename and removal during a save finds a whole checkpoint at the path; when the atomic exchange is
    unavailable and the second rename fails, the old checkpoint is put back."""
    out_path = tmp_path / "ckpt"
    tiny.team.save(out_path)
    seen = []
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def replace(a, b):
        seen.append(checkpoint.is_checkpoint(out_path))
        real_replace(a, b)
        seen.append(checkpoint.is_checkpoint(out_path) or Path(b) != out_path)

    def rmtree(p, *a, **k):
        seen.append(checkpoint.is_checkpoint(out_path))
        real_rmtree(p, *a, **k)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)
    if not exchange:
        monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
    tiny.team.save(out_path)
    assert checkpoint.is_checkpoint(out_path) and (all(seen) if exchange else seen)
    if exchange:
        return
    before = snapshot(out_path)

    def second_rename_fails(a, b):
        if Path(b) == out_path and ".tmp-" in str(a):
            raise OSError(28, "No space left on device")
        real_replace(a, b)

    monkeypatch.setattr(checkpoint.os, "replace", second_rename_fails)
    with pytest.raises(OSError):
        tiny.team.save(out_path)
    assert snapshot(out_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_duplicates_never_straddle_fit_and_validation(tiny):
    rec = tiny.team.training
    fit_texts = {rec.dataset.texts[i] for i in rec.fit_idx}
    assert tiny.team.protocol["cleaning"]["duplicates"] == 30
    assert len(rec.texts_val) > 0 and not fit_texts & set(rec.texts_val)


# ---- weights: flipped bytes, the cheap check, repair -------------------------------------------------------------
@pytest.fixture
def store(tiny, tmp_path, monkeypatch):
    """A weights store whose all-MiniLM-L6-v2 is the tiny BERT folder, prepared with a manifest."""
    folder = tmp_path / "store" / "all-MiniLM-L6-v2"
    shutil.copytree(tiny.bert, folder)
    registry.write_manifest(folder, "all-MiniLM-L6-v2")
    monkeypatch.setenv("MINISLM_WEIGHTS_DIR", str(tmp_path / "store"))
    return folder


def test_verify_finds_a_flipped_byte_the_cheap_check_cannot(store, capsys):
    flip_byte(store / "model.safetensors")  # same size, same mtime
    assert registry.state(store) == "prepared"  # the cheap check trusts sizes and mtimes, by design
    before = snapshot(store.parent)
    code, out, err = run(weights.main, capsys, "verify", "--dest", store.parent)
    assert code == 2 and "model.safetensors's sha256 differs" in out
    one_line(err, "all-MiniLM-L6-v2", "python -m minislm.weights fetch")
    assert snapshot(store.parent) == before


def test_cheap_check_catches_a_changed_mtime(store, capsys):
    flip_byte(store / "model.safetensors", keep_mtime=False)
    code, out, err = run(weights.main, capsys, "list")
    assert code == 2 and "damaged" in out
    one_line(err, "all-MiniLM-L6-v2")
    with pytest.raises(registry.DamagedExpertError, match="fetch --only all-MiniLM-L6-v2"):
        load_expert("all-MiniLM-L6-v2")


def test_fetch_repairs_a_damaged_folder(tiny, store, capsys, monkeypatch):
    original = (tiny.bert / "model.safetensors").read_bytes()
    flip_byte(store / "model.safetensors", keep_mtime=False)

    def prepare(src, work, out, progress):
        for f in tiny.bert.iterdir():
            shutil.copy(f, out / f.name)

    monkeypatch.setitem(fetch_lib.PREPARE, "all-MiniLM-L6-v2", prepare)
    code, out, err = run(weights.main, capsys, "fetch", "--only", "all-MiniLM-L6-v2")
    assert code == 0, err
    assert (store / "model.safetensors").read_bytes() == original
    assert registry.integrity_problems(store, full=True) == []
    assert sorted(p.name for p in store.parent.iterdir()) == ["all-MiniLM-L6-v2"]  # nothing half-made left


@pytest.mark.parametrize("argv,words", [(["frob"], ["'frob'", "--help"]),
                                        (["fetch", "--only", "bert-huge"], ["'bert-huge'"]),
                                        ([], ["required", "--help"])])
def test_weights_usage_errors(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MINISLM_WEIGHTS_DIR", str(tmp_path))
    code, out, err = run(weights.main, capsys, *argv)
    assert code == 2 and out == ""
    one_line(err, *words)
    assert list(tmp_path.iterdir()) == []


# ---- the Python API ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("texts,kw,error,match", [
    ("w1 w2", {}, TypeError, "list of strings"),
    ([1, 2], {}, TypeError, "list of strings"),
    ([None], {}, TypeError, "list of strings"),
    ((t for t in ["w1"]), {}, TypeError, "list of strings"),
    (["w1 \udcff"], {}, ValueError, "text 0 is not valid Unicode"),
    (["w1"], {"max_tier": -1}, ValueError, "max_tier must be a whole number from 0 to 1"),
    (["w1"], {"max_tier": 1.5}, ValueError, "max_tier"),
    (["w1"], {"max_tier": True}, ValueError, "max_tier"),
    (["w1"], {"max_flops": float("nan")}, ValueError, "max_flops"),
    (["w1"], {"max_flops": "1e6"}, ValueError, "max_flops"),
    (["w1"], {"thresholds": []}, ValueError, "thresholds must be 1 finite number"),
    (["w1"], {"thresholds": [float("nan")]}, ValueError, "thresholds"),
    (["w1"], {"kind": "vibes"}, ValueError, "unknown confidence"),
])
def test_predict_proba_refuses(tiny, texts, kw, error, match):
    with pytest.raises(error, match=match):
        tiny.team.predict_proba(texts, **kw)


def test_predict_proba_answers_what_it_can(tiny):
    probs, info = tiny.team.predict_proba([])
    assert probs.shape == (0, 3)
    probs, _ = tiny.team.predict_proba(["", "w1 " * 100_000, "\x00\x01", "1e308"])
    assert probs.shape == (4, 3) and np.isfinite(probs).all() and np.allclose(probs.sum(1), 1, atol=1e-5)


@pytest.mark.parametrize("texts,labels,config,match", [
    (["w1", "w2", "w3"], [0, 0, 0], {}, "at least two classes"),
    (["w1", "w2"], [1.5, 0], {}, "1.5"),
    (["w1", "w2"], [float("nan"), 0], {}, "row 0 has no label"),
    (["w1", "w2"], ["Red", "red"], {}, "differ only in case"),
    (["", "  "], [0, 1], {}, "every text is empty"),
    ([1, 2], [0, 1], {}, "text 0 is a int"),
    (["w1", None], [0, 1], {}, "text 1 is a NoneType"),
    (["w1"], [0, 1], {}, "1 texts, 2 labels"),
    (["w1", "w2"], [0, 1], {"experts": [LEXICAL, "bert-huge"]}, "unknown expert 'bert-huge'"),
    (["w1", "w2"], [0, 1], {"experts": ["all-MiniLM-L6-v2"]}, "first tier must be 'lexical'"),
    (["w1", "w2"], [0, 1], {"max_len": 1}, "max_len"),
    (["w1", "w2"], [0, 1], {"train": {"epochs": 0}}, "epochs"),
])
def test_train_team_refuses_before_training(texts, labels, config, match, monkeypatch):
    monkeypatch.setattr("minislm.experts.lexical.LexicalModel.fit", lambda *a, **k: pytest.fail("training began"))
    with pytest.raises(ValueError, match=match):
        train_team(texts, labels, log=lambda s: None, **config)


@pytest.mark.parametrize("what,error,match", [
    ("bert-huge", FileNotFoundError, "neither a known expert"),
    (None, TypeError, "named by a string or a folder path"),
    (5, TypeError, "named by a string or a folder path"),
    ("checkpoint file", FileNotFoundError, "neither a known expert"),
    ("checkpoint folder", FileNotFoundError, "config.json is missing"),
])
def test_load_expert_refuses(tiny, what, error, match):
    arg = {"checkpoint file": str(tiny.ckpt / "team.json"), "checkpoint folder": str(tiny.ckpt)}.get(what, what)
    with pytest.raises(error, match=match):
        load_expert(arg)
