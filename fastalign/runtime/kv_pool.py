"""The paged KV pool on the model's device: one K and one V tensor per layer, in fixed-size blocks.

All layers live in one tensor [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], so that
copying blocks (copy-on-write of a partly filled block) is one indexing op over every layer. `k(layer)`
and `v(layer)` are contiguous views [num_blocks, block_size, num_kv_heads, head_dim], the layout the
paged attention ops take.
"""
import torch

from fastalign.ops.checks import is_integer


class KVPool:
    """KV storage for `num_blocks` blocks of `block_size` tokens of every layer of one model."""

    def __init__(self, *, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
        # Not initialised (a large pool costs no fill, and on the CPU only the pages written get touched):
        # attention reads a slot only once its token's K/V is written, which the runtime tests check by
        # filling a fresh pool with NaN.
        # A normal tensor even when the runner is made under torch.inference_mode(): an inference tensor could
        # not be written by any later call made outside inference mode.
        with torch.inference_mode(False):
            self.data = torch.empty(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim,
                                    dtype=dtype, device=device)

    @staticmethod
    def bytes_per_block(*, num_layers, block_size, num_kv_heads, head_dim, dtype):
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @staticmethod
    def num_blocks_for(*, max_tokens, max_bytes, block_size, bytes_per_block):
        """Blocks of a pool sized by exactly one of max_tokens (rounded up to whole blocks) or max_bytes
        (rounded down)."""
        if (max_tokens is None) == (max_bytes is None):
            raise ValueError("pass exactly one of max_tokens or max_bytes to size the KV pool")
        if max_tokens is not None:
            if not is_integer(max_tokens) or max_tokens <= 0:
                raise ValueError(f"max_tokens: expected a positive int, got {max_tokens!r}")
            return -(-int(max_tokens) // block_size)
        if not is_integer(max_bytes) or max_bytes < bytes_per_block:
            raise ValueError(f"max_bytes: expected an int of at least one block ({bytes_per_block} bytes "
                             f"for this model and block_size), got {max_bytes!r}")
        return int(max_bytes) // bytes_per_block

    @property
    def num_blocks(self):
        return self.data.shape[2]

    @property
    def block_size(self):
        return self.data.shape[3]

    @property
    def nbytes(self):
        return self.data.numel() * self.data.element_size()

    def k(self, layer):
        return self.data[layer, 0]

    def v(self, layer):
        return self.data[layer, 1]

    def copy_blocks(self, src, dst):
        """Copy blocks src[i] -> dst[i] (LongTensors on the pool's device) in every layer."""
        self.data[:, :, dst] = self.data[:, :, src]
