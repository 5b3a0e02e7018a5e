"""Placement of prompts over torchrun's processes (rain/distributed.py): which rank searches which prompt, which file
it writes, the ranks read from the process group."""
import json
import re

import pytest
import torch.distributed as dist

from fastalign.rain.distributed import Placement, gather, join_from_env, latest_records


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


@pytest.mark.parametrize("index", [True, -1, "0", 1.0, None])
def test_a_record_whose_index_is_no_prompt_index_is_refused_naming_the_file_and_row(tmp_path, index):
    """A record index of true, -1, "0" or 1.0 names no prompt of the file (True was taken for prompt 1, -1 for the last
    prompt): the file is of other data."""
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps({"index": 0, "error": None}) + "\n" + json.dumps({"index": index, "error": None}) + "\n")
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: row 2: expected a record of `fastalign rain`"):
        latest_records([str(path)])
