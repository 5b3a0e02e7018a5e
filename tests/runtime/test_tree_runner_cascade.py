"""`TreeRunner(cascade_attention=...)`: on the Triton backend (Triton's interpreter on the CPU), rows of a
forward that share whole prefix blocks are planned into groups for the cascade attention, and every child
still gives the logits and final hidden states of the Hugging Face model run on its whole sequence."""
import pytest

from fastalign import TreeRunner
from fastalign.runtime import pool_attention
from tests.conftest import TRITON_DEVICE
from tests.runtime.tiny_models import fill_with_nan, reference, tiny_model

ROOT = list(range(1, 14))     # 13 tokens: 3 whole blocks of 4, and one token in a partly filled block
MID = [20, 21, 22, 23, 24]    # a child of ROOT: 18 tokens, 4 whole blocks
# three children of the root, two of MID (which share the root's 3 blocks), then a new root
PARENTS = ["root", "root", "root", "mid", "mid", None]
LISTS = [[30], [31, 32], [33, 34, 35], [40], [41, 42], [5, 6, 7]]


@pytest.fixture
def attention_calls(monkeypatch):
    """The shared_prefix argument of every layer's attention call on the pool."""
    calls, real = [], pool_attention.paged_attention_unchecked

    def spy(*args, shared_prefix=None, **kwargs):
        calls.append(shared_prefix)
        return real(*args, shared_prefix=shared_prefix, **kwargs)

    monkeypatch.setattr(pool_attention, "paged_attention_unchecked", spy)
    return calls


@pytest.mark.parametrize("cascade", [True, False])
@pytest.mark.parametrize("name", ["llama-gqa-untied", "mistral-mqa-head-dim", "gemma2-sliding-softcaps"])
def test_children_of_one_span_are_planned_as_one_group_and_match_hugging_face(name, cascade, attention_calls):
    """Every layer reads the cascade: Gemma 2's first with a window of 10 that cuts into the shared prefix, its second
    with soft-capped scores; Mistral's windows of 22 span every row here (20 tokens at most)."""
    model = tiny_model(name, device=TRITON_DEVICE)
    runner = TreeRunner(model, max_tokens=256, block_size=4, attention_backend="triton", cascade_attention=cascade)
    fill_with_nan(runner.pool)
    root = runner.prefill(ROOT)
    (mid,), _ = runner.extend([root], [MID])
    attention_calls.clear()
    parents = [{"root": root, "mid": mid}.get(p) for p in PARENTS]
    children, logits, hidden = runner.extend(parents, LISTS, logits="all", hidden="all")

    assert len(attention_calls) == model.config.num_hidden_layers
    for plan in attention_calls:
        if cascade:
            # the root's and MID's children share the root's 3 whole blocks; the new root shares nothing
            cu_group_rows, prefix_lens = plan
            assert cu_group_rows.tolist() == [0, 5, 6] and prefix_lens.tolist() == [12, 0]
        else:
            assert plan is None
    for span, span_logits, span_hidden in zip(children, logits, hidden):
        ref_logits, ref_hidden = reference(model, span)
        assert (span_logits - ref_logits).abs().max() <= 1e-4, f"{span}: logits differ from Hugging Face's"
        assert (span_hidden - ref_hidden).abs().max() <= 1e-4, f"{span}: hidden states differ from Hugging Face's"


def test_the_torch_backend_plans_no_cascade(attention_calls):
    runner = TreeRunner(tiny_model("llama-gqa-untied"), max_tokens=256, block_size=4, attention_backend="torch")
    root = runner.prefill(ROOT)
    runner.extend([root, root], [[1], [2]])
    assert attention_calls and all(plan is None for plan in attention_calls)


@pytest.mark.parametrize("name", ["mistral-mqa-head-dim", "gemma2-sliding-softcaps"])
def test_windows_that_cut_into_the_shared_prefix_read_the_cascade(name, attention_calls):
    """Children of a root longer than every window (22 for Mistral's layers, 10 for Gemma 2's first): the shared pass
    reads, for each query, only the prefix keys of its own window (those before every window hold NaN)."""
    model = tiny_model(name, device=TRITON_DEVICE)
    runner = TreeRunner(model, max_tokens=256, block_size=4, attention_backend="triton")
    fill_with_nan(runner.pool)
    root = runner.prefill(ROOT * 2)
    attention_calls.clear()
    children, logits = runner.extend([root] * 3, [[1], [2, 3], [4, 5, 6, 7]], logits="all")
    assert len(attention_calls) == model.config.num_hidden_layers
    assert all(plan is not None and plan[0].tolist() == [0, 3] for plan in attention_calls)
    for span, span_logits in zip(children, logits):
        ref_logits, _ = reference(model, span)
        assert (span_logits - ref_logits).abs().max() <= 1e-4, f"{span}: logits differ from Hugging Face's"
