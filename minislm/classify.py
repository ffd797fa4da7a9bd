"""`python -m minislm.classify "text" ...`: topic labels from the shipped AG News team, through the cascade.

Texts come from the arguments, from --file (one text per line, or a column of a CSV / Parquet / JSONL file),
or from standard input (`--file -`; a pipe or a FIFO streams like a file, every line once, in order). Every
text starts at the near-free lexical tier and escalates to bigger experts only while the answer is not
confident enough, so easy texts cost almost nothing. Human output shows control characters escaped.

--int8 runs the encoders on int8 weights (their `<name>-int8` folders from `python -m minislm.weights quantize`,
or quantized in memory when a folder is absent, as stderr says); the heads read their features unchanged.

Answers stream: texts are read and classified --batch-size at a time and each batch's answers are printed,
in input order, as soon as it is done, so Ctrl-C or a closed pipe (`| head`) keeps every answer printed.
Exit codes: 0 ok, 2 usage or input errors, 1 other failures, 130 interrupted.
"""
import contextlib
import math
import os
import signal
import sys
import time
from pathlib import Path

from minislm.cli import Parser, drop_stdout, error, json_line, printable, reserve_standard_fds, say

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "ag_news"
MAX_TEXT_CHARS = 100_000   # longer texts are cut here (the encoders read at most max_len tokens anyway)
TABULAR = (".csv", ".parquet", ".jsonl", ".json")


class InputError(Exception):
    """Bad input from the user: reported in one line with exit code 2."""


def _lines(f, what):
    """An open binary stream (a file, a pipe, a FIFO, standard input) -> its lines as str, read once and lazily.

    The first read is checked for NUL bytes (a binary file) and then used, not re-read: a pipe cannot be read
    twice, and reopening one would drop what the check consumed (or, for a FIFO, wait for a writer that has
    left)."""
    read = getattr(f, "read1", f.read)
    head = read(8192)
    if b"\x00" in head:
        raise InputError(f"{what} looks binary (it contains NUL bytes); pass a UTF-8 text file")
    first = head.split(b"\n")
    tail = first.pop()  # an unfinished line, completed by the stream's next line
    raw = iter(first)
    n = 0

    def joined():
        yield from (line + b"\n" for line in raw)
        rest = iter(f)
        line = next(rest, b"")
        yield tail + line
        yield from rest

    for line in joined():
        if not line:
            break  # the end of the stream (an empty tail and nothing after it)
        n += 1
        try:
            yield line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            err = InputError(f"{what} is not valid UTF-8 (line {n}, byte {e.start}); re-save it as UTF-8")
            err.mid_input = n > 1
            raise err from e


def _open_text_file(path):
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{path} is a directory; pass a file with one text per line")
    try:
        return open(p, "rb")  # noqa: SIM115 (closed at exit; read lazily so answers stream)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}; check the path") from e


def text_source(args):
    """-> an iterator of raw texts (None for an empty table cell), read lazily. --file - reads standard input;
    a pipe, a FIFO or /dev/stdin streams like a file, every line once, in order."""
    if args.file == "-" or (not args.file and not args.texts):
        if sys.stdin is None or (args.file != "-" and sys.stdin.isatty()):
            raise InputError('no text given; pass texts as arguments, --file PATH, or pipe them in '
                             '(python -m minislm.classify "Stocks rallied on Wall Street")')
        return _lines(sys.stdin.buffer, "standard input")
    if args.file:
        if Path(args.file).suffix.lower() in TABULAR and not Path(args.file).is_dir():
            from minislm import data

            try:
                return iter(data.read_column(args.file, args.column))
            except data.DataError as e:
                raise InputError(str(e)) from e
        return _lines(_open_text_file(args.file), args.file)
    for n, t in enumerate(args.texts, start=1):
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:  # undecodable bytes reach sys.argv as lone surrogates
            raise InputError(f"text argument {n} is not valid UTF-8 (character {e.start}); pass UTF-8 "
                             f"text") from e
    return iter(args.texts)


def items(texts):
    """Raw texts -> (text or None when it cannot be classified, note) per input row, lazily."""
    for t in texts:
        if t is None or not t.strip():
            yield None, "empty text: nothing to classify"
        elif len(t) > MAX_TEXT_CHARS:
            yield t[:MAX_TEXT_CHARS], f"cut to its first {MAX_TEXT_CHARS:,} characters"
        else:
            yield t, ""


