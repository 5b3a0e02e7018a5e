"""The vocabulary split plan of the fused-loss forwards as a GPU computes it."""
from fastalign.kernels import linear_softmax_tiles as tiles
from tests.kernels.gpu_plans import use_gpu_plans


def test_gpu_vocab_split_plan_covers_the_vocabulary_in_non_empty_aligned_ranges(monkeypatch):
    use_gpu_plans(monkeypatch)
    for num_rows in [1, 63, 64, 300, 3000, 8192, 65536]:
        for vocab in [1, 255, 256, 257, 5003, 32000, 128256]:
            num_splits, per_split = tiles.vocab_splits(num_rows, vocab, "cpu")
            assert per_split % 256 == 0 and (num_splits - 1) * per_split < vocab <= num_splits * per_split
