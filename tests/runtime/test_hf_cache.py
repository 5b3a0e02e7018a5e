"""HFCacheModel's batches of rows alike. (Its random trees match Hugging Face's logits in test_tree_runner.py, on the
"-fallback" models of tiny_models.py; its refusals are in test_tree_runner_errors.py.)"""
import warnings

import torch

from fastalign import TreeRunner
from tests.runtime.tiny_models import CountedForward, fill_with_nan, reference, tiny_model


def test_consecutive_rows_alike_run_as_one_batch_after_the_rows_they_extend():
    """Two children of the root extended by two tokens each are one forward of 2 rows; then two children of the
    first of them (one on a copy of its partly filled block, written from the same forward's K/V) are another; a
    last row alike to the first two but after the others runs alone. Every child matches Hugging Face's logits."""
    model = tiny_model("bloom-alibi-fallback")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the fallback's warning (test_hf_paged.py)
        runner = TreeRunner(model, max_tokens=128, block_size=4, attention_backend="torch")
    assert type(runner.model_runner).__name__ == "HFCacheModel"
    fill_with_nan(runner.pool)
    root = runner.prefill([5, 17, 3, 9, 2])
    calls = []
    runner.model_runner.model = CountedForward(model, calls)
    children, logits = runner.extend([root, root, 0, 0, root], [[1, 2], [3, 4], [5], [6], [7, 8]], logits="all")
    assert calls == [(2, 2, 2), (2, 1, 1), (1, 2, 2)]
    for child, row_logits in zip(children, logits):
        torch.testing.assert_close(row_logits, reference(model, child)[0], rtol=1e-4, atol=1e-4)
