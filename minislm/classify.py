"""`python -m minislm.classify "text" ...`: topic labels from the shipped AG News team, through the cascade.

Texts come from the arguments, from --file (one text per line, or a column of a CSV / Parquet / JSONL file),
or from standard input. Every text starts at the near-free lexical tier and escalates to bigger experts only
while the answer is not confident enough, so easy texts cost almost nothing.
Exit codes: 0 ok, 2 usage or input errors, 1 other failures.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "ag_news"
MAX_TEXT_CHARS = 100_000   # longer lines are cut here (the encoders read at most max_len tokens anyway)
TABULAR = (".csv", ".parquet", ".jsonl", ".json")


class InputError(Exception):
    """Bad input from the user: reported in one line with exit code 2."""


def read_lines(path):
    """A text file -> (texts, notes): one text per non-empty line; invalid UTF-8 or binary data is refused."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{path} is a directory; pass a file with one text per line")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from e
    if b"\x00" in raw[:8192]:
        raise InputError(f"{path} looks binary (it contains NUL bytes); pass a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not valid UTF-8 (byte {e.start}); re-save it as UTF-8") from e
    return text.splitlines()


def read_table(path, column):
    from minislm import data

    try:
        ds = data.load_file(path, text_column=column, label_column=column)
    except (data.DataError, FileNotFoundError) as e:
        raise InputError(str(e)) from e
    return ds.texts


def gather(args):
    """-> list of (text or None for a line that cannot be classified, note)."""
    if args.file:
        if Path(args.file).suffix.lower() in TABULAR and not Path(args.file).is_dir():
            lines = read_table(args.file, args.column)
        else:
            lines = read_lines(args.file)
    elif args.texts:
        lines = args.texts
    elif not sys.stdin.isatty():
        try:
            lines = sys.stdin.buffer.read().decode("utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise InputError(f"standard input is not valid UTF-8 (byte {e.start})") from e
    else:
        raise InputError('no text given: pass texts as arguments, --file PATH, or pipe them in '
                         '(python -m minislm.classify "Stocks rallied on Wall Street")')
    items = []
    for line in lines:
        if not line.strip():
            items.append((None, "empty line: nothing to classify"))
        elif len(line) > MAX_TEXT_CHARS:
            items.append((line[:MAX_TEXT_CHARS], f"cut to its first {MAX_TEXT_CHARS:,} characters"))
        else:
            items.append((line, ""))
    if not any(t is not None for t, _ in items):
        raise InputError("every input line is empty: nothing to classify")
    return items


def load_team(path):
    """Checkpoint folder -> Team, fetching the pretrained encoders it needs on first use (they are never
    committed; the lexical expert reads all-MiniLM-L6-v2's WordPiece vocabulary)."""
    from minislm import weights
    from minislm.checkpoint import CheckpointError, load, read_meta

    try:
        meta = read_meta(path)
        needed = [e for e in meta["config"]["experts"] if e in weights.EXPERTS] + ["all-MiniLM-L6-v2"]
        for name in dict.fromkeys(needed):
            if not weights.is_prepared(weights.weights_dir() / name):
                print(f"fetching {name} (first use) ...", file=sys.stderr)
                weights.fetch([name], progress=lambda s: print(s, file=sys.stderr))
        return load(path)
    except CheckpointError as e:
        raise InputError(str(e)) from e


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minislm.classify", description=__doc__.splitlines()[0])
    ap.add_argument("texts", nargs="*", help="texts to classify")
    ap.add_argument("--file", help="one text per line, or a CSV / Parquet / JSONL file (see --column)")
    ap.add_argument("--column", default="text", help="text column of a CSV / Parquet / JSONL file")
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint folder (default: the shipped AG News team)")
    ap.add_argument("--json", action="store_true", help="one JSON object per text")
    ap.add_argument("--explain", action="store_true", help="show gate / fusion weights, the tier reached and why")
    ap.add_argument("--tier", type=int, help="run at most this tier (0 = lexical only)")
    ap.add_argument("--max-flops", type=float, help="FLOP budget per text")
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return 2 if e.code else 0
    try:
        items = gather(args)
        team = load_team(args.model)
        texts = [t for t, _ in items if t is not None]
        t0 = time.perf_counter()
        probs, info = team.predict_proba(texts, max_tier=args.tier, max_flops=args.max_flops, explain=args.explain)
        ms = 1000 * (time.perf_counter() - t0)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # anything else: one line, no traceback (MINISLM_DEBUG=1 shows it)
        if os.environ.get("MINISLM_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    names = team.cfg.label_names
    j = 0
    for text, note in items:
        if text is None:
            out = {"text": "", "error": note}
        else:
            k = int(info["exit_tier"][j])
            out = {"text": text, "label": names[int(probs[j].argmax())],
                   "probabilities": {n: round(float(p), 4) for n, p in zip(names, probs[j])},
                   "exit_tier": k, "experts": info["experts"][j], "flops": float(info["flops"][j]),
                   "latency_ms": round(ms / max(1, len(texts)), 2), "reason": info["reason"][j]}
            if note:
                out["note"] = note
            if args.explain:
                out["explain"] = info["explain"][j]
            j += 1
        print(json.dumps(out, ensure_ascii=False) if args.json else human(out, args.explain))
    return 0


def human_flops(f):
    for unit, scale in (("GFLOPs", 1e9), ("MFLOPs", 1e6), ("kFLOPs", 1e3)):
        if f >= scale:
            return f"{f / scale:.1f} {unit}"
    return f"{f:.0f} FLOPs"


def human(out, explain):
    if "error" in out:
        return f"-          (skipped: {out['error']})"
    conf = max(out["probabilities"].values())
    line = (f"{out['label']:<10} {conf:5.2f}  tier {out['exit_tier']} ({out['experts'][-1]}, "
            f"{human_flops(out['flops'])})  {out['text'][:70]}")
    if explain:
        ex = out["explain"] or {}
        extra = [f"    why: {out['reason']}"]
        for key in ("gate", "attention"):
            if key in ex:
                extra.append(f"    {key} weights: " + ", ".join(
                    f"{e}={w:.2f}" for e, w in zip(out["experts"], ex[key])))
        line += "\n" + "\n".join(extra)
    return line


if __name__ == "__main__":
    sys.exit(main())
