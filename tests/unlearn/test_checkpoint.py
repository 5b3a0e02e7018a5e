"""Checkpoint files: invisible until complete, the `latest` pointer replaced in one step, exactly the newest
`keep` checkpoints kept."""
import os
import pathlib
import random
import shutil
import threading
import zipfile

import numpy as np
import pytest
import torch

from fastalign.unlearn import checkpoint
from tests.conftest import requires_cuda
from tests.unlearn.test_trainer import run as run_trainer
from tests.unlearn.tiny import byte_bpe_tokenizer, tiny_streams


def write(output_dir, step, keep=0):
    return checkpoint.write_checkpoint(str(output_dir), step, {"step": step}, {"rank": 0}, rank=0, is_main=True,
                                       barrier=lambda: None, keep=keep)


def test_checkpoint_is_invisible_until_complete(tmp_path, monkeypatch):
    real_save, seen = checkpoint.save_file, []
    final = tmp_path / "checkpoints" / "step-000007"

    def observing_save(obj, path):
        seen.append((os.path.basename(path), final.exists(), checkpoint.latest_checkpoint(str(tmp_path))))
        real_save(obj, path)

    monkeypatch.setattr(checkpoint, "save_file", observing_save)
    write(tmp_path, 7)
    assert seen == [("rank-0.pt", False, None), ("state.pt", False, None)]
    assert checkpoint.latest_checkpoint(str(tmp_path)) == str(final)
    assert sorted(os.listdir(final)) == ["rank-0.pt", "state.pt"]
    assert checkpoint.read_checkpoint(str(final), 0) == ({"step": 7}, {"rank": 0})


def test_write_text_atomic_keeps_the_old_file_until_the_new_one_is_complete(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    target.write_text("old")
    real_fsync, seen = os.fsync, []

    def observing_fsync(fd):
        seen.append(target.read_text())
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", observing_fsync)
    checkpoint.write_text_atomic(str(target), "new")
    assert seen == ["old"] and target.read_text() == "new"
    assert os.listdir(tmp_path) == ["run.json"]


@pytest.mark.parametrize("keep,kept", [(2, [3, 4]), (1, [4]), (0, [1, 2, 3, 4])])
def test_keep_checkpoints_keeps_exactly_the_newest(tmp_path, keep, kept):
    for step in range(1, 5):
        write(tmp_path, step, keep)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest"] + [f"step-{s:06d}" for s in kept]


def test_checkpoints_past_step_999999_keep_the_earlier_ones_in_step_order(tmp_path):
    """Names compared as text put step-999000 after step-1000000: the run's first 7-digit checkpoint took every
    earlier one for a killed run's and deleted it (keep=0, "keep all", lost them). Names that only look like a
    checkpoint's (step-1, step-0000005, step-x) are no checkpoint of the run's: never deleted."""
    start = random.randrange(990_000, 999_000)
    steps = [start, 999_999, 1_000_000, 1_000_000 + random.randrange(1, 10**6), 10**7 + 1]
    others = ["step-1", "step-0000005", "step-x", "step-"]
    for name in others:
        os.makedirs(tmp_path / "checkpoints" / name)
    for i, step in enumerate(steps):
        write(tmp_path, step)
        names = [f"step-{s:06d}" for s in steps[:i + 1]]
        assert sorted(os.listdir(tmp_path / "checkpoints")) == sorted(["latest"] + names + others)
    write(tmp_path, steps[-1] + 1, keep=2)   # the newest two by step
    names = [f"step-{s:06d}" for s in (steps[-1], steps[-1] + 1)]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == sorted(["latest"] + names + others)
    write(tmp_path, start, keep=0)   # resumed from before them: the later ones are a killed run's
    assert sorted(os.listdir(tmp_path / "checkpoints")) == sorted(["latest", f"step-{start:06d}"] + others)


class Killed(Exception):
    pass


def kill_at_the_rename_of(name, monkeypatch):
    """os.replace raises Killed when it would rename the file or directory called `name`; else renames."""
    real_replace = os.replace

    def killed_at_the_rename(src, dst):
        if os.path.basename(src) == name:
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_rename)


