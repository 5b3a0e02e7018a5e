"""KVPool: a K and V per pool layer in its own shape, layers of one shape in one tensor."""
import pytest
import torch

from fastalign.runtime.kv_pool import KVPool


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
    pool.copy_blocks(torch.tensor([1, 4]), torch.tensor([0, 2]))
    for layer in range(len(shapes)):
        for view in (pool.k(layer), pool.v(layer)):
            assert torch.equal(view[[0, 2]], view[[1, 4]])
    assert pool.nbytes == 5 * KVPool.bytes_per_block(shapes, block_size=3, dtype=torch.float32) \
        == 5 * 3 * 2 * 4 * (2 * 16 * 2 + 32 * 2 + 32)


@pytest.mark.parametrize("shapes", [[], [(2,)], [(0, 16)], [(2, 16.0)], [(True, 16)], None, 7])
def test_bad_layer_shapes_are_refused_by_name(shapes):
    with pytest.raises(ValueError, match="layer_shapes: expected one \\(num_kv_heads, head_dim\\) pair of positive "
                                         "ints per pool layer"):
        KVPool(shapes, num_blocks=1, block_size=1, dtype=torch.float32, device="cpu")
