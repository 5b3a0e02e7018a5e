"""writable: a write that failed for want of space, said in one line naming the file."""
import errno

import pytest

from fastalign.writable import DiskFullError, naming_a_full_disk


def test_a_full_disk_names_the_file_its_error_names_else_the_output():
    """A block that writes an output may also write other files (a kernel cache, a temporary file): an error naming
    its own file was said to be the output's, sending the user to free space on the wrong disk."""
    with pytest.raises(DiskFullError, match="cannot write /cache/kernel.bin: the disk is full"):
        with naming_a_full_disk("records.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device", "/cache/kernel.bin")
    with pytest.raises(DiskFullError, match="cannot write records.jsonl: the disk is full"):
        with naming_a_full_disk("records.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError) as refused, naming_a_full_disk("records.jsonl"):
        raise OSError(errno.EACCES, "Permission denied", "records.jsonl")
    assert type(refused.value) is PermissionError


def test_a_spent_quota_is_a_full_disk_too():
    """EDQUOT (the user's quota spent) is told as ENOSPC is: the docstrings name both."""
    with pytest.raises(DiskFullError, match="cannot write records.jsonl: the disk is full"):
        with naming_a_full_disk("records.jsonl"):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")


def test_a_runtime_error_raised_while_a_full_disks_write_error_was_handled_or_from_it_is_a_full_disk():
    """torch.save's RuntimeError ("unexpected pos") comes with the write's OSError as its __context__ (raised while
    that was handled); a RuntimeError raised from it has it as its __cause__: both are a full disk, one of another
    cause is not."""
    def unexpected_pos(cause, chained):
        try:
            raise cause
        except OSError as exc:
            if chained:
                raise RuntimeError("unexpected pos 704 vs 598") from exc
            raise RuntimeError("unexpected pos 704 vs 598")

    for chained in (False, True):
        with pytest.raises(DiskFullError, match="cannot write ckpt.pt: the disk is full"):
            with naming_a_full_disk("ckpt.pt"):
                unexpected_pos(OSError(errno.ENOSPC, "No space left on device"), chained)
        with pytest.raises(RuntimeError, match="unexpected pos"):
            with naming_a_full_disk("ckpt.pt"):
                unexpected_pos(OSError(errno.EIO, "Input/output error"), chained)
    with pytest.raises(DiskFullError, match="cannot write ckpt.pt: the disk is full"), naming_a_full_disk("ckpt.pt"):
        raise RuntimeError("unexpected pos 704 vs 598") from OSError(errno.ENOSPC, "No space left on device")


def test_a_disk_full_error_of_a_write_inside_goes_through_as_it_is():
    """A DiskFullError raised inside (a nested block naming its own output) is not wrapped again."""
    inner = DiskFullError(errno.ENOSPC, "No space left on device", "model/")
    with pytest.raises(DiskFullError) as raised, naming_a_full_disk("records.jsonl"):
        raise inner
    assert raised.value is inner


def test_a_safetensors_io_error_is_a_full_disk_only_for_the_os_errors_of_one():
    """save_pretrained's SafetensorError ends "(os error N)": 28 (ENOSPC) or EDQUOT's is a full disk, another
    (EIO: 5) goes through as it is."""
    from safetensors import SafetensorError

    with pytest.raises(DiskFullError, match="cannot write model: the disk is full"), naming_a_full_disk("model"):
        raise SafetensorError(f"Error while serializing: I/O error: Disk quota exceeded (os error {errno.EDQUOT})")
    with pytest.raises(SafetensorError, match="os error 5"), naming_a_full_disk("model"):
        raise SafetensorError("Error while serializing: I/O error: Input/output error (os error 5)")
