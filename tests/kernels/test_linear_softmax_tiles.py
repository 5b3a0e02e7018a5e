"""The vocabulary split plan of the fused-loss forwards as a GPU computes it, and the tile configurations its
autotuner benchmarks."""
import torch
import triton

from fastalign.kernels import linear_cross_entropy as ce, linear_kl_div as kl, linear_softmax_tiles as tiles
from tests.kernels.gpu_plans import use_gpu_plans


def test_gpu_vocab_split_plan_covers_the_vocabulary_in_non_empty_aligned_ranges(monkeypatch):
    use_gpu_plans(monkeypatch)
    for num_rows in [1, 63, 64, 300, 3000, 8192, 65536]:
        for vocab in [1, 255, 256, 257, 5003, 32000, 128256]:
            num_splits, per_split = tiles.vocab_splits(num_rows, vocab, "cpu")
            assert per_split % 256 == 0 and (num_splits - 1) * per_split < vocab <= num_splits * per_split


def test_fp32_operands_benchmark_only_the_small_tile():
    """On a GPU the autotuner compiles and times every candidate for each new key and argument specialisation;
    with fp32 operands the 16-bit tile shapes spill registers and take seconds each to build, so only the small
    tile (the last candidate, the one that always fits) is kept for them."""
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=w, num_stages=st)
               for bm, bv, bk, w, st in tiles._TILE_SHAPES[1] + [tiles._SMALL_TILE]]
    t = {dtype: torch.empty(2, 2, dtype=dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16)}
    for half in (torch.bfloat16, torch.float16):
        assert tiles.prune_for_dtype(configs, {"x_ptr": t[half], "w_ptr": t[half]}) == configs
        assert tiles.prune_for_dtype(configs, {"x_ptr": t[half], "xr_ptr": t[half]}) == configs
        # a 16-bit policy against an fp32 reference: the reference's dots are fp32 ones
        assert tiles.prune_for_dtype(configs, {"x_ptr": t[half], "xr_ptr": t[torch.float32]}) == configs[-1:]
    assert tiles.prune_for_dtype(configs, {"x_ptr": t[torch.float32], "w_ptr": t[torch.float32]}) == configs[-1:]
    (bm, bv, bk, w, st), = [tiles._SMALL_TILE]
    assert configs[-1].kwargs == {"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_K": bk}
    assert (configs[-1].num_warps, configs[-1].num_stages) == (w, st)
    for tuner in (ce._forward_kernel, ce._gradient_kernel, kl._forward_kernel, kl._gradient_kernel):
        assert tuner.early_config_prune is tiles.prune_for_dtype
