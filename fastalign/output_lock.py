"""One fastalign process at a time writes an output: a second one started on it is stopped before it writes.

`fastalign rain` appends to its --output and resumes from it, `fastalign eval` replaces its --output, and
`fastalign unlearn` writes checkpoints/, log.jsonl and model/ in its --output-dir: two processes on one output
appended every record twice, overwrote each other's records, or interleaved two runs' logs and checkpoints. Each
command holds an exclusive `fcntl.flock` on a hidden lock file while it runs (".<name>.lock" beside an output
file, ".fastalign.lock" inside an output directory), and another that finds it held stops with a UsageError
naming the option, the path and the holder's PID. The kernel releases the lock when its process ends in any
way, kill -9 included: a lock file a killed process left behind holds no lock and blocks nothing. A normal end
removes the lock file, and the folder made to hold it if that is left empty (a run refused on its inputs leaves
no output directory). Under a launcher (torchrun, accelerate) the ranks of one run share its output: rank 0
alone takes the lock, and the other ranks write only after meeting rank 0, which gets there only holding it.
Without fcntl (Windows) or on a file system that refuses locks, the command runs unlocked (the latter warns).
"""
from __future__ import annotations

import contextlib
import os
import sys

try:
    import fcntl
except ImportError:   # Windows
    fcntl = None

from fastalign.cli import UsageError

DIRECTORY_LOCK = ".fastalign.lock"


def lock_file(output: str, directory: bool) -> str:
    """The lock file of `output` (a file, or with `directory` a folder); any spelling of the path, through
    symbolic links too, names the same one."""
    real = os.path.realpath(output)
    if directory:
        return os.path.join(real, DIRECTORY_LOCK)
    folder, name = os.path.split(real)
    return os.path.join(folder, f".{name}.lock")


@contextlib.contextmanager
def output_lock(output: str, option: str, *, directory: bool = False, ranks_share: bool = False):
    """Holds the lock of `output` (the value of `option`) for the block; UsageError while another process holds
    it. With `ranks_share`, a launcher's ranks other than 0 (RANK) take none: they write beside rank 0."""
    if fcntl is None or (ranks_share and os.environ.get("RANK", "0") != "0"):
        yield
        return
    path = lock_file(output, directory)
    made = _missing_folders(os.path.dirname(path))
    fd = _acquire(path, option, output)
    try:
        yield
    finally:
        if fd is not None:
            if _same_file(fd, path):   # before the lock goes: one who opened the file finds it gone, and retries
                os.unlink(path)
            os.close(fd)
        for folder in made:   # deepest first
            try:
                os.rmdir(folder)
            except OSError:   # not empty: it holds the output
                break


def _acquire(path: str, option: str, output: str) -> int | None:
    """A descriptor of `path` holding its lock; None where its folder cannot be made (the command's own checks
    name that problem: no output can be written there either) or the file system refuses a lock."""
    while True:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        except OSError:
            return None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:   # a read-only folder
            return _unlocked(option, output, exc)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            pid = f" (PID {holder})" if holder.isdigit() else ""
            raise UsageError(f"{option}: {output!r} is being written by another fastalign process{pid}: wait for it "
                             f"to end, or choose another {option}") from None
        except OSError as exc:   # a file system without locks (ENOLCK, EOPNOTSUPP)
            os.close(fd)
            return _unlocked(option, output, exc)
        if _same_file(fd, path):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)   # locked a file its holder removed on leaving: take the one now at `path`


def _same_file(fd: int, path: str) -> bool:
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (here.st_dev, here.st_ino)


def _unlocked(option: str, output: str, exc: OSError) -> None:
    print(f"fastalign: warning: {option}: cannot lock {output!r} ({exc}): nothing stops another fastalign "
          "process from writing it meanwhile", file=sys.stderr)


def _missing_folders(folder: str) -> list:
    """`folder` and its parents that do not exist, deepest first."""
    missing = []
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing
