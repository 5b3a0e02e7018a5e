"""Whether this process can write an output where its user asked, found before any model loads. Found by trying
(opening a file to append, making and removing a file in a directory), not from permission bits: those say
nothing for root, and nothing of a read-only mount. A disk that fills up while a run writes is told by the errors of
the writers (naming_a_full_disk)."""
import contextlib
import errno
import os
import re
import tempfile

# a write that failed for want of space: the disk full, or the user's quota spent
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def cannot_create_in(folder: str) -> str | None:
    """Why no file can be made in the existing directory `folder`, or None where one can (one is made and removed)."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".fastalign-write-check-")
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.remove(probe)
    return None


def not_a_regular_file(path: str) -> str | None:
    """What `path` is ("is a directory", "is not a regular file (a pipe or a device)") where it exists and is no
    regular file, else None: a command that writes there would block, opening a pipe, until a reader came (forever,
    once its work was done), or fail on a directory; the checks before its work refuse both."""
    if os.path.isdir(path):
        return "is a directory"
    if os.path.exists(path) and not os.path.isfile(path):
        return "is not a regular file (a pipe or a device)"
    return None


def cannot_append_to(path: str) -> str | None:
    """Why the existing file `path` cannot be opened for writing, or None where it can (opened, nothing written)."""
    try:
        with open(path, "a", encoding="utf-8"):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


class DiskFullError(OSError):
    """A write to `filename` that failed for want of space (errno ENOSPC or EDQUOT), said in one line."""

    def __str__(self):
        return f"cannot write {self.filename}: the disk is full ({self.strerror})"


def disk_full_errno(exc: BaseException) -> int | None:
    """ENOSPC or EDQUOT where `exc` is a write that failed for want of space, else None: an OSError, torch.save's
    RuntimeError (its writer's "unexpected pos"), raised as the OSError of the file's write was handled, or
    safetensors' SafetensorError (save_pretrained's weights), whose I/O error ends "(os error 28)"."""
    if isinstance(exc, RuntimeError):
        exc = exc.__cause__ or exc.__context__
    if isinstance(exc, OSError):
        code = exc.errno
    elif type(exc).__name__ == "SafetensorError":
        match = re.search(r"\(os error (\d+)\)", str(exc))
        code = match and int(match[1])
    else:
        return None
    return code if code in DISK_FULL_ERRNOS else None


@contextlib.contextmanager
def naming_a_full_disk(path):
    """Raises DiskFullError for a write in the block that failed for want of space (disk_full_errno), naming the
    file its error names (a cache or temporary file written inside the block), else `path` (a write's OSError names
    none, torch.save's and safetensors' errors read as no full disk); other errors, and a DiskFullError of a write
    inside it, go through as they are."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        code = disk_full_errno(exc)
        if code is None:
            raise
        raise DiskFullError(code, os.strerror(code), str(getattr(exc, "filename", None) or path)) from exc
