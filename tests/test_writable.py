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
