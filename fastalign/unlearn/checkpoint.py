"""Atomic checkpoints: a checkpoint directory either exists complete or not at all.

Everything is written into a hidden temporary directory next to the target, flushed to disk, and only
then renamed into place (a rename within one file system is atomic); the `latest` pointer is replaced
the same way afterwards. A run killed mid-write leaves only a temporary directory, which is never read
and is removed by the next run.

Layout: <output_dir>/checkpoints/step-000010/{state.pt, rank-0.pt, rank-1.pt, ...} and
<output_dir>/checkpoints/latest (the name of the newest complete checkpoint).
"""
from __future__ import annotations

import contextlib
import os
import shutil
from typing import Callable, Iterator

import torch

from fastalign.writable import naming_a_full_disk

CHECKPOINTS = "checkpoints"
_TMP_PREFIX = ".tmp-"


def save_file(obj, path: str) -> None:
    """torch.save, flushed to disk before returning."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: str, text: str) -> None:
    """Replaces the file at `path` with `text` in one step (readers see the old or the new file)."""
    tmp = os.path.join(os.path.dirname(path), _TMP_PREFIX + os.path.basename(path))
    with naming_a_full_disk(path), open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yields a temporary directory that becomes `path` (replacing it) only if the block succeeds; a full disk met
    in it is a DiskFullError naming `path`."""
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, _TMP_PREFIX + name)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        with naming_a_full_disk(path):
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = os.path.join(parent, _TMP_PREFIX + "old-" + name)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(output_dir: str) -> None:
    """Deletes what an interrupted write left behind."""
    for parent in (output_dir, os.path.join(output_dir, CHECKPOINTS)):
        if os.path.isdir(parent):
            for name in os.listdir(parent):
                if name.startswith(_TMP_PREFIX):
                    target = os.path.join(parent, name)
                    shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)


def latest_checkpoint(output_dir: str) -> str | None:
    """Path of the newest complete checkpoint, or None."""
    pointer = os.path.join(output_dir, CHECKPOINTS, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        path = os.path.join(output_dir, CHECKPOINTS, f.read().strip())
    if not os.path.isfile(os.path.join(path, "state.pt")):
        raise ValueError(f"{pointer} names {path}, which is not a complete checkpoint (removed by hand?): remove "
                         f"{pointer} to start over, or write the name of a complete checkpoint beside it into it")
    return path


def write_checkpoint(output_dir: str, step: int, state: dict, rank_state: dict, *, rank: int, is_main: bool,
                     barrier: Callable[[], None], keep: int) -> str:
    """Writes state (from the main process) and each process's rank_state as checkpoint `step`.

    Collective: every process calls it. keep > 0 deletes all but the newest `keep` checkpoints; checkpoints of
    later steps (a killed run's, past the one it was resumed from) are deleted in any case.
    """
    root = os.path.join(output_dir, CHECKPOINTS)
    name = f"step-{step:06d}"
    final, tmp = os.path.join(root, name), os.path.join(root, _TMP_PREFIX + name)
    barrier()
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    try:
        with naming_a_full_disk(final):
            save_file(rank_state, os.path.join(tmp, f"rank-{rank}.pt"))
            if is_main:
                save_file(state, os.path.join(tmp, "state.pt"))
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    if is_main:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(os.path.join(root, "latest"), name)
        steps = sorted(n for n in os.listdir(root) if n.startswith("step-"))
        # past this one: left by a run killed before `latest` named it, which this run (resumed before it) redoes
        stale = [n for n in steps if n > name]
        kept = [n for n in steps if n <= name]
        for old in stale + (kept[:-keep] if keep else []):
            shutil.rmtree(os.path.join(root, old))
    barrier()
    return final


def read_checkpoint(path: str, rank: int) -> tuple[dict, dict]:
    """(state, this process's rank_state) of a checkpoint; ValueError for a process it has no state for (a run
    resumed with more processes than wrote it)."""
    state = _load(os.path.join(path, "state.pt"))
    rank_file = os.path.join(path, f"rank-{rank}.pt")
    if not os.path.isfile(rank_file):
        raise ValueError(f"cannot resume {path}: it has no state for process {rank}: it was written by "
                         f"{state.get('num_processes', 'fewer')} process(es); resume with the number of processes "
                         "it was written with")
    return state, _load(rank_file)


def _load(file: str):
    """torch.load of a checkpoint file; a ValueError naming it when it cannot be read (the checkpoints are written
    atomically, so only something outside the run, a disk fault or an edit, damages one)."""
    try:
        return torch.load(file, weights_only=False)
    except Exception as e:   # a truncated or foreign file: zip, pickle or EOF errors, whichever torch meets first
        raise ValueError(f"cannot resume from {file}: it cannot be read ({type(e).__name__}: {e}); resume from an "
                         "earlier checkpoint by writing its name into checkpoints/latest, or start over") from e
