"""Placement of prompts over torchrun's processes (rain/distributed.py): which rank searches which prompt, which file
it writes, the ranks read from the process group."""
import datetime
import json

import pytest
import torch.distributed as dist

from fastalign.rain.distributed import Placement, gather, join_from_env, merge_rank_files
from fastalign.rain.records import rank_files


def test_every_prompt_goes_to_one_rank_by_its_global_rank_on_several_nodes():
    """Two nodes of two processes: LOCAL_RANK repeats on each node, so a share or a rank file by the local rank
    searched prompts twice and others never, and wrote two processes' records to one file."""
    placements = [Placement(rank, 4, local_rank=rank % 2) for rank in range(4)]
    shares = [p.share(range(11)) for p in placements]
    assert shares == [[0, 4, 8], [1, 5, 9], [2, 6, 10], [3, 7]]
    assert [p.output("out.jsonl") for p in placements] == [f"out.jsonl.rank{r}" for r in range(4)]
    assert Placement().share(range(3)) == [0, 1, 2] and Placement().output("out.jsonl") == "out.jsonl"


def test_a_process_takes_its_global_rank_from_the_process_group(monkeypatch):
    """The second process of the second node of two: rank 3 of 4, on its node's device 1."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)   # joined already: no group is made here
    monkeypatch.setattr(dist, "barrier", lambda: None)
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    assert join_from_env() == Placement(rank=3, world_size=4, local_rank=1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert join_from_env() == Placement()


def test_only_rank_0_gets_the_gathered_values(monkeypatch):
    """Every rank takes part in the gathering, but only rank 0 gets the values (and prints the run's summary): the
    others get None. A single process gets its own value."""
    def all_gather_object(out, value):
        out[:] = [f"{value} of rank {r}" for r in range(len(out))]

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    assert gather(Placement(0, 3), "v") == ["v of rank 0", "v of rank 1", "v of rank 2"]
    assert gather(Placement(1, 3), "v") is None and gather(Placement(2, 3), "v") is None
    assert gather(Placement(), "v") == ["v"]


@pytest.mark.parametrize("cuda", [True, False])
def test_a_process_joins_nccl_on_its_nodes_device_where_cuda_is_present(monkeypatch, cuda):
    """Rank 3 of 4, the second process of the second node: with CUDA it takes device LOCAL_RANK (device RANK is
    none of a node's) before joining NCCL, else it joins gloo; then it waits for every rank at a barrier."""
    import torch

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("device", device)))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: calls.append(("group", backend)))
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    assert join_from_env() == Placement(rank=3, world_size=4, local_rank=1)
    assert calls == ([("device", 1), ("group", "nccl")] if cuda else [("group", "gloo")]) + ["barrier"]


@pytest.mark.parametrize("cuda", [True, False])
def test_the_ranks_done_first_wait_hours_for_the_slowest(monkeypatch, cuda):
    """The ranks meet only at the end (gather, merge_rank_files), where those done first wait for the slowest: with
    NCCL's default timeout its watchdog killed a rank done 10 minutes before the slowest (gloo's: 30 minutes)."""
    import torch

    timeouts = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **options: timeouts.append(options.get("timeout")))
    monkeypatch.setattr(dist, "barrier", lambda: None)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    join_from_env()
    assert timeouts == [datetime.timedelta(hours=24)]


def test_rank_files_of_an_output_named_with_glob_characters_are_found_and_merged(tmp_path):
    """An output named out[1].jsonl: its name read as a glob pattern found out1.jsonl's rank files instead of its
    own, so a resume searched its prompts again and the merge never collected them."""
    out = tmp_path / "out[1].jsonl"
    record = json.dumps({"index": 0, "error": None}) + "\n"
    (tmp_path / "out[1].jsonl.rank0").write_text(record)
    (tmp_path / "out1.jsonl.rank0").write_text(json.dumps({"index": 1, "error": None}) + "\n")   # another output's
    assert rank_files(str(out)) == [str(out) + ".rank0"]
    merge_rank_files(Placement(), str(out))
    assert out.read_text() == record and (tmp_path / "out1.jsonl.rank0").exists()


def test_only_rank_0_merges_the_rank_files_between_two_barriers(tmp_path, monkeypatch):
    """Every rank calls the merge, but rank 0 alone writes the output and removes the rank files, after every rank
    is done (a barrier) and before any leaves (another): two ranks merging at once appended records twice, or
    crashed removing a file the other had removed."""
    met = []
    monkeypatch.setattr(dist, "barrier", lambda: met.append(sorted(p.name for p in tmp_path.iterdir())))
    out = tmp_path / "out.jsonl"
    record = json.dumps({"index": 1, "error": None}) + "\n"
    (tmp_path / "out.jsonl.rank1").write_text(record)
    merge_rank_files(Placement(1, 2), str(out))
    assert not out.exists() and met == [["out.jsonl.rank1"]] * 2
    merge_rank_files(Placement(0, 2), str(out))
    assert out.read_text() == record and met[2:] == [["out.jsonl.rank1"], ["out.jsonl"]]