def chunks(it, n):
    chunk = []
    for x in it:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def load_team(path, int8=False):
    """Checkpoint folder -> Team, fetching (or repairing) the pretrained encoders it needs on first use; with int8
    its encoders run on int8 weights (Team.use_int8, saying on stderr where each came from). Each expert's
    files are hashed against its manifest once in this process (registry.content_problems), so bytes changed
    in place are repaired by a fetch, never answered with."""
    from minislm.atomic import unwritable
    from minislm.experts import fetch, registry
    from minislm.team import CheckpointError, Team

    try:
        for name in Team.experts_needed(path):
            folder = registry.weights_dir() / name
            now = registry.state(folder)
            if now == "prepared":
                problems = registry.content_problems(folder)
                now = "damaged: " + "; ".join(problems) if problems else now
            if now != "prepared":
                why = unwritable(registry.weights_dir())
                if why:
                    raise InputError(f"expert {name} must be fetched ({'first use' if now == 'missing' else now}) "
                                     f"but the weights folder {registry.weights_dir()} cannot be written ({why}); "
                                     f"set MINISLM_WEIGHTS_DIR to a writable folder")
                say(f"fetching {name} ({'first use' if now == 'missing' else now}) ...")
                fetch.fetch([name], progress=say)
        team = Team.load(path)
        if int8:
            team.use_int8(log=say)
        return team
    except CheckpointError as e:
        raise InputError(str(e)) from e


def check_numbers(args, team):
    last = len(team.cfg.experts) - 1
    if args.tier is not None and not 0 <= args.tier <= last:
        tiers = ", ".join(f"{k} {e}" for k, e in enumerate(team.cfg.experts))
        raise InputError(f"--tier must be from 0 to {last} for this team (tiers: {tiers}), got {args.tier}; pick "
                         f"one of those")
    if args.max_flops is not None and not (math.isfinite(args.max_flops) and args.max_flops > 0):
        raise InputError(f"--max-flops must be a positive number of FLOPs per text, got {args.max_flops}; give a "
                         f"budget such as 1e9")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}; use 1 or more")


def answer_batch(team, batch, args):
    """[(text or None, note)] -> list of output dicts, in order."""
    texts = [t for t, _ in batch if t is not None]
    t0 = time.perf_counter()
    probs, info = (team.predict_proba(texts, max_tier=args.tier, max_flops=args.max_flops, explain=args.explain)
                   if texts else (None, None))
    ms = 1000 * (time.perf_counter() - t0)
    names, out, j = team.cfg.label_names, [], 0
    for text, note in batch:
        if text is None:
            out.append({"text": "", "error": note})
            continue
        k = int(info["exit_tier"][j])
        row = {"text": text, "label": names[int(probs[j].argmax())],
               "probabilities": {n: round(float(p), 4) for n, p in zip(names, probs[j])},
               "exit_tier": k, "experts": info["experts"][j], "flops": float(info["flops"][j]),
               "batch_ms": round(ms, 2), "batch_rows": len(texts), "reason": info["reason"][j]}
        if team.int8:
            row["precision"] = "int8"
        if note:
            row["note"] = note
        if args.explain:
            row["explain"] = info["explain"][j]
        out.append(row)
        j += 1
    return out