def test_a_write_killed_before_its_rename_leaves_the_previous_checkpoint_latest(tmp_path, monkeypatch):
    """The checkpoint is renamed into place before `latest` names it: a run killed between the two resumes from
    the previous checkpoint (`latest` written first would name a directory not yet in place: no resume)."""
    write(tmp_path, 1)
    kill_at_the_rename_of(".tmp-step-000002", monkeypatch)
    with pytest.raises(Killed):
        write(tmp_path, 2)
    assert checkpoint.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoints" / "step-000001")


def test_every_file_of_a_checkpoint_is_on_disk_before_latest_names_it(tmp_path, monkeypatch):
    """A crash of the machine (not only of the process) must not leave `latest` naming files whose data were
    still in the page cache: each file, `latest` included, is fsynced before it is renamed into place."""
    real_fsync, synced = os.fsync, []

    def recording_fsync(fd):
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    final = write(tmp_path, 3)
    written = [os.path.join(final, "rank-0.pt"), os.path.join(final, "state.pt"), tmp_path / "checkpoints" / "latest"]
    assert sorted(synced) == sorted(os.stat(path).st_ino for path in written)


def test_a_failed_atomic_directory_leaves_the_old_one_and_no_temporary(tmp_path):
    """model/ and adapter/ are written through atomic_directory: a failure while writing keeps what was there
    and leaves nothing behind."""
    target = tmp_path / "model"
    with checkpoint.atomic_directory(str(target)) as tmp:
        pathlib.Path(tmp, "weights").write_text("old")
    with pytest.raises(Killed):
        with checkpoint.atomic_directory(str(target)) as tmp:
            pathlib.Path(tmp, "weights").write_text("half")
            raise Killed
    assert os.listdir(tmp_path) == ["model"] and (target / "weights").read_text() == "old"
    with checkpoint.atomic_directory(str(target)) as tmp:
        pathlib.Path(tmp, "weights").write_text("new")
    assert os.listdir(tmp_path) == ["model"] and os.listdir(target) == ["weights"]
    assert (target / "weights").read_text() == "new"


@pytest.mark.parametrize("next_step", [5, 4], ids=["same-step", "another-step"])
def test_a_checkpoint_left_past_latest_by_a_killed_run_is_dropped_not_kept(tmp_path, monkeypatch, next_step):
    """A run killed after renaming step 5 into place but before `latest` named it resumes from step 2; its next
    checkpoint (step 5 again, written over the killed run's, or step 4 after --save-every changed) must be the one
    `latest` names and keeps, not the killed run's step 5 (newest by name, so keep=1 kept it and deleted the
    checkpoint just written)."""
    write(tmp_path, 2, keep=1)
    real_write_text = checkpoint.write_text_atomic

    def killed_before_latest(path, text):
        raise Killed

    monkeypatch.setattr(checkpoint, "write_text_atomic", killed_before_latest)
    with pytest.raises(Killed):
        write(tmp_path, 5, keep=1)
    monkeypatch.setattr(checkpoint, "write_text_atomic", real_write_text)
    assert checkpoint.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoints" / "step-000002")
    final = write(tmp_path, next_step, keep=1)   # the resumed run's next checkpoint
    assert checkpoint.latest_checkpoint(str(tmp_path)) == final
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", f"step-{next_step:06d}"]


def test_a_process_the_checkpoint_has_no_state_for_gets_the_resume_error_naming_the_number_of_processes(tmp_path):
    """Resuming a 2-process run with 3 processes: the third process finds no rank-2.pt. It raised a RuntimeError,
    which `fastalign unlearn` does not report as an error of the run (a traceback on that process while the others
    print the error), and named no number of processes to resume with."""
    written = checkpoint.write_checkpoint(str(tmp_path), 3, {"step": 3, "num_processes": 2}, {"rank": 0}, rank=0,
                                          is_main=True, barrier=lambda: None, keep=0)
    with pytest.raises(ValueError, match=r"cannot resume .*step-000003: it has no state for process 2: it was "
                                         r"written by 2 process\(es\)"):
        checkpoint.read_checkpoint(written, 2)
    with pytest.raises(ValueError, match=r"no state for process 3: it was written by 2 process\(es\)"):  # not the rank
        checkpoint.read_checkpoint(written, 3)


