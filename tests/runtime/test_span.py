"""Span handles: copies of a handle are the handle itself, so that no copy outlives the span it names."""
import copy
import gc
import pickle
import sys

import pytest
import torch

from fastalign import TreeRunner
from tests.runtime.tiny_models import tiny_model


def test_copies_of_a_span_are_the_span():
    """copy.copy gave a second handle that shared the first one's finalizer: once the original was dropped, the
    copy, still held, named a released span ("parents[0]: span 0 was released"); copy.deepcopy (of a search state
    holding spans, say) failed with "cannot pickle 'fastalign._C.SpanTree' object"."""
    model = tiny_model("qwen2-untied")
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    root = runner.prefill([1, 2, 3])
    state = {"node": root, "depth": 1}
    assert copy.copy(root) is root and copy.deepcopy(state)["node"] is root
    kept = copy.copy(root)
    del root, state
    gc.collect()
    assert kept.alive
    (child,), logits = runner.extend([kept], [[4, 5]])
    assert (logits[0] - model(torch.tensor([child.tokens])).logits[0, -1]).abs().max() <= 1e-4


def test_pickling_a_span_is_refused_naming_it():
    """pickle (torch.save of a search state, a span sent to another process) went on to the runner and its model and
    failed with "cannot pickle 'fastalign._C.SpanTree' object", which names neither the span nor what to do."""
    runner = TreeRunner(tiny_model("qwen2-untied"), max_tokens=64, block_size=4, attention_backend="torch")
    root = runner.prefill([1, 2, 3])
    with pytest.raises(TypeError, match=r"a Span cannot be pickled: it belongs to its TreeRunner.*\(span\.tokens\)"):
        pickle.dumps({"node": root})
    assert copy.deepcopy({"node": root})["node"] is root and root.alive


def test_dropping_the_handle_of_a_span_the_tree_already_released_raises_nothing(monkeypatch):
    """A failed call gives back the new spans through the tree (TreeRunner._extend) while handles of some exist: the
    collected handle must see the span is gone, not release it again ("Exception ignored in Span.__del__")."""
    runner = TreeRunner(tiny_model("qwen2-untied"), max_tokens=64, block_size=4, attention_backend="torch")
    root = runner.prefill([1, 2, 3])
    runner.tree.release(root.id)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    del root
    gc.collect()
    assert unraisable == [] and runner.tree.span_ids() == []