def parser():
    ap = Parser(prog="python -m minislm.classify", description=__doc__.splitlines()[0])
    ap.add_argument("texts", nargs="*", help="texts to classify")
    ap.add_argument("--file", help="one text per line, or a CSV / Parquet / JSONL file (see --column)")
    ap.add_argument("--column", default="text", help="text column of a CSV / Parquet / JSONL file")
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint folder (default: the shipped AG News team)")
    ap.add_argument("--json", action="store_true", help="one JSON object per text")
    ap.add_argument("--explain", action="store_true", help="show gate / fusion weights, the tier reached and why")
    ap.add_argument("--tier", type=int, help="run at most this tier (0 = lexical only)")
    ap.add_argument("--max-flops", type=float, help="FLOP budget per text")
    ap.add_argument("--batch-size", type=int, default=64, help="texts classified (and printed) together")
    ap.add_argument("--int8", action="store_true", help="run the encoders on int8 weights (python -m minislm.weights "
                                                        "quantize writes them; else quantized in memory)")
    big = ap.add_argument_group("corpus scale (with --file; minislm.stream, minislm.distributed)")
    big.add_argument("--out", help="write the answers to this .parquet / .csv / .jsonl file in chunks, resumable")
    big.add_argument("--id-column", help="a column of the input carried into every output row")
    big.add_argument("--chunk-size", type=int, default=1000, help="rows per part file of --out")
    big.add_argument("--restart", action="store_true", help="start --out over instead of resuming it")
    big.add_argument("--overwrite", action="store_true", help="replace an existing --out file (else refused)")
    big.add_argument("--quiet", action="store_true", help="no progress bar")
    big.add_argument("--ray", action="store_true", help="classify a Parquet file with Ray Data (the distributed extra)")
    big.add_argument("--workers", type=int, default=1, help="Ray actors, one team each")
    big.add_argument("--ray-address", help="a Ray cluster to connect to (default: a local instance)")
    return ap


def run_corpus(args):
    """--out: stream a file through the team in resumable chunks (one process, or Ray actors with --ray). The
    output is checked before the team is loaded; Ctrl-C says what was kept and how to resume."""
    from minislm import stream

    if not args.file:
        raise InputError("--out needs --file (a CSV, Parquet or JSONL file to classify)")
    if args.chunk_size < 1 or args.workers < 1:
        raise InputError("--chunk-size and --workers must be at least 1")
    if args.ray:
        if args.int8:
            raise InputError("--int8 is not supported with --ray yet; run without --ray (one process streams --out "
                             "with --int8) or without --int8")
        if Path(args.out).is_file() and not args.overwrite:
            raise InputError(f"the output {args.out} already exists; pass --overwrite to replace it, or name a new "
                             f"file (nothing was changed)")
        from minislm import distributed

        summary = distributed.classify_ray(args.file, args.out, args.model, args.column, args.id_column,
                                           address=args.ray_address, workers=args.workers, max_tier=args.tier,
                                           max_flops=args.max_flops)
    else:
        try:
            stream.check_output(args.out, args.overwrite)
            stream._check_input(Path(args.file))
            team = load_team(args.model, args.int8)
            check_numbers(args, team)
            summary = stream.run_stream(args.file, args.out, args.model, text_column=args.column,
                                        id_column=args.id_column, chunk_size=args.chunk_size, max_tier=args.tier,
                                        max_flops=args.max_flops, restart=args.restart, progress=not args.quiet,
                                        team=team, overwrite=args.overwrite)
        except KeyboardInterrupt:
            say(f"interrupted: {_kept(stream, args.out)}")
            return 130
        except stream.StreamError as e:
            kept = stream.saved_progress(args.out)
            if kept and kept[0] and not isinstance(e, stream.ResumeError):
                raise InputError(f"{e} ({kept[0]:,} rows before it are saved in {stream.work_dir(args.out)})") from e
            raise
    rows = summary.get("rows") if isinstance(summary, dict) else None
    say(f"wrote {args.out}" + (f" ({rows} rows)" if rows is not None else ""))
    return 0


def _kept(stream, out):
    """What an interrupted --out run kept, and how to go on."""
    kept = stream.saved_progress(out)
    if not kept or not kept[0]:
        return f"no chunk was finished, nothing was kept; {out} was not written"
    rows, chunks = kept
    return (f"{rows:,} rows are saved in {stream.work_dir(out)} ({chunks} chunk{'s' if chunks != 1 else ''}); "
            f"run the same command again to resume after row {rows:,} (--restart starts over)")


