"""Atomic checkpoints: a checkpoint directory either exists complete or not at all.

Everything is written into a hidden temporary directory next to the target, flushed to disk, and only
then renamed into place (a rename within one file system is atomic); the `latest` pointer is replaced
the same way afterwards. A run killed mid-write leaves only a temporary directory, which is never read
and is removed by the next run.

Layout: <output_dir>/checkpoints/step-000010/{state.pt, rank-0.pt, rank-1.pt, ...} and
<output_dir>/checkpoints/latest (the name of the newest complete checkpoint).

Also what a checkpoint restores beyond the trainer's state (torch's generators) and the output-dir policy of a
run that starts or resumes there (resume_point; the log lines past the checkpoint, truncate_log).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from typing import Callable, Iterator

import numpy as np
import torch

from fastalign.data_files import DataError, read_jsonl
from fastalign.unlearn.config import UnlearnConfig
from fastalign.writable import naming_a_full_disk

CHECKPOINTS = "checkpoints"
_TMP_PREFIX = ".tmp-"
_STEP_NAME = re.compile(r"step-(\d{6,})")
# what a run writes atomically (under a temporary name first): in output_dir, and in its checkpoints directory
_WRITTEN_IN_OUTPUT_DIR = r"config\.json|run\.json|log\.jsonl|model|adapter"
_WRITTEN_IN_CHECKPOINTS = rf"{_STEP_NAME.pattern}|latest"
# what a checkpoint written before 2026-12-07 holds beside tensors and builtins: NumPy's generator state (an array),
# its rebuilding function pickled under NumPy 1's name or NumPy 2's (torch matches the name written in the file)
_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_NUMPY_STATE = [*((_RECONSTRUCT, f"numpy.{core}.multiarray._reconstruct") for core in ("core", "_core")),
                np.ndarray, np.dtype, type(np.dtype(np.uint32))]


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
    """Deletes what an interrupted write of the run left behind: the temporary names of what it writes (in output_dir
    and in its checkpoints), no other entry starting with .tmp- (a user's, in a directory the run shares)."""
    for parent, written in ((output_dir, _WRITTEN_IN_OUTPUT_DIR), (os.path.join(output_dir, CHECKPOINTS),
                                                                   _WRITTEN_IN_CHECKPOINTS)):
        if os.path.isdir(parent):
            for name in os.listdir(parent):
                if re.fullmatch(rf"{re.escape(_TMP_PREFIX)}(old-)?({written})", name):
                    target = os.path.join(parent, name)
                    shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)


def latest_checkpoint(output_dir: str) -> str | None:
    """Path of the newest complete checkpoint, or None."""
    pointer = os.path.join(output_dir, CHECKPOINTS, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        name = f.read().strip()
    if not _STEP_NAME.fullmatch(name):
        raise ValueError(f"{pointer} holds {name[:80]!r}, not the name of a checkpoint beside it (step-NNNNNN): a run "
                         f"resumes only from its own checkpoints; remove {pointer} to start over, or write the name of "
                         "a complete checkpoint beside it into it")
    path = os.path.join(output_dir, CHECKPOINTS, name)
    if not os.path.isfile(os.path.join(path, "state.pt")):
        raise ValueError(f"{pointer} names {path}, which is not a complete checkpoint (removed by hand?): remove "
                         f"{pointer} to start over, or write the name of a complete checkpoint beside it into it")
    return path


def resume_point(config: UnlearnConfig) -> str | None:
    """The checkpoint in config.output_dir to resume from; refuses to start over a previous run unless asked to
    resume. Reads only, so a run checks it before loading the model and data too."""
    out = config.output_dir
    foreign = _foreign_file(out) if os.path.isdir(out) else None
    if foreign:
        raise FileExistsError(f"{out} holds a {foreign} that is not a fastalign unlearn run's (is it a model's "
                              "directory, or another tool's output?), which the run would replace; choose another "
                              "output_dir (--output-dir)")
    if os.path.isdir(os.path.join(out, "model")):  # written last: the run ended (resuming would only replay it)
        raise FileExistsError(f"{out} already holds a finished model; choose another output_dir (--output-dir)")
    existing = latest_checkpoint(out) if os.path.isdir(out) else None
    if existing and not config.resume:
        raise FileExistsError(f"{out} already holds a run ({existing}); resume it with resume=True "
                              "(--resume) or choose another output_dir (--output-dir)")
    return existing


def _foreign_file(out: str) -> str | None:
    """The name of a config.json or log.jsonl in `out` that no unlearning run wrote, which a run would replace (a
    model's own config.json where output_dir is the model's directory, another tool's log); None otherwise."""
    path = os.path.join(out, "config.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
        except ValueError:   # not JSON, not UTF-8
            saved = None
        if not (isinstance(saved, dict) and {"model", "forget", "output_dir"} <= saved.keys()):
            return "config.json"
    path = os.path.join(out, "log.jsonl")
    if os.path.isfile(path):
        try:
            if not all(isinstance(r.get("step"), int) for _, r in read_jsonl(path, skip_torn_last_line=True)):
                return "log.jsonl"
        except DataError:   # not JSON lines
            return "log.jsonl"
    return None


def truncate_log(path: str, step: int) -> None:
    """Drops log lines of steps after `step`: those an interrupted run wrote after its last checkpoint (all of them
    when it was killed before its first one and this run starts over), the last one included where the kill cut it
    short (no newline: not JSON; read_jsonl's torn last line)."""
    if not os.path.isfile(path):
        return
    kept = [record for _, record in read_jsonl(path, skip_torn_last_line=True) if record["step"] <= step]
    # as the run wrote them, in one step: a kill while rewriting the log must not lose the lines kept
    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in kept))