@pytest.mark.parametrize("damage", ["removed", "truncated state", "truncated rank state", "emptied state"])
def test_a_damaged_checkpoint_is_an_error_naming_it_and_the_way_on(tmp_path, damage):
    """Checkpoints are written atomically, but a user may remove one by hand or a disk may cut one: resuming from
    it is a ValueError (what the command reports as an error, not a traceback) naming the file and the way on."""
    write(tmp_path, 1)
    final = pathlib.Path(write(tmp_path, 2))
    if damage == "removed":
        for name in os.listdir(final):
            os.remove(final / name)
        with pytest.raises(ValueError, match=r"names .*step-000002, which is not a complete checkpoint .*start over"):
            checkpoint.latest_checkpoint(str(tmp_path))
        return
    file = final / ("rank-0.pt" if damage == "truncated rank state" else "state.pt")
    file.write_bytes(file.read_bytes()[:0 if damage == "emptied state" else 40])   # emptied: torch raises EOFError
    with pytest.raises(ValueError, match=rf"cannot resume from {file}: it cannot be read .*checkpoints/latest"):
        checkpoint.read_checkpoint(checkpoint.latest_checkpoint(str(tmp_path)), 0)


def test_every_byte_of_a_file_is_written_out_before_it_is_fsynced(tmp_path, monkeypatch):
    """fsync flushes only what the OS holds: without flushing Python's buffer first, a small file (`latest`) was
    still in that buffer when fsynced, and a machine crash left it empty or cut."""
    real_fsync, sizes = os.fsync, []

    def recording_fsync(fd):
        sizes.append((os.fstat(fd).st_ino, os.fstat(fd).st_size))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    final = write(tmp_path, 3)
    files = [os.path.join(final, "rank-0.pt"), os.path.join(final, "state.pt"), tmp_path / "checkpoints" / "latest"]
    assert sorted(sizes) == sorted((os.stat(f).st_ino, os.stat(f).st_size) for f in files)


def test_an_atomic_directory_does_not_take_in_what_a_killed_write_left_in_its_temporary(tmp_path):
    """A write killed (not failed: no cleanup ran) leaves .tmp-model with its files; the next write must start from an
    empty directory, not rename the killed write's leftovers into model/ beside its own files."""
    stale = tmp_path / ".tmp-model"
    stale.mkdir()
    (stale / "shard-of-the-killed-write").write_text("stale")
    with checkpoint.atomic_directory(str(tmp_path / "model")) as tmp:
        pathlib.Path(tmp, "weights").write_text("new")
    assert os.listdir(tmp_path) == ["model"] and os.listdir(tmp_path / "model") == ["weights"]


def test_latest_written_by_hand_with_a_trailing_newline_names_its_checkpoint(tmp_path):
    """The damaged-checkpoint error tells the user to write a checkpoint's name into `latest`: `echo step-000001 >
    latest` adds a newline, which must not make the name unreadable."""
    first = write(tmp_path, 1)
    write(tmp_path, 2)
    (tmp_path / "checkpoints" / "latest").write_text("step-000001\n")
    assert checkpoint.latest_checkpoint(str(tmp_path)) == first


