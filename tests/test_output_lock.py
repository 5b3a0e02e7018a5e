"""The lock that lets one fastalign process at a time write an output: refused while another process holds it,
free once that process ends in any way, shared by the ranks of one launched run."""
import errno
import os
from pathlib import Path

import pytest

import fastalign.output_lock as output_lock_module
from fastalign.cli import UsageError
from fastalign.output_lock import lock_file, output_lock
from tests.output_holder import holding, needs_fcntl

pytestmark = [needs_fcntl,   # a file a test leaves open (a ResourceWarning once collected) fails the test
              pytest.mark.filterwarnings("error::ResourceWarning", "error::pytest.PytestUnraisableExceptionWarning")]


def test_a_second_process_is_refused_while_the_first_holds_the_lock_and_proceeds_after_it(tmp_path):
    """Any spelling of the path names the same lock; the holder's normal end removes the lock file and the folder it
    made for it."""
    out = tmp_path / "sub" / "out.jsonl"
    spelled = str(tmp_path / "sub" / ".." / "sub" / "out.jsonl")
    with holding(out) as holder:
        assert (out.parent / ".out.jsonl.lock").read_text() == f"{holder.pid}\n"
        with pytest.raises(UsageError) as refused:
            with output_lock(spelled, "--output"):
                raise AssertionError("entered a block another process holds")
        assert str(refused.value) == (f"--output: {spelled!r} is being written by another fastalign process (PID "
                                      f"{holder.pid}): wait for it to end, or choose another --output")
        holder.end()
    assert not (tmp_path / "sub").exists()
    with output_lock(spelled, "--output"):
        out.write_text("record\n")
    assert os.listdir(tmp_path / "sub") == ["out.jsonl"]


def test_the_lock_file_of_a_killed_process_blocks_nothing(tmp_path):
    run = tmp_path / "run"
    with holding(run, directory=True) as holder:
        holder.kill()
    assert (run / ".fastalign.lock").read_text() == f"{holder.pid}\n"     # left behind by kill -9
    with output_lock(str(run), "--output-dir", directory=True):
        assert (run / ".fastalign.lock").read_text() == f"{os.getpid()}\n"
    assert os.listdir(run) == []


def test_the_folder_made_for_the_lock_is_removed_when_nothing_was_written(tmp_path):
    """A run refused on its inputs leaves no output directory, nor its parents that it made."""
    with pytest.raises(ValueError, match="bad input"):
        with output_lock(str(tmp_path / "a" / "b" / "run"), "--output-dir", directory=True):
            raise ValueError("bad input")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("rank, ranks_share, refused", [("1", True, False), ("0", True, True), ("1", False, True)])
def test_the_ranks_of_a_launched_run_share_rank_0s_lock(tmp_path, monkeypatch, rank, ranks_share, refused):
    """Under torchrun or accelerate only rank 0 takes the lock; a command whose ranks do not share an output takes
    it in every process."""
    monkeypatch.setenv("RANK", rank)
    out = tmp_path / "out.jsonl"
    with holding(out) as holder:
        if refused:
            with pytest.raises(UsageError, match=f"another fastalign process \\(PID {holder.pid}\\)"):
                with output_lock(str(out), "--output", ranks_share=ranks_share):
                    pass
        else:
            with output_lock(str(out), "--output", ranks_share=ranks_share):
                pass


def test_without_fcntl_nothing_is_locked(tmp_path, monkeypatch):
    """Windows has no fcntl: the command runs as it did before there were locks."""
    out = tmp_path / "out.jsonl"
    with holding(out):
        monkeypatch.setattr(output_lock_module, "fcntl", None)
        with output_lock(str(out), "--output"):
            pass


def test_a_file_system_without_locks_warns_and_runs_unlocked(tmp_path, monkeypatch, capsys):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(output_lock_module.fcntl, "flock", no_locks)
    out = tmp_path / "out.jsonl"
    with output_lock(str(out), "--output"):
        out.write_text("record\n")
    assert f"fastalign: warning: --output: cannot lock {str(out)!r} ([Errno {errno.ENOLCK}] No locks available)" \
        in capsys.readouterr().err
    assert out.read_text() == "record\n"