def main(argv=None):
    closed = reserve_standard_fds()
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:
        return 2 if e.code else 0
    answered = 0
    previous = signal.signal(signal.SIGINT, _Interrupt.handler) if _main_thread() else None
    try:
        if args.out or args.ray:
            if not args.out:
                raise InputError("--ray needs --out (the Parquet file or folder to write)")
            return run_corpus(args)
        if "stdout" in closed or sys.stdout is None:
            raise InputError("standard output is closed (>&-), so no answer could be shown; redirect it to a file "
                             "(> answers.txt) or write the answers with --out")
        team = load_team(args.model, args.int8)
        check_numbers(args, team)
        held, any_text, seen = [], False, 0  # skipped rows wait until a real text shows the input is usable
        try:
            for batch in chunks(items(text_source(args)), args.batch_size):
                seen += len(batch)
                any_text = any_text or any(t is not None for t, _ in batch)
                held += answer_batch(team, batch, args)
                if any_text:
                    text = "".join((json_line(out) if args.json else human(out, args.explain)) + "\n"
                                   for out in held)
                    with sigint_deferred():  # Ctrl-C lands before or after a batch, so the count is exact
                        emit(text)
                        answered += len(held)
                    held = []
        except InputError as e:
            if getattr(e, "mid_input", False):  # answers go out a whole batch at a time: say where they stop
                done = (f"{answered} answers printed before it, for lines 1-{answered}" if answered > 1 else
                        "1 answer printed before it, for line 1" if answered else "no answer printed before it")
                raise InputError(f"{e} ({done}; the lines after those were not answered)") from e
            raise
        if not seen:
            raise InputError("the input is empty; give at least one text")
        if not any_text:
            raise InputError(f"every input text ({seen}) is empty; give at least one text that is not blank")
    except InputError as e:
        error(e)
        return 2
    except KeyboardInterrupt:
        say(f"interrupted after {answered} answers (every answer printed above is complete)")
        return 130
    except BrokenPipeError:
        drop_stdout()
        say(f"output closed after {answered} answers")
        return 0
    except (ValueError, TypeError) as e:
        error(e)
        return 2
    except Exception as e:  # anything else: one line, no traceback (MINISLM_DEBUG=1 shows it)
        if os.environ.get("MINISLM_DEBUG"):
            raise
        error(f"{type(e).__name__}: {e}")
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return 0


def _main_thread():
    import threading

    return threading.current_thread() is threading.main_thread()


class _Interrupt:
    """Ctrl-C while a batch is being written and counted waits for the end of it (Python runs signal handlers
    in the main thread, whichever thread the signal reached, so a flag is enough; masking the signal is not:
    the kernel would hand it to one of Numba's threads)."""
    writing = False
    pending = False

    @staticmethod
    def handler(signum, frame):
        if _Interrupt.writing:
            _Interrupt.pending = True
        else:
            raise KeyboardInterrupt


@contextlib.contextmanager
def sigint_deferred():
    """Run the block whole: a Ctrl-C meanwhile raises KeyboardInterrupt at its end."""
    _Interrupt.writing = True
    try:
        yield
    finally:
        _Interrupt.writing = False
    if _Interrupt.pending:
        _Interrupt.pending = False
        raise KeyboardInterrupt


def emit(text):
    """Write one batch's answers in one call (an interrupt cannot cut an answer in half) and flush them."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:  # e.g. a full disk under `> answers.txt`
        drop_stdout()
        raise InputError(f"cannot write the answers ({e.strerror}); free some space or write them elsewhere") from e


def human_flops(f):
    for unit, scale in (("GFLOPs", 1e9), ("MFLOPs", 1e6), ("kFLOPs", 1e3)):
        if f >= scale:
            return f"{f / scale:.1f} {unit}"
    return f"{f:.0f} FLOPs"


def human(out, explain):
    """One answer as text for a terminal: every string from the input or the checkpoint (the text, label and
    expert names, the reason) is escaped (cli.printable), so each answer is its own line(s) and a control
    sequence is shown, never obeyed."""
    if "error" in out:
        return f"-          (skipped: {printable(out['error'])})"
    conf = max(out["probabilities"].values())
    line = (f"{printable(out['label']):<10} {conf:5.2f}  tier {out['exit_tier']} ({printable(out['experts'][-1])}, "
            f"{human_flops(out['flops'])})  {printable(out['text'][:70])}")
    if explain:
        ex = out["explain"] or {}
        extra = [f"    why: {printable(out['reason'])}"]
        for key in ("gate", "attention"):
            if key in ex:
                extra.append(f"    {key} weights: " + ", ".join(
                    f"{printable(e)}={w:.2f}" for e, w in zip(out["experts"], ex[key])))
        line += "\n" + "\n".join(extra)
    return line


if __name__ == "__main__":
    sys.exit(main())
