"""KVPool: a K and V per pool layer in its own shape, layers of one shape in one tensor."""
import re

import pytest
import torch

from fastalign.runtime.kv_pool import MAX_BLOCKS, KVPool


def test_layers_of_one_shape_share_a_tensor_and_copies_reach_every_layer():
    shapes = [(2, 16), (1, 32), (2, 16), (1, 32), (4, 8)]
    pool = KVPool(shapes, num_blocks=5, block_size=3, dtype=torch.float32, device="cpu")
    assert [tuple(t.shape[:1]) + tuple(t.shape[-2:]) for t in pool.tensors] == [(2, 2, 16), (2, 1, 32), (1, 4, 8)]
    assert pool.first_of_shape == {0, 1, 4}
    for layer, shape in enumerate(shapes):
        for view in (pool.k(layer), pool.v(layer)):
            assert view.shape == (5, 3, *shape) and view.is_contiguous()
    for tensor in pool.tensors:
        tensor.normal_()
    assert not any(torch.equal(pool.k(layer), pool.v(layer)) for layer in range(len(shapes)))   # K and V apart
    for view in (pool.k, pool.v):   # and every layer its own, those sharing a tensor too
        assert len({view(layer).data_ptr() for layer in range(len(shapes))}) == len(shapes)
    pool.copy_blocks(torch.tensor([1, 4]), torch.tensor([0, 2]))
    for layer in range(len(shapes)):
        for view in (pool.k(layer), pool.v(layer)):
            assert torch.equal(view[[0, 2]], view[[1, 4]])
    assert pool.nbytes == 5 * KVPool.bytes_per_block(shapes, block_size=3, dtype=torch.float32) \
        == 5 * 3 * 2 * 4 * (2 * 16 * 2 + 32 * 2 + 32)


@pytest.mark.parametrize("shapes", [[], [(2,)], [(2, 16, 1)], [(0, 16)], [(2, 16.0)], [(True, 16)], None, 7])
def test_bad_layer_shapes_are_refused_by_name(shapes):
    with pytest.raises(ValueError, match="layer_shapes: expected one \\(num_kv_heads, head_dim\\) pair of positive "
                                         "ints per pool layer"):
        KVPool(shapes, num_blocks=1, block_size=1, dtype=torch.float32, device="cpu")


def test_pool_size_in_tokens_rounds_up_to_whole_blocks_and_in_bytes_rounds_down():
    def blocks(max_tokens=None, max_bytes=None):
        return KVPool.num_blocks_for(max_tokens=max_tokens, max_bytes=max_bytes, block_size=4, bytes_per_block=100)

    assert [blocks(max_tokens=n) for n in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]
    assert [blocks(max_bytes=n) for n in (100, 199, 200, 301)] == [1, 1, 2, 3]
    for sizes, message in (({}, "exactly one of max_tokens or max_bytes"),
                           (dict(max_tokens=4, max_bytes=100), "exactly one of max_tokens or max_bytes"),
                           (dict(max_tokens=0), "max_tokens: expected a positive int, got 0"),
                           (dict(max_tokens=2.0), "max_tokens: expected a positive int, got 2.0"),
                           (dict(max_bytes=99), "max_bytes: expected an int of at least one block \\(100 bytes"),
                           (dict(max_bytes=100.0), "max_bytes: expected an int of at least one block")):
        with pytest.raises(ValueError, match=message):
            blocks(**sizes)


def test_a_pool_of_more_blocks_than_the_span_tree_numbers_is_refused_naming_its_sizes():
    """max_tokens or max_bytes making 2**31 blocks or more (a tiny per-token pool, block_size 1) passed, the pool was
    allocated, then the span tree's constructor failed ("incompatible constructor arguments": its block ids are
    int32). The count is refused before any allocation, naming the arguments that give it and the limit."""
    def blocks(max_tokens=None, max_bytes=None, shares=1):
        return KVPool.num_blocks_for(max_tokens=max_tokens, max_bytes=max_bytes, block_size=4, bytes_per_block=100,
                                     shares=shares)

    assert blocks(max_tokens=4 * MAX_BLOCKS) == blocks(max_bytes=100 * MAX_BLOCKS + 99) == MAX_BLOCKS == 2 ** 31 - 1
    for sizes, given in ((dict(max_tokens=4 * MAX_BLOCKS + 1), "max_tokens: 8589934589 tokens"),
                         (dict(max_bytes=100 * 2 ** 31), "max_bytes: 214748364800 bytes at 100 a block"),
                         (dict(max_bytes=200 * 2 ** 31, shares=2),
                          "max_bytes: 429496729600 bytes (half of them) at 100 a block")):
        message = f"{given} make 2147483648 blocks of block_size=4 tokens, more than the 2147483647 (2**31 - 1)"
        with pytest.raises(ValueError, match=f"^{re.escape(message)} a KV pool holds$"):
            blocks(**sizes)


def test_a_pool_is_made_in_the_dtype_and_on_the_device_asked_for_and_sized_in_that_dtypes_bytes():
    """A pool made on another device than the model's, or in float32 for a bf16 model, or sized per block as if every
    element took 4 bytes, would fail deep in attention or hold half the blocks that max_bytes pays for."""
    shapes = [(2, 16), (1, 32), (2, 16)]
    pool = KVPool(shapes, num_blocks=5, block_size=3, dtype=torch.bfloat16, device="meta")
    assert all(t.dtype == torch.bfloat16 and t.device.type == "meta" for t in pool.tensors)
    assert all(view(layer).device.type == "meta" for view in (pool.k, pool.v) for layer in range(len(shapes)))
    assert pool.nbytes == 5 * KVPool.bytes_per_block(shapes, block_size=3, dtype=torch.bfloat16) \
        == 5 * 3 * 2 * 2 * (2 * 16 * 2 + 32)
