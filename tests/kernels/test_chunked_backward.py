"""The backward's chunk plan as a GPU computes it (the interpreter uses tiny fixed chunks)."""
import pytest

from fastalign.kernels import chunked_backward


@pytest.mark.parametrize("hidden_size", [64, 4096, 16384, 32768, 131072])
def test_gpu_chunk_plan_is_positive_and_within_the_shape(monkeypatch, hidden_size):
    """A segment of 0 rows (a wide H) would make the backward's range step 0."""
    monkeypatch.setattr(chunked_backward, "INTERPRET", False)
    for num_rows, vocab in [(1, 1), (7, 50), (300, 5003), (8192, 128256)]:
        rows, cols = chunked_backward.chunk_plan(num_rows, vocab, hidden_size)
        assert 1 <= rows <= num_rows and 1 <= cols <= vocab, (num_rows, vocab, hidden_size, rows, cols)