def test_a_lock_file_replaced_while_locking_is_locked_again(tmp_path, monkeypatch):
    """A process that opened the lock file as its holder left and removed it, while a third took a new one, has
    locked a file no one else sees: it must take the lock of the file now at the path (else two processes write)."""
    out = tmp_path / "out.jsonl"
    path = lock_file(str(out), directory=False)
    flock, replaced = output_lock_module.fcntl.flock, []

    def flock_after_a_replacement(fd, operation):
        if not replaced:
            os.unlink(path)
            open(path, "w").close()
            replaced.append(os.stat(path).st_ino)
        flock(fd, operation)

    monkeypatch.setattr(output_lock_module.fcntl, "flock", flock_after_a_replacement)
    with output_lock(str(out), "--output"):
        assert os.stat(path).st_ino == replaced[0] and Path(path).read_text() == f"{os.getpid()}\n"


def test_a_symbolic_link_to_the_output_names_its_lock(tmp_path):
    """The lock file lies beside the file a link names: a run given the link and one given the file are refused
    alike."""
    (tmp_path / "out.jsonl").write_text("record\n")
    os.symlink(tmp_path / "out.jsonl", tmp_path / "alias.jsonl")
    with holding(tmp_path / "out.jsonl") as holder:
        with pytest.raises(UsageError, match=f"another fastalign process \\(PID {holder.pid}\\)"):
            with output_lock(str(tmp_path / "alias.jsonl"), "--output"):
                pass


def test_a_longer_pid_left_in_the_lock_file_is_overwritten_whole(tmp_path):
    """The PID a refused process reports is the lock file's whole content: a killed holder's longer PID must not
    show through the new holder's shorter one."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".fastalign.lock").write_text("99999999999999\n")
    with output_lock(str(run), "--output-dir", directory=True):
        assert (run / ".fastalign.lock").read_text() == f"{os.getpid()}\n"


def test_leaving_removes_only_the_lock_file_it_holds(tmp_path):
    """A lock file found at the path on leaving that is not the one held (the held one removed by hand meanwhile,
    a new one taken by another process) is another process's lock: it stays."""
    out = tmp_path / "out.jsonl"
    path = lock_file(str(out), directory=False)
    with output_lock(str(out), "--output"):
        os.unlink(path)
        with open(path, "w") as other:
            other.write("another holder\n")
    assert Path(path).read_text() == "another holder\n"


def test_a_lock_file_that_cannot_be_made_warns_and_runs_unlocked(tmp_path, monkeypatch, capsys):
    """A folder the process may not write to: the command runs unlocked (its own checks name an output it cannot
    write either)."""
    real_open = os.open

    def refuse_lock_files(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(output_lock_module.os, "open", refuse_lock_files)
    out = tmp_path / "out.jsonl"
    with output_lock(str(out), "--output"):
        pass
    assert f"fastalign: warning: --output: cannot lock {str(out)!r} ([Errno {errno.EACCES}] Permission denied)" \
        in capsys.readouterr().err


def test_an_output_whose_folder_cannot_be_made_is_left_to_the_commands_own_check(tmp_path, capsys):
    """A parent that is a file: no lock can be made there, nor the output; the command's check of its output names
    that, so the lock runs the block without a lock or a warning."""
    (tmp_path / "file").write_text("")
    with output_lock(str(tmp_path / "file" / "out.jsonl"), "--output"):
        pass
    assert capsys.readouterr().err == "" and os.listdir(tmp_path) == ["file"]


def test_a_holder_that_has_not_written_its_pid_yet_is_named_without_one(tmp_path):
    """Between taking the lock and writing its PID the holder's lock file is empty: the refusal names no PID rather
    than an empty or garbled one."""
    out = tmp_path / "out.jsonl"
    path = lock_file(str(out), directory=False)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)   # another open file: flock refuses it as another process's
    try:
        output_lock_module.fcntl.flock(fd, output_lock_module.fcntl.LOCK_EX)
        with pytest.raises(UsageError) as refused:
            with output_lock(str(out), "--output"):
                raise AssertionError("entered a block another process holds")
        assert str(refused.value) == (f"--output: {str(out)!r} is being written by another fastalign process: wait "
                                      f"for it to end, or choose another --output")
    finally:
        os.close(fd)
