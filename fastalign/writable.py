"""Whether this process can write an output where its user asked, found before any model loads. Found by trying
(opening a file to append, making and removing a file in a directory), not from permission bits: those say
nothing for root, and nothing of a read-only mount."""
import os
import tempfile


def cannot_create_in(folder: str) -> str | None:
    """Why no file can be made in the existing directory `folder`, or None where one can (one is made and removed)."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".fastalign-write-check-")
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.remove(probe)
    return None


def cannot_append_to(path: str) -> str | None:
    """Why the existing file `path` cannot be opened for writing, or None where it can (opened, nothing written)."""
    try:
        with open(path, "a", encoding="utf-8"):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)
