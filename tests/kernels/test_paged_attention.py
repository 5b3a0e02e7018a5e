"""Kernel-level edge cases of the Triton paged attention: split keys, tile layout, index safety."""
import pytest
import torch

from fastalign.kernels.paged_attention import launch_config, paged_attention_triton
from fastalign.ops.paged_attention import paged_attention
from fastalign.reference.paged_attention import paged_attention_reference
from tests.ops.test_paged_attention import make_paged_batch


@pytest.mark.parametrize("num_splits", [2, 3, 5])
def test_split_keys_merge_to_the_reference(num_splits):
    """Contexts of several key tiles cut into parts, some of them empty for the shorter rows."""
    batch = make_paged_batch([(200, 1), (150, 3), (64, 2), (3, 1)], 16, 4, 2, 16, shared_blocks=4)
    out = paged_attention_triton(**batch, scale=0.25, num_splits=num_splits)
    torch.testing.assert_close(out.double(), paged_attention_reference(**batch, scale=0.25), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_tokens, num_rows, group", [(1, 1, 1), (8, 8, 7), (1000, 1, 4), (30, 3, 128), (5, 5, 3)])
def test_tiles_hold_whole_groups_and_fit_tensor_cores(num_tokens, num_rows, group):
    block_m, block_n, _, _ = launch_config(num_tokens, num_rows, group, 64, 4096)
    assert block_m >= max(16, group) and block_m & (block_m - 1) == 0
    assert block_m // group >= 1 and block_n >= 16


def test_unvalidated_bad_block_ids_stay_in_bounds():
    """Block ids outside the pool (validation skipped) must not read outside the pool: the kernel clamps."""
    batch = make_paged_batch([(40, 2), (17, 1)], 8, 4, 2, 16)
    batch["block_table"].fill_(1 << 30)
    batch["seq_lens"][0] = 300  # also past the table's capacity
    out = paged_attention(**batch, backend="triton", validate=False)
    assert out.shape == batch["q"].shape
