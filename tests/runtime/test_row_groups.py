"""row_groups.py through both runners that group rows: where left padding would show in a model's logits, their
probes say so and rows from contexts of different lengths run apart. (The groups themselves are in test_hf_cache.py
and test_hf_state_cache.py.)"""
import warnings

import pytest
import torch

from fastalign import TreeRunner
from fastalign.runtime.row_groups import NO_PADDING, LeftPadded
from tests.runtime.tiny_models import CountedForward, reference, tiny_model


@pytest.mark.parametrize("name, runner_name", [("bloom-alibi-fallback", "HFCacheModel"),
                                               ("qwen3.5-linear-attention-states", "HFStateCacheModel")])
def test_a_model_whose_padding_shows_runs_rows_from_contexts_of_different_lengths_apart(monkeypatch, name,
                                                                                        runner_name):
    """Here the mask is withheld, so the padding is attended to: the probe finds the logits changed, and rows from
    contexts of 3 and 5 tokens run apart (the two on the shorter one together), with the right logits."""
    arguments = LeftPadded.arguments
    monkeypatch.setattr(LeftPadded, "arguments", lambda self, count: {
        key: value for key, value in arguments(self, count).items() if key != "attention_mask"})
    model = tiny_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the fallback's warning (test_hf_paged.py)
        runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    assert type(runner.model_runner).__name__ == runner_name and not runner.model_runner.pads_context
    short, long = runner.prefill([5, 17, 3]), runner.prefill([4, 4, 12, 30, 6])
    calls = []
    runner.model_runner.model = CountedForward(model, calls)
    children, logits = runner.extend([short, long, short], [[1], [2], [3]], logits="all")
    assert calls == [(2, 1, 1), (1, 1, 1)]
    for child, row_logits in zip(children, logits):
        torch.testing.assert_close(row_logits, reference(model, child)[0][-1:], rtol=1e-4, atol=1e-4)


def test_left_padding_masks_each_rows_padding_and_counts_its_own_positions():
    """Contexts of 2 and 4 tokens: the shorter row's first two cache slots are padding, hidden by the mask, and its
    new tokens take positions 2, 3, ...; the mask grows with the cache over calls; a forward that takes no
    positions (ALiBi's Bloom, MPT) is given the mask alone. Contexts of one length, or a model with no attention layer
    to hide padding from, get no argument at all."""
    padded = LeftPadded.of([2, 4], "cpu")
    first = padded.arguments(1)
    assert first["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert first["position_ids"].tolist() == [[2], [4]]
    second = padded.arguments(2)
    assert second["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1, 1], [1] * 7]
    assert second["position_ids"].tolist() == [[3, 4], [5, 6]]
    assert LeftPadded.of([2, 4], "cpu", positions=False).arguments(1).keys() == {"attention_mask"}
    assert LeftPadded.of([3, 3], "cpu") is LeftPadded.of([2, 4], "cpu", attends=False) is NO_PADDING
    assert NO_PADDING.arguments(1) == {}