def write_checkpoint(output_dir: str, step: int, state: dict, rank_state: dict, *, rank: int, is_main: bool,
                     barrier: Callable[[], None], keep: int) -> str:
    """Writes state (from the main process) and each process's rank_state as checkpoint `step`.

    Collective: every process calls it. keep > 0 deletes all but the newest `keep` checkpoints; checkpoints of
    later steps (a killed run's, past the one it was resumed from) are deleted in any case.
    """
    root = os.path.join(output_dir, CHECKPOINTS)
    name = _checkpoint_name(step)
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
        steps = _checkpoint_steps(root)
        # past this one: left by a run killed before `latest` named it, which this run (resumed before it) redoes
        stale = [s for s in steps if s > step]
        kept = [s for s in steps if s <= step]
        for old in stale + (kept[:-keep] if keep else []):
            shutil.rmtree(os.path.join(root, _checkpoint_name(old)))
    barrier()
    return final


def _checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def _checkpoint_steps(root: str) -> list[int]:
    """The steps of the checkpoints in `root`, ascending: read from their names as numbers (as text, step-999000
    sorted after step-1000000), only the names write_checkpoint gives (nothing else there is deleted)."""
    named = (match for match in map(_STEP_NAME.fullmatch, os.listdir(root)) if match)
    return sorted(int(match[1]) for match in named if _checkpoint_name(int(match[1])) == match[0])


def read_checkpoint(path: str, rank: int, keys: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """(state, this process's rank_state) of a checkpoint; ValueError for a process it has no state for (a run
    resumed with more processes than wrote it), for a rank file missing of a process that wrote it (a checkpoint
    copied in part), and naming the file whose content is not a dict (and for state, one holding `keys`): another
    tool's torch.save, which loads but is no checkpoint's."""
    state_file = os.path.join(path, "state.pt")
    state = _checked(state_file, _load(state_file), keys)
    rank_file = os.path.join(path, f"rank-{rank}.pt")
    if not os.path.isfile(rank_file):
        if rank < state.get("num_processes", 1):   # (unrecorded: written by 1 process or more)
            raise ValueError(f"cannot resume {path}: its rank-{rank}.pt is missing, though process {rank} of the run "
                             "that wrote it saved one (a checkpoint copied in part?); copy it in, or resume from an "
                             "earlier checkpoint by writing its name into checkpoints/latest, or start over")
        raise ValueError(f"cannot resume {path}: it has no state for process {rank}: it was written by "
                         f"{state.get('num_processes', 'fewer')} process(es); resume with the number of processes "
                         "it was written with")
    return state, _checked(rank_file, _load(rank_file), ())


def _checked(file: str, content, keys: tuple[str, ...]) -> dict:
    """`content`, loaded from `file`, where it is a dict holding `keys`; else a ValueError naming the file."""
    if not isinstance(content, dict):
        held = f"a {type(content).__name__}"
    elif missing := [key for key in keys if key not in content]:
        held = f"a dict without {missing}"
    else:
        return content
    raise ValueError(f"cannot resume from {file}: it holds {held}, not a fastalign checkpoint's state (another "
                     "tool's file?); resume from an earlier checkpoint by writing its name into checkpoints/latest, "
                     "or start over")


def _load(file: str):
    """torch.load of a checkpoint file, unpickling only tensors, builtins and NumPy arrays (whoever can write into the
    output directory must not get code run by a resume); a ValueError naming it when it cannot be read (the
    checkpoints are written atomically, so only something outside the run, a disk fault or an edit, damages one)."""
    try:
        with torch.serialization.safe_globals(_NUMPY_STATE):
            return torch.load(file, weights_only=True)
    except Exception as e:   # a truncated or foreign file: zip, pickle or EOF errors, whichever torch meets first
        raise ValueError(f"cannot resume from {file}: it cannot be read ({type(e).__name__}: {_reason(e)}); resume "
                         "from an earlier checkpoint by writing its name into checkpoints/latest, or start over") from e


def _reason(e: Exception) -> str:
    """What `e` says; of torch's refusal to unpickle more than tensors and builtins, the line naming what it met
    without its advice (to load with weights_only=False, or to allowlist what it met: either would run whatever code
    the file holds)."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    if not str(e).startswith("Weights only load failed") or len(lines) < 3:
        return str(e)
    met = lines[-2].strip().split(" Please use ", 1)[0].rstrip(".")
    return f"{met} (only tensors, builtin containers and NumPy arrays are unpickled: anything else could run code)"


def torch_rng_state(device: torch.device) -> dict:
    """The states of torch's generators that a run on `device` draws from (LoRA's initialisation and dropout): the
    CPU's and, on CUDA, that device's alone (every GPU's that the process saw could not be restored by a process that
    sees fewer, or sees them in another order)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Sets torch's generators to `state` (torch_rng_state's) for a run on `device`. A checkpoint written before
    2026-12-07 also holds Python's and NumPy's global states, which are left alone: the trainer draws from neither
    (the streams have generators of their own), and they are the caller's."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(_cuda_rng_state(state["cuda"], device), device)


def _cuda_rng_state(saved, device: torch.device) -> torch.Tensor:
    """`device`'s CUDA generator state out of a checkpoint's: its own, or of a checkpoint written before 2026-12-07
    (a list of every GPU's the process saw) the state at `device`'s index."""
    if isinstance(saved, torch.Tensor):
        return saved
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= len(saved):
        raise ValueError(f"cannot restore the CUDA generator of {device} (index {index}): the checkpoint, written "
                         f"before 2026-12-07, holds the states of the {len(saved)} GPU(s) its process saw; resume it "
                         f"with each process on a GPU of index below {len(saved)} (CUDA_VISIBLE_DEVICES)")
    return saved[index]
