"""Forcing, under Triton's interpreter, the plans and tile configurations that only a GPU would choose.

The interpreter runs one small tile configuration and its own vocabulary split plan; on an H100/H200 the
autotuner may pick any configuration and the plan follows the SM count. These helpers make a CPU test run
the GPU's choices instead.
"""
import triton

from fastalign.kernels import chunked_backward
from fastalign.kernels import linear_softmax_tiles as tiles


# (rows, hidden, vocab) of the tests run with the GPU's plans and tiles: a vocabulary over several split ranges;
# and more rows than words, so that a gradient chunk [rows, words] has more row blocks than its columns make
GPU_PLAN_SHAPES = [(21, 72, 333), (150, 40, 37)]


def use_gpu_plans(monkeypatch, sms=132):
    """vocab_splits as on an H100/H200 (256-aligned ranges, at least 16 splits, 2 x SMs target programs) and
    the backward's GPU chunk plan."""
    monkeypatch.setattr(tiles, "INTERPRET", False)
    monkeypatch.setattr(tiles, "_SPLIT_ALIGN", 256)
    monkeypatch.setattr(tiles, "multiprocessor_count", lambda device: sms)
    monkeypatch.setattr(chunked_backward, "INTERPRET", False)


def force_tile_config(monkeypatch, tuner, block_m, block_v, block_k, num_warps, num_stages):
    """Make an autotuned kernel run exactly one of its configurations (a single config is not benchmarked), with its
    warps and pipeline stages too: a GPU's shared memory holds a large tile only in the candidate's own stages."""
    config = triton.Config({"BLOCK_M": block_m, "BLOCK_V": block_v, "BLOCK_K": block_k}, num_warps=num_warps,
                           num_stages=num_stages)
    monkeypatch.setattr(tuner, "configs", [config])
    monkeypatch.setattr(tuner, "cache", {})
