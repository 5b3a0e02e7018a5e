"""The paged KV pool on the model's device: one K and one V tensor per pool layer, in fixed-size blocks.

Each pool layer has its own shape (num_kv_heads, head_dim), as the model's layers have theirs (Gemma 4's full
layers hold fewer, wider heads than its sliding ones): nothing is padded to the widest layer. Layers of one shape
share one tensor [layers, 2, num_blocks, block_size, num_kv_heads, head_dim], so that copying blocks (copy-on-write
of a partly filled block) is one indexing op per shape over all its layers. `k(layer)` and `v(layer)` are
contiguous views [num_blocks, block_size, num_kv_heads, head_dim], the layout the paged attention ops take.
"""
import torch

from fastalign.ops.checks import is_integer

MAX_BLOCKS = 2 ** 31 - 1   # the span tree (fastalign._C.SpanTree) numbers blocks in int32


class KVPool:
    """KV storage for `num_blocks` blocks of `block_size` tokens of each pool layer, whose (num_kv_heads, head_dim)
    `layer_shapes` lists in order."""

    def __init__(self, layer_shapes, *, num_blocks, block_size, dtype, device):
        layer_shapes = _checked_shapes(layer_shapes)
        by_shape = {}   # shape -> its layers, in order of first appearance
        for layer, shape in enumerate(layer_shapes):
            by_shape.setdefault(shape, []).append(layer)
        # Not initialised (a large pool costs no fill, and on the CPU only the pages written get touched):
        # attention reads a slot only once its token's K/V is written, which the runtime tests check by
        # filling a fresh pool with NaN.
        # Normal tensors even when the runner is made under torch.inference_mode(): an inference tensor could
        # not be written by any later call made outside inference mode.
        with torch.inference_mode(False):
            self.tensors = [torch.empty(len(layers), 2, num_blocks, block_size, *shape, dtype=dtype, device=device)
                            for shape, layers in by_shape.items()]
        self._where = [None] * len(layer_shapes)   # layer -> (its shape's tensor, its place in it)
        for tensor, layers in zip(self.tensors, by_shape.values()):
            for place, layer in enumerate(layers):
                self._where[layer] = (tensor, place)
        self.first_of_shape = frozenset(layers[0] for layers in by_shape.values())
        self.num_blocks, self.block_size = num_blocks, block_size

    @staticmethod
    def bytes_per_block(layer_shapes, *, block_size, dtype):
        item = torch.empty((), dtype=dtype).element_size()
        return sum(2 * block_size * heads * head_dim * item for heads, head_dim in _checked_shapes(layer_shapes))

    @staticmethod
    def num_blocks_for(*, max_tokens, max_bytes, block_size, bytes_per_block, shares=1):
        """Blocks of a pool sized by exactly one of max_tokens (rounded up to whole blocks) or max_bytes
        (rounded down), of which the pool takes 1/shares (2: half of it goes to a model's recurrent states); a
        ValueError for more than MAX_BLOCKS, found before the pool is allocated (the span tree cannot take them)."""
        if (max_tokens is None) == (max_bytes is None):
            raise ValueError("pass exactly one of max_tokens or max_bytes to size the KV pool")
        if max_tokens is not None:
            if not is_integer(max_tokens) or max_tokens <= 0:
                raise ValueError(f"max_tokens: expected a positive int, got {max_tokens!r}")
            num_blocks, sized_by = -(-int(max_tokens) // block_size), f"max_tokens: {max_tokens} tokens"
        else:
            if not is_integer(max_bytes) or max_bytes // shares < bytes_per_block:
                states = "" if shares == 1 else f", {shares} times that: half of max_bytes goes to the recurrent states"
                raise ValueError(f"max_bytes: expected an int of at least one block ({bytes_per_block} bytes "
                                 f"for this model and block_size{states}), got {max_bytes!r}")
            num_blocks = int(max_bytes) // shares // bytes_per_block
            half = "" if shares == 1 else " (half of them)"
            sized_by = f"max_bytes: {max_bytes} bytes{half} at {bytes_per_block} a block"
        if num_blocks > MAX_BLOCKS:
            raise ValueError(f"{sized_by} make {num_blocks} blocks of block_size={block_size} tokens, more than the "
                             f"{MAX_BLOCKS} (2**31 - 1) a KV pool holds")
        return num_blocks

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def k(self, layer):
        tensor, place = self._where[layer]
        return tensor[place, 0]

    def v(self, layer):
        tensor, place = self._where[layer]
        return tensor[place, 1]

    def copy_blocks(self, src, dst):
        """Copy blocks src[i] -> dst[i] (LongTensors on the pool's device) in every layer."""
        for tensor in self.tensors:
            tensor[:, :, dst] = tensor[:, :, src]


def _checked_shapes(layer_shapes):
    """layer_shapes as a list of (num_kv_heads, head_dim) int pairs, at least one, each >= 1."""
    try:
        shapes = [tuple(shape) for shape in layer_shapes]
    except TypeError:
        shapes = []
    if not shapes or any(len(shape) != 2 or not all(is_integer(n) and n >= 1 for n in shape) for shape in shapes):
        raise ValueError(f"layer_shapes: expected one (num_kv_heads, head_dim) pair of positive ints per pool layer, "
                         f"got {layer_shapes!r}")
    return [(int(heads), int(head_dim)) for heads, head_dim in shapes]