def test_an_interrupt_while_writing_a_checkpoint_leaves_no_temporary(tmp_path, monkeypatch):
    """Ctrl-C (KeyboardInterrupt, not an Exception) in the middle of a checkpoint write removes the half-written
    temporary directory like any other failure."""
    write(tmp_path, 1)

    def interrupted(obj, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path, 2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-000001"]


def test_a_foreign_file_in_place_of_a_checkpoint_file_is_an_error_naming_it(tmp_path):
    """A file that is not a torch checkpoint at all (torch raises an UnpicklingError for it, neither EOFError nor
    RuntimeError) is reported like a cut one, not as a traceback."""
    final = pathlib.Path(write(tmp_path, 1))
    (final / "state.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"cannot resume from .*state.pt: it cannot be read \(UnpicklingError"):
        checkpoint.read_checkpoint(str(final), 0)


@pytest.mark.parametrize("file, content, held", [
    ("state.pt", [1, 2], "a list"), ("state.pt", {"model": {}}, r"a dict without \['step'\]"),
    ("rank-0.pt", torch.zeros(3), "a Tensor")])
def test_a_file_of_another_tool_in_place_of_a_checkpoint_file_is_an_error_naming_it(tmp_path, file, content, held):
    """Another tool's torch.save loads: its content ended the resume in a KeyError ('config') or an AttributeError
    ('list' object has no attribute 'get') traceback, not the error naming the file and the way on."""
    final = pathlib.Path(write(tmp_path, 1))
    torch.save(content, final / file)
    with pytest.raises(ValueError, match=rf"cannot resume from {final / file}: it holds {held}, not a fastalign "
                                         "checkpoint's state .*checkpoints/latest"):
        checkpoint.read_checkpoint(str(final), 0, keys=("step",))


@pytest.mark.parametrize("state", [{"step": 1, "num_processes": 2}, {"step": 1}], ids=["recorded", "unrecorded"])
def test_a_rank_file_missing_of_a_process_that_wrote_the_checkpoint_is_named_missing(tmp_path, state):
    """A checkpoint copied in part (rank-0.pt left out) was refused as written by 1 process(es), "resume with the
    number of processes it was written with": what the user did. Process 0 writes in any run, whatever it records."""
    final = pathlib.Path(checkpoint.write_checkpoint(str(tmp_path), 1, state, {"rank": 0}, rank=0, is_main=True,
                                                     barrier=lambda: None, keep=0))
    (final / "rank-0.pt").unlink()
    with pytest.raises(ValueError, match=r"cannot resume .*step-000001: its rank-0.pt is missing, though process 0 of "
                                         r"the run that wrote it saved one \(a checkpoint copied in part\?\)"):
        checkpoint.read_checkpoint(str(final), 0)


def test_each_process_of_a_checkpoint_gets_back_its_own_rank_state(tmp_path):
    """Two processes (threads meeting at a real barrier) write one checkpoint: each rank's RNG state goes to its own
    file and comes back to that rank on resume (one file for all ranks gave every process rank 0's draws)."""
    barrier = threading.Barrier(2, timeout=30)
    finals, errors = {}, []

    def process(rank):
        try:
            finals[rank] = checkpoint.write_checkpoint(str(tmp_path), 2, {"step": 2, "num_processes": 2},
                                                       {"rank": rank}, rank=rank, is_main=rank == 0,
                                                       barrier=barrier.wait, keep=0)
        except BaseException as e:   # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=process, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and finals[0] == finals[1] == checkpoint.latest_checkpoint(str(tmp_path))
    assert sorted(os.listdir(finals[0])) == ["rank-0.pt", "rank-1.pt", "state.pt"]
    for rank in (0, 1):
        assert checkpoint.read_checkpoint(finals[0], rank) == ({"step": 2, "num_processes": 2}, {"rank": rank})


def test_write_checkpoint_meets_the_other_processes_at_each_stage(tmp_path, monkeypatch):
    """The barriers order the processes: none writes before the main one made the temporary directory, the main
    one renames it only after every process wrote its file, and none returns before `latest` names the checkpoint
    (a process going on earlier writes into nothing, or resumes / finishes against a checkpoint not yet in place)."""
    tmp, final = tmp_path / "checkpoints" / ".tmp-step-000003", tmp_path / "checkpoints" / "step-000003"
    events, real_save = [], checkpoint.save_file

    def recording_save(obj, path):
        events.append(("save", os.path.basename(path)))
        real_save(obj, path)

    def recording_barrier():
        events.append(("barrier", tmp.is_dir(), checkpoint.latest_checkpoint(str(tmp_path)) == str(final)))

    monkeypatch.setattr(checkpoint, "save_file", recording_save)
    checkpoint.write_checkpoint(str(tmp_path), 3, {"step": 3}, {"rank": 0}, rank=0, is_main=True,
                                barrier=recording_barrier, keep=0)
    assert events == [("barrier", False, False), ("barrier", True, False), ("save", "rank-0.pt"),
                      ("save", "state.pt"), ("barrier", True, False), ("barrier", False, True)]


def test_an_interrupt_inside_an_atomic_directory_leaves_no_temporary(tmp_path):
    """Ctrl-C while model/ is written removes the half-written temporary like any failure does."""
    with pytest.raises(KeyboardInterrupt):
        with checkpoint.atomic_directory(str(tmp_path / "model")) as tmp:
            pathlib.Path(tmp, "weights").write_text("half")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_remove_stale_temporaries_removes_files_and_directories_and_nothing_else(tmp_path):
    """An interrupted write_text_atomic leaves a file (.tmp-run.json), an interrupted checkpoint or model a
    directory: both go, beside the output directory's and checkpoints/' own entries, which stay."""
    write(tmp_path, 1)
    (tmp_path / ".tmp-run.json").write_text("{")
    (tmp_path / ".tmp-model").mkdir()
    (tmp_path / "checkpoints" / ".tmp-latest").write_text("step-000002")
    (tmp_path / "checkpoints" / ".tmp-step-000002").mkdir()
    checkpoint.remove_stale_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoints"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-000001"]


def test_remove_stale_temporaries_leaves_entries_the_run_never_writes(tmp_path):
    """An output directory may hold the user's own entries: every name starting with .tmp- was deleted (a .tmp-notes
    directory with its files, a checkpoints/.tmp-step-5000 of another tool); only the temporary names of what the run
    writes go."""
    write(tmp_path, 1)
    (tmp_path / ".tmp-notes").mkdir()
    (tmp_path / ".tmp-notes" / "todo.txt").write_text("keep")
    (tmp_path / ".tmp-old-model").mkdir()                                  # the run's: an interrupted replace
    (tmp_path / ".tmp-model.bak").write_text("keep")
    (tmp_path / "checkpoints" / ".tmp-step-5000").mkdir()
    (tmp_path / "checkpoints" / ".tmp-old-step-000001").mkdir()            # the run's
    checkpoint.remove_stale_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [".tmp-model.bak", ".tmp-notes", "checkpoints"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [".tmp-step-5000", "latest", "step-000001"]


def test_a_checkpoint_does_not_take_in_what_a_killed_write_of_its_step_left(tmp_path):
    """A killed run (of more processes, say) leaves .tmp-step-000002 with its files: writing step 2 again must start
    from an empty directory, not put the killed write's rank files into the new checkpoint."""
    stale = tmp_path / "checkpoints" / ".tmp-step-000002"
    stale.mkdir(parents=True)
    (stale / "rank-3.pt").write_bytes(b"stale")
    final = write(tmp_path, 2)
    assert sorted(os.listdir(final)) == ["rank-0.pt", "state.pt"]


def test_a_write_text_atomic_killed_before_its_rename_leaves_a_temporary_the_next_run_removes(tmp_path, monkeypatch):
    """run.json and `latest` are written beside a temporary named like the others (.tmp-...): one left by a killed
    write must be what remove_stale_temporaries removes (another name stayed in the output directory for good)."""
    (tmp_path / "run.json").write_text("old")

    def killed_at_the_rename(src, dst):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", killed_at_the_rename)
        with pytest.raises(Killed):
            checkpoint.write_text_atomic(str(tmp_path / "run.json"), "new")
    checkpoint.remove_stale_temporaries(str(tmp_path))
    assert os.listdir(tmp_path) == ["run.json"] and (tmp_path / "run.json").read_text() == "old"


def test_a_kill_while_the_replaced_directory_is_deleted_leaves_the_new_one_complete(tmp_path, monkeypatch):
    """The old model/ is renamed aside before the new one takes its place and only then deleted: a run killed
    while deleting it (seconds for a large model) leaves the new model/ complete, never a half-deleted old one."""
    target = tmp_path / "model"
    with checkpoint.atomic_directory(str(target)) as tmp:
        for name in ("config", "weights"):
            pathlib.Path(tmp, name).write_text("old")
    real_rmtree = shutil.rmtree

    def killed_while_deleting(path, *args, **kwargs):
        if os.path.isdir(path) and os.listdir(path):   # a directory with files: delete one of them, then die
            os.remove(os.path.join(path, sorted(os.listdir(path))[0]))
            raise Killed
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_while_deleting)
    with pytest.raises(Killed):
        with checkpoint.atomic_directory(str(target)) as tmp:
            for name in ("config", "weights"):
                pathlib.Path(tmp, name).write_text("new")
    assert sorted(os.listdir(target)) == ["config", "weights"]
    assert [(target / name).read_text() for name in ("config", "weights")] == ["new", "new"]


def test_keep_counts_and_deletes_only_checkpoints(tmp_path):
    """Entries of checkpoints/ that are no checkpoint (a user's notes, a leftover temporary) are neither counted
    among the kept checkpoints nor deleted as old or stale ones."""
    write(tmp_path, 1)
    (tmp_path / "checkpoints" / "notes.txt").write_text("lr 1e-5")
    (tmp_path / "checkpoints" / ".tmp-step-000009").mkdir()
    write(tmp_path, 2, keep=1)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [".tmp-step-000009", "latest", "notes.txt", "step-000002"]


def test_a_checkpoint_that_records_no_number_of_processes_names_fewer_of_them(tmp_path):
    """Checkpoints written before num_processes was recorded lack it: the resume error for a process without state
    still reads (written by fewer processes), not a KeyError or a wrong count."""
    written = checkpoint.write_checkpoint(str(tmp_path), 3, {"step": 3}, {"rank": 0}, rank=0, is_main=True,
                                          barrier=lambda: None, keep=0)
    with pytest.raises(ValueError, match=r"no state for process 1: it was written by fewer process\(es\); resume"):
        checkpoint.read_checkpoint(written, 1)


def test_the_numpy_and_python_generator_states_of_a_rank_come_back(tmp_path):
    """A rank's state holds numpy's and Python's generator states (not plain tensors): they load back as written."""
    rank_state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    final = checkpoint.write_checkpoint(str(tmp_path), 1, {"step": 1}, rank_state, rank=0, is_main=True,
                                        barrier=lambda: None, keep=0)
    _, loaded = checkpoint.read_checkpoint(final, 0)
    assert loaded["python"] == rank_state["python"] and torch.equal(loaded["torch"], rank_state["torch"])
    assert all(np.array_equal(a, b) for a, b in zip(loaded["numpy"], rank_state["numpy"]))


def test_latest_names_its_checkpoint_relative_to_the_output_directory(tmp_path):
    """`latest` holds the checkpoint's name, not its absolute path: an output directory moved (or mounted elsewhere)
    still resumes from its own checkpoint, not from one at the old place."""
    write(tmp_path / "run", 1)
    (tmp_path / "run").rename(tmp_path / "moved")
    assert (tmp_path / "moved" / "checkpoints" / "latest").read_text() == "step-000001"
    moved = tmp_path / "moved"
    assert checkpoint.latest_checkpoint(str(moved)) == str(moved / "checkpoints" / "step-000001")


def test_an_atomic_directory_killed_between_its_renames_leaves_only_temporaries(tmp_path, monkeypatch):
    """Killed after the old model/ was renamed aside but before the new one took its place: both are temporaries
    (.tmp-...) that the next run removes, not directories left in the output directory for good."""
    target = tmp_path / "model"
    with checkpoint.atomic_directory(str(target)) as tmp:
        pathlib.Path(tmp, "weights").write_text("old")
    kill_at_the_rename_of(".tmp-model", monkeypatch)
    with pytest.raises(Killed):
        with checkpoint.atomic_directory(str(target)) as tmp:
            pathlib.Path(tmp, "weights").write_text("new")
    checkpoint.remove_stale_temporaries(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_a_checkpoint_restores_the_cuda_generator_of_the_runs_device_alone(monkeypatch):
    """Checkpoints held torch.cuda.get_rng_state_all(), every GPU's generator the process saw, and a resume restored
    them all: where it saw fewer GPUs (CUDA_VISIBLE_DEVICES narrowed, another node) torch failed with an IndexError
    once the weights had loaded, and where their order changed the states went to other GPUs. Only the run's device
    draws anything the run uses: its state alone is saved, and of an older checkpoint's list the one at its index."""
    states = [torch.full((4,), i, dtype=torch.uint8) for i in range(3)]   # the generators of the 3 GPUs seen first
    visible, restored = [3], []

    def set_rng_state(state, device="cuda"):   # torch's, failing for an index past the GPUs the process sees
        index = torch.device(device).index
        if index >= visible[0]:
            raise IndexError("tuple index out of range")
        restored.append((index, int(state[0])))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states[torch.device(device).index])
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible[0])
    saved = checkpoint.torch_rng_state(torch.device("cuda", 1))
    visible[0] = 1   # resumed on one GPU, the saving process's cuda:1
    checkpoint.set_rng_state(saved, torch.device("cuda", 0))
    assert restored == [(0, 1)]
    restored.clear()
    checkpoint.set_rng_state({**saved, "cuda": states}, torch.device("cuda", 0))   # written before 2026-12-07
    assert restored == [(0, 0)]
    with pytest.raises(ValueError, match=r"cannot restore the CUDA generator of cuda:2 \(index 2\): the checkpoint, "
                                         r"written before 2026-12-07, holds the states of the 2 GPU\(s\)"):
        checkpoint.set_rng_state({**saved, "cuda": states[:2]}, torch.device("cuda", 2))


@requires_cuda
def test_a_checkpoint_from_a_process_that_saw_more_gpus_restores_the_generator():
    """The test above with torch's own generators: an older checkpoint's list of one state more than the GPUs seen."""
    device = torch.device("cuda", 0)
    torch.zeros(1, device=device)   # CUDA initialised, as it is once the model is on the GPU
    state = checkpoint.torch_rng_state(device)
    saved = torch.cuda.get_rng_state(device)
    torch.cuda.manual_seed(123)
    checkpoint.set_rng_state(state, device)
    assert torch.equal(torch.cuda.get_rng_state(device), saved)
    torch.cuda.manual_seed(123)
    checkpoint.set_rng_state({**state, "cuda": [saved] * (torch.cuda.device_count() + 1)}, device)
    assert torch.equal(torch.cuda.get_rng_state(device), saved)


class _Payload:
    """Unpickles into a call that creates `marker`: what a tampered checkpoint file would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.mark.parametrize("file", ["state.pt", "rank-0.pt"])
def test_a_checkpoint_file_holding_code_is_refused_without_running_it(tmp_path, file):
    """Whoever could write into the output directory replaced a checkpoint file with a pickle whose loading calls a
    function: the resume unpickled it (torch.load weights_only=False) and ran the call before any of its checks. It
    is now refused, naming the file, and the call does not run."""
    final = pathlib.Path(write(tmp_path / "run", 1))
    marker = tmp_path / f"ran-{random.randrange(10**9)}"
    torch.save({"step": 1, "rank": _Payload(str(marker))}, final / file)
    with pytest.raises(ValueError, match=rf"cannot resume from .*{file}: it cannot be read \(UnpicklingError: .*"
                                         r"only tensors, builtin containers and NumPy arrays are unpickled: anything "
                                         r"else could run code"):
        checkpoint.read_checkpoint(checkpoint.latest_checkpoint(str(tmp_path / "run")), 0)
    assert not marker.exists()


def test_a_refused_global_is_named_without_torchs_advice_to_allowlist_it(tmp_path):
    """A checkpoint holding a global beyond the allowlist (here a NumPy scalar) is refused naming that global, but
    not with torch's advice to allowlist it (add_safe_globals), which would let such a file run code."""
    final = pathlib.Path(write(tmp_path / "run", 1))
    torch.save({"step": 1, "lr": np.float64(random.random())}, final / "state.pt")
    with pytest.raises(ValueError, match=r"GLOBAL numpy\.\w+\.multiarray\.scalar was not an allowed global") as e:
        checkpoint.read_checkpoint(str(final), 0)
    assert "safe_globals" not in str(e.value) and "weights_only" not in str(e.value)


@pytest.mark.parametrize("pointer", ["../../elsewhere/checkpoints/step-000001", "ABSOLUTE", "step-000001/../x", ""])
def test_a_latest_not_naming_a_checkpoint_beside_it_is_refused(tmp_path, pointer):
    """`latest` was joined to the checkpoints directory unchecked: a relative path out of it or an absolute path
    resumed from a checkpoint anywhere. Only a step name is taken."""
    elsewhere = write(tmp_path / "elsewhere", 1)
    write(tmp_path / "run", 1)
    text = elsewhere if pointer == "ABSOLUTE" else pointer
    (tmp_path / "run" / "checkpoints" / "latest").write_text(text)
    with pytest.raises(ValueError, match=r"latest holds .*, not the name of a checkpoint beside it \(step-NNNNNN\)"):
        checkpoint.latest_checkpoint(str(tmp_path / "run"))


def test_every_state_the_trainer_writes_loads_back_whole(tmp_path):
    """A real run's checkpoints (streams given NumPy integers, as a caller may) load back under weights_only, with
    every entry the trainer saves."""
    streams = tiny_streams(byte_bpe_tokenizer(), batch_size=np.int64(2), seed=np.int64(7))
    _, summary = run_trainer(tmp_path, max_steps=3, save_every=1, keep_checkpoints=2, streams=streams)
    for step in (1, 2):   # (the last step writes the model, not a checkpoint)
        state, rank_state = checkpoint.read_checkpoint(str(tmp_path / "run" / "checkpoints" / f"step-{step:06d}"), 0)
        assert state["step"] == step and state["draws"] == streams.draw_settings() and "torch" in rank_state
        assert {"data", "model_files", "last", "trainable", "optimizer", "scheduler", "compute"} <= state.keys()
    assert summary.steps == 3 and (tmp_path / "run" / "run.json").is_file()


def test_an_old_numpy_state_loads_under_either_numpy_name(tmp_path):
    """A rank file written before 2026-12-07 holds NumPy's generator state, pickled as numpy.core.multiarray's
    _reconstruct under NumPy 1 and numpy._core's under NumPy 2: it loads whichever NumPy resumes it."""
    numpy_state = np.random.default_rng().integers(0, 2**32, 624, dtype=np.uint32)
    final = checkpoint.write_checkpoint(str(tmp_path), 1, {"step": 1}, {"numpy": numpy_state}, rank=0, is_main=True,
                                        barrier=lambda: None, keep=0)
    rank_file = os.path.join(final, "rank-0.pt")
    running = np.zeros(0).__reduce__()[0].__module__.encode()
    other = b"numpy.core.multiarray" if running == b"numpy._core.multiarray" else b"numpy._core.multiarray"
    with zipfile.ZipFile(rank_file) as src:
        files = {info.filename: (info, src.read(info)) for info in src.infolist()}
    pickle_name = next(name for name in files if name.endswith("data.pkl"))
    assert running in files[pickle_name][1]
    with zipfile.ZipFile(rank_file, "w", zipfile.ZIP_STORED) as dst:
        for name, (info, data) in files.items():
            dst.writestr(info, data.replace(running, other) if name == pickle_name else data)
    _, rank_state = checkpoint.read_checkpoint(final, 0)
    assert np.array_equal(rank_state["numpy"], numpy_state)


def test_tensors_containers_and_old_generator_states_load_back(tmp_path):
    """Loading only tensors, builtins and NumPy arrays still reads the optimizer states (AdamW's, KahanAdamW's bf16
    compensations), bf16 and fp32 weights, nested dicts of lists and tuples, and a checkpoint written before
    2026-12-07 with NumPy's and Python's generator states."""
    weights = {"w": torch.randn(3, 4, dtype=torch.bfloat16), "b": torch.randn(4)}
    state = {"step": 2, "config": {"lr": 1e-3, "precision": "bf16", "lora_targets": ("q", "v"), "seed": None},
             "trainable": weights, "optimizer": {"state": {0: {"step": torch.tensor(2.0), "exp_avg": torch.randn(4),
                                                              "compensation": torch.randn(3, 4, dtype=torch.bfloat16)}},
                                                  "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}]},
             "scheduler": {"last_epoch": 2, "_last_lr": [1e-3]}, "compute": {"flops": 12.5}, "last": None}
    rank_state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    final = checkpoint.write_checkpoint(str(tmp_path), 2, state, rank_state, rank=0, is_main=True,
                                        barrier=lambda: None, keep=0)
    loaded, loaded_rank = checkpoint.read_checkpoint(final, 0)
    assert loaded.keys() == state.keys() and loaded["config"] == state["config"]
    assert all(torch.equal(loaded["trainable"][k], v) for k, v in weights.items())
    assert torch.equal(loaded["optimizer"]["state"][0]["compensation"], state["optimizer"]["state"][0]["compensation"])
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert loaded_rank["python"] == rank_state["python"]
