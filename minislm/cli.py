"""What the command-line tools share: an argument parser whose usage errors are one line, text made safe for a
terminal, and standard streams that may be closed, or die, while the work goes on.

Every tool's human output and every error line go through `printable`: a control character (an ESC that
clears the screen, a newline that splits one answer or one error line in two, a bidi override that reorders a
line) from an argument, a file, a column name or a checkpoint's label names is shown escaped (`\\x1b`, `\\n`,
`\\u202e`), never sent raw to the terminal. JSON output stays JSON (`json_line`).
"""
import argparse
import json
import os
import re
import sys

# C0 and C1 controls, DEL, and the Unicode characters that break or reorder a line on a terminal
# (line / paragraph separators, bidi marks, embeddings, overrides and isolates)
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


class Parser(argparse.ArgumentParser):
    """argparse with a usage error in one line (argparse's own prints the whole usage first)."""

    def error(self, message):
        self.exit(2, f"error: {printable(message)}; see `{self.prog} --help`\n")


def _escaped(match):
    c = match.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def printable(text):
    """str -> the same text with every control character escaped: one line, nothing the terminal obeys."""
    return CONTROL.sub(_escaped, str(text))


def json_line(obj):
    """obj -> one line of JSON whose strings hold no raw control character (json.dumps escapes C0 itself;
    C1, DEL and the line-breaking Unicode characters are escaped here as \\uXXXX, which JSON reads back)."""
    return CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(obj, ensure_ascii=False))


def say(message):
    """One line on stderr, escaped; a closed or dead stderr is ignored (there is nowhere left to say it)."""
    try:
        if sys.stderr is not None:
            print(printable(message), file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def error(message):
    """The `error: <problem>; <remedy>` line every tool ends with on bad input."""
    say(f"error: {message}")


def reserve_standard_fds():
    """A standard stream closed by the caller (`>&-`, `<&-`) gets /dev/null on its descriptor, so no file this
    process opens later lands on 0, 1 or 2 (a library writing to "stdout" would write into it). Python has
    already set sys.stdin / sys.stdout to None for such a stream, which is how the tools tell it was closed.
    -> the names of the streams found closed."""
    closed = []
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            new = os.open(os.devnull, os.O_RDWR)
            if new != fd:
                os.dup2(new, fd)
                os.close(new)
            closed.append(name)
    return closed


def drop_stdout():
    """Point stdout at /dev/null, so Python's final flush of an unwritable output raises no second error."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
    finally:
        os.close(null)
    if sys.stdout is not None:
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass


class Log:
    """Standard output for a tool whose result does not depend on it (train's log, a listing): a write that
    fails (a closed pipe, a full disk, a closed descriptor) stops the output, never the work. `lost` is None
    while the output works, else why it stopped. Each line is escaped (printable)."""

    def __init__(self):
        self.lost = None if sys.stdout is not None else "is closed"

    def __call__(self, *parts):
        if self.lost:
            return
        try:
            print(printable(" ".join(map(str, parts))), flush=True)
        except OSError as e:
            self.lost = "is a closed pipe" if isinstance(e, BrokenPipeError) else f"failed ({e.strerror or e})"
            drop_stdout()
