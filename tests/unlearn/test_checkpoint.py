"""Checkpoint files: invisible until complete, the `latest` pointer replaced in one step, exactly the newest
`keep` checkpoints kept."""
import os

import pytest

from fastalign.unlearn import checkpoint


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
