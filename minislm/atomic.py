"""Atomic file writes: write to a temporary file beside the target, then rename over it; and a lock that keeps
two processes from writing the same target at once.

A crash or Ctrl-C in the middle leaves the previous file intact, never a half-written one. Two runs writing
one target would each finish with "saved" while the later rename silently replaced the other's result, so a
writer holds `exclusive(target)` for its whole run: a second one is refused at once, naming the first.
"""
import fcntl
import json
import os
import tempfile
from contextlib import contextmanager


class LockedError(ValueError):
    """Another process is writing the same target."""

    def __init__(self, path, pid):
        self.path, self.pid = path, pid
        super().__init__(f"{path} is being written by another minislm process (pid {pid or 'unknown'}); wait for "
                         f"it to finish or choose another path (nothing was changed)")


_held = {}  # lock file -> how many times this process holds it (a writer's save inside its own run)


def lock_path(path):
    """The lock file of a target: .<name>.lock beside it."""
    path = os.path.abspath(os.fspath(path))
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")


def _acquire(lock, path):
    """-> the descriptor of `lock`, flock-ed by this process, or LockedError. A holder removes the file while
    still holding it, so a lock taken on a file that is no longer at its path is dropped and taken again."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            raise LockedError(path, pid) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return fd
        os.close(fd)


@contextmanager
def exclusive(path):
    """Hold the target's lock (.<name>.lock beside it, an flock) while the block runs; LockedError at once if
    another process holds it. Re-entrant within a process. Folders made to hold the lock file, and the file
    itself, are removed on the way out when nothing else was put in them."""
    lock = lock_path(path)
    if lock in _held:
        _held[lock] += 1
        try:
            yield
        finally:
            _held[lock] -= 1
        return
    made, folder = [], os.path.dirname(lock)
    while not os.path.isdir(folder):
        made.append(folder)
        folder = os.path.dirname(folder)
    fd = None
    try:
        for d in reversed(made):
            os.mkdir(d)
        fd = _acquire(lock, os.fspath(path))
        _held[lock] = 1
        yield
    finally:
        if fd is not None:
            del _held[lock]
            try:
                os.unlink(lock)
            except OSError:
                pass
            os.close(fd)
        for d in made:  # innermost first
            try:
                os.rmdir(d)
            except OSError:
                break


@contextmanager
def atomic_path(path):
    """Yield a temporary path in the target's folder; on success it is renamed to `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path, obj):
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")


def write_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def save_safetensors(path, tensors, metadata=None):
    """tensors: name -> contiguous numpy array; metadata: str -> str."""
    from safetensors.numpy import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def unwritable(folder):
    """-> why files cannot be created in `folder` (or, while it does not exist, in its nearest existing
    ancestor, where it would be made), or None when they can. Tried with a real file, removed at once: mode bits
    say nothing of read-only mounts or of root."""
    folder = os.path.abspath(os.fspath(folder))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"{folder} is not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".minislm-write-test-"):
            pass
    except OSError as e:
        return f"cannot write in {folder}: {e.strerror or e}"
    return None
