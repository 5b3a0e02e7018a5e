"""Spreading a RAIN run's prompts over several processes (GPUs) launched by torchrun.

Under torchrun (WORLD_SIZE > 1) each process joins the default process group (NCCL on CUDA, gloo on
CPU), takes every WORLD_SIZE-th prompt (prompt i goes to rank i % WORLD_SIZE) and appends its records to
its own file <output>.rank<RANK> as each prompt finishes. At the end the ranks meet at a barrier and rank
0 merges every rank file into <output> (in prompt order, skipping prompts already done there) and removes
them. The ranks meet nowhere else, so those done first wait there for the slowest: the group's timeout is
RANKS_MEET_TIMEOUT, where NCCL's default (10 minutes) had its watchdog kill a rank done 10 minutes early.
A killed run resumes with any number of processes: prompts recorded without an error in <output> or in any
rank file are skipped, and the next merge collects the leftovers (records.py: which record of an index counts,
and a record a kill cut short). The merge writes a rank file's record only for an index <output> holds no
successful record of.
"""
import datetime
import json
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from .records import latest_records, open_for_append, rank_files, succeeded

RANKS_MEET_TIMEOUT = datetime.timedelta(hours=24)   # how long a rank done with its prompts waits for the others


@dataclass
class Placement:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def output(self, path: str) -> str:
        """The file this process appends its records to."""
        return f"{path}.rank{self.rank}" if self.distributed else path

    def share(self, indices) -> List[int]:
        return [i for i in indices if i % self.world_size == self.rank]


def join_from_env() -> Placement:
    """Joins the process group torchrun describes in the environment (once); a single process otherwise.
    Returns once every rank has joined: rank 0 joins only holding the output's lock (fastalign.output_lock), so
    that no rank writes beside another run on the same output."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return Placement()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", timeout=RANKS_MEET_TIMEOUT)
        else:
            dist.init_process_group("gloo", timeout=RANKS_MEET_TIMEOUT)
    dist.barrier()   # NCCL connects lazily: without it, the other ranks would go on without rank 0
    return Placement(dist.get_rank(), dist.get_world_size(), local)


def leave(placement: Placement):
    if placement.distributed and dist.is_initialized():
        dist.destroy_process_group()


def gather(placement: Placement, value) -> Optional[list]:
    """Every rank's `value` on rank 0 (None elsewhere); [value] for a single process."""
    if not placement.distributed:
        return [value]
    out = [None] * placement.world_size
    dist.all_gather_object(out, value)
    return out if placement.rank == 0 else None


def merge_rank_files(placement: Placement, path: str):
    """After all ranks are done: rank 0 appends the rank files' records to `path` in prompt order (of an
    index `path` holds a successful record of, none; a retried prompt's new record goes after its error
    record) and removes the rank files. A single process merges too: rank files a killed multi-process run
    left behind hold prompts this run skipped."""
    if placement.distributed:
        dist.barrier()
    if placement.rank == 0:
        done = succeeded(latest_records([path]))
        files = rank_files(path)
        fresh = {i: r for i, r in latest_records(files).items() if i not in done}
        with open_for_append(path) as out:
            for index in sorted(fresh):
                out.write(json.dumps(fresh[index]) + "\n")
        for p in files:
            os.remove(p)
    if placement.distributed:
        dist.barrier()
