"""The fused linear cross-entropy kernels against plain float64 logits, forward and every gradient.

Without CUDA the kernels run under the Triton interpreter (tests/conftest.py), at small odd shapes:
sizes that are no multiple of any block, a single row, vocabularies split among several programs.
"""
import inspect

import pytest
import torch

from fastalign.kernels import linear_cross_entropy as kernel
from fastalign.kernels import linear_softmax_tiles as tiles
from tests.conftest import HAS_CUDA, requires_cuda
from tests.kernels.gpu_plans import GPU_PLAN_SHAPES, force_tile_config, use_gpu_plans
from tests.kernels.test_launch_options import record_launches

DEVICE = "cuda" if HAS_CUDA else "cpu"


def make_inputs(num_rows, hidden_size, vocab, dtype, with_bias, logit_scale=3.0, grad_scale_size=1.0):
    """Random inputs with logits of spread ~logit_scale, targets hitting both ends of the vocabulary,
    grad_scale of mixed signs and size ~grad_scale_size."""
    hidden = torch.randn(num_rows, hidden_size, device=DEVICE).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=DEVICE) * logit_scale / hidden_size ** 0.5).to(dtype)
    bias = torch.randn(vocab, device=DEVICE).to(dtype) if with_bias else None
    target = torch.randint(0, vocab, (num_rows,), device=DEVICE)
    target[-1] = 0
    target[0] = vocab - 1   # a single row's target: the last word, in the vocabulary's partial last block
    grad_scale = torch.randn(num_rows, device=DEVICE) * grad_scale_size  # signed, as forget / mismatch tokens
    return hidden, weight, bias, target, grad_scale


def float64_reference(hidden, weight, bias, target, grad_scale, label_smoothing=0.0):
    """lse, z[target] and the gradients of sum_t grad_scale_t (lse_t - z_t[target_t]) from full float64 logits; with
    label_smoothing eps, (1 - eps) z[target] + eps mean_v z[v] in place of z[target]."""
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    if bias is not None:
        leaves.append(bias.detach().double().requires_grad_())
    logits = leaves[0] @ leaves[1].T + (leaves[2] if bias is not None else 0.0)
    lse = torch.logsumexp(logits, dim=1)
    target_logit = logits.gather(1, target[:, None]).squeeze(1)
    if label_smoothing:
        target_logit = (1 - label_smoothing) * target_logit + label_smoothing * logits.mean(dim=1)
    (grad_scale.double() * (lse - target_logit)).sum().backward()
    grads = [leaf.grad for leaf in leaves] + ([None] if bias is None else [])
    return lse.detach(), target_logit.detach(), *grads


def assert_matches(actual, expected, tol):
    """|actual - expected| <= tol * max|expected| elementwise: relative error at the tensor's own scale."""
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=tol * expected.abs().max().item())


def check_against_reference(num_rows, hidden_size, vocab, dtype, with_bias, tol, label_smoothing=0.0,
                            **input_kwargs):
    hidden, weight, bias, target, grad_scale = make_inputs(num_rows, hidden_size, vocab, dtype, with_bias,
                                                           **input_kwargs)
    ref_lse, ref_target_logit, ref_dh, ref_dw, ref_db = float64_reference(hidden, weight, bias, target, grad_scale,
                                                                          label_smoothing)

    lse, target_logit = kernel.forward(hidden, weight, bias, target, label_smoothing=label_smoothing)
    assert lse.shape == target_logit.shape == (num_rows,) and lse.dtype == target_logit.dtype == torch.float32
    assert_matches(lse, ref_lse, tol)
    assert_matches(target_logit, ref_target_logit, tol)

    d_hidden, d_weight, d_bias = kernel.backward(hidden, weight, bias, target, lse, grad_scale,
                                                 need_weight_grad=True, need_bias_grad=with_bias,
                                                 label_smoothing=label_smoothing)
    assert d_hidden.dtype == d_weight.dtype == dtype
    assert_matches(d_hidden, ref_dh, tol)
    assert_matches(d_weight, ref_dw, tol)
    if with_bias:
        assert_matches(d_bias, ref_db, tol)
    else:
        assert d_bias is None


@pytest.mark.parametrize("num_rows, hidden_size, vocab, with_bias", [
    (1, 24, 37, False),     # a single row, one split
    (1, 40, 131, True),     # a single row, several vocabulary splits
    (21, 40, 131, True),    # rows and vocabulary both off the block sizes
    (33, 24, 333, False),   # several row blocks and splits
])
def test_fp32_matches_float64(num_rows, hidden_size, vocab, with_bias):
    check_against_reference(num_rows, hidden_size, vocab, torch.float32, with_bias, tol=1e-4)


@pytest.mark.parametrize("label_smoothing", [0.1, 1.0])
@pytest.mark.parametrize("num_rows, hidden_size, vocab, with_bias", [
    (1, 40, 131, True),     # a single row, several vocabulary splits whose sums of the logits are merged
    (21, 40, 131, True),
    (33, 24, 333, False),   # several row blocks and splits, backward chunks of part of the vocabulary
])
def test_label_smoothing_matches_float64(label_smoothing, num_rows, hidden_size, vocab, with_bias):
    """(1 - eps) z[t, y_t] + eps mean_v z[t, v] from the forward, and G = softmax - (1 - eps) onehot - eps / V."""
    check_against_reference(num_rows, hidden_size, vocab, torch.float32, with_bias, tol=1e-4,
                            label_smoothing=label_smoothing)


@pytest.mark.parametrize("label_smoothing", [0.1, 1.0])
@pytest.mark.parametrize("num_rows, hidden_size, vocab", [(1, 40, 131), (33, 24, 333)])
def test_label_smoothing_in_the_forward_with_gradients_matches_float64(label_smoothing, num_rows, hidden_size, vocab):
    """forward_with_gradients: the kernels read the logits from the fp32 buffer of whole rows (FROM_BUFFER)."""
    hidden, weight, bias, target, grad_scale = make_inputs(num_rows, hidden_size, vocab, torch.float32, True)
    expected = float64_reference(hidden, weight, bias, target, grad_scale, label_smoothing)
    got = kernel.forward_with_gradients(hidden, weight, bias, target, grad_scale, True, True,
                                        label_smoothing=label_smoothing)
    for actual, want in zip(got, expected):
        assert_matches(actual, want, 1e-4)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_label_smoothing_is_a_compile_time_flag_and_a_runtime_number(monkeypatch, label_smoothing):
    """Without smoothing the kernels build without it (HAS_SMOOTHING off: the kernels that ran before, with no work
    or registers for it); eps itself is a runtime number, so that each eps does not build them anew."""
    seen = record_launches(monkeypatch, lambda name, kwargs: (name.rsplit(".", 1)[1], kwargs.get("HAS_SMOOTHING")))
    hidden, weight, bias, target, grad_scale = make_inputs(5, 24, 37, torch.float32, True)
    lse, _ = kernel.forward(hidden, weight, bias, target, label_smoothing=label_smoothing)
    kernel.backward(hidden, weight, bias, target, lse, grad_scale, True, True, label_smoothing=label_smoothing)
    assert {name for name, _ in seen} == {"_forward_kernel", "_gradient_kernel"}
    assert all(flag is bool(label_smoothing) for _, flag in seen), seen
    for tuner in (kernel._forward_kernel, kernel._gradient_kernel):
        assert "HAS_SMOOTHING" in tuner.keys   # (the autotuner's choice for one build is not taken for the other)
        parameters = inspect.signature(tuner.fn.fn).parameters   # (the autotuner's kernel's Python function)
        assert "constexpr" in str(parameters["HAS_SMOOTHING"].annotation)
        assert parameters["smoothing"].annotation is parameters["uniform"].annotation is inspect.Parameter.empty


def test_fp32_sharp_softmax_stays_finite_and_exact():
    """Logits spread over hundreds: exp overflows unless the running max is subtracted."""
    check_against_reference(17, 24, 131, torch.float32, with_bias=True, tol=1e-4, logit_scale=300.0)


def test_bias_of_minus_inf_over_a_whole_vocabulary_split():
    """Words masked out by a bias of -inf over the first split (and its first tiles) leave the loss and the
    gradients finite: a row that has seen only -inf logits so far once took exp(-inf + inf) = NaN."""
    vocab = 3 * tiles._SPLIT_ALIGN + 5
    hidden, weight, bias, target, grad_scale = make_inputs(9, 24, vocab, torch.float32, with_bias=True)
    bias[:tiles._SPLIT_ALIGN + 3] = float("-inf")
    target = torch.randint(tiles._SPLIT_ALIGN + 3, vocab, target.shape, device=DEVICE)
    ref_lse, ref_target_logit, ref_dh, ref_dw, ref_db = float64_reference(hidden, weight, bias, target, grad_scale)
    lse, target_logit = kernel.forward(hidden, weight, bias, target)
    assert_matches(lse, ref_lse, 1e-4)
    assert_matches(target_logit, ref_target_logit, 1e-4)
    d_hidden, d_weight, d_bias = kernel.backward(hidden, weight, bias, target, lse, grad_scale, True, True)
    for got, want in ((d_hidden, ref_dh), (d_weight, ref_dw), (d_bias, ref_db)):
        assert_matches(got, want, 1e-4)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's matmul of inf
@pytest.mark.parametrize("where", ["hidden", "weight"])
def test_an_infinite_logit_gives_an_infinite_lse_as_torch_does(where):
    """A hidden state or a weight holding +inf: torch.logsumexp of the logits (the torch backend's) is +inf where the
    kernel gave NaN, its online logsumexp and the merge of the splits taking exp(inf - inf) against a max of +inf."""
    vocab = 3 * tiles._SPLIT_ALIGN + 5
    hidden, weight, _, target, _ = make_inputs(9, 24, vocab, torch.float32, with_bias=False)
    if where == "hidden":
        hidden[1, 0] = float("inf")
    else:
        weight[tiles._SPLIT_ALIGN + 3, 2] = float("inf")   # in the second split
    expected = torch.logsumexp(hidden.double() @ weight.double().T, dim=1)
    assert (expected == float("inf")).any() and expected.isfinite().any()
    lse, _ = kernel.forward(hidden, weight, None, target)
    torch.testing.assert_close(lse.double(), expected, rtol=1e-4, atol=0)


def test_unrequested_grads_are_none_and_d_hidden_unchanged():
    hidden, weight, bias, target, grad_scale = make_inputs(9, 24, 131, torch.float32, with_bias=True)
    _, _, ref_dh, _, _ = float64_reference(hidden, weight, bias, target, grad_scale)
    lse, _ = kernel.forward(hidden, weight, bias, target)
    d_hidden, d_weight, d_bias = kernel.backward(hidden, weight, bias, target, lse, grad_scale,
                                                 need_weight_grad=False, need_bias_grad=False)
    assert d_weight is None and d_bias is None
    assert_matches(d_hidden, ref_dh, 1e-4)


def test_fp16_with_small_grad_scale_matches_float64():
    """fp16 inputs with a per-token scale of a "mean" over ~1000 tokens: G enters the matmuls scaled to [-1, 1]."""
    check_against_reference(21, 40, 131, torch.float16, with_bias=True, tol=2e-2, logit_scale=1.0,
                            grad_scale_size=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_rows, hidden_size, vocab, with_bias", [(1, 40, 131, True), (33, 24, 333, False)])
def test_half_precision_matches_float64(dtype, num_rows, hidden_size, vocab, with_bias):
    """16-bit inputs, fp32 accumulation, gradients written in the input dtype (the interpreter computes bf16 dots
    by value since kernels/interpreter_fixes.py)."""
    check_against_reference(num_rows, hidden_size, vocab, dtype, with_bias, tol=2e-2)


# on CUDA, (3000, 1024, 5003) spans 2 row segments and 5 vocabulary chunks of the backward (chunk_plan)
GPU_SHAPES = [(300, 264, 5003), (3000, 1024, 5003)]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_rows, hidden_size, vocab", GPU_SHAPES)
def test_half_precision_on_gpu_matches_float64(dtype, num_rows, hidden_size, vocab):
    check_against_reference(num_rows, hidden_size, vocab, dtype, with_bias=True, tol=2e-2)


@requires_cuda
def test_fp32_on_gpu_matches_float64():
    """fp32 inputs must use full-precision dots on the GPU (TF32 would miss 1e-4)."""
    check_against_reference(300, 264, 5003, torch.float32, with_bias=False, tol=1e-4)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("tile", tiles._TILE_SHAPES[1] + [tiles._SMALL_TILE], ids=str)
@pytest.mark.parametrize("shape", GPU_PLAN_SHAPES, ids=str)
def test_cross_entropy_in_each_gpu_tile_config_with_the_gpu_plans(monkeypatch, shape, tile, dtype, tol):
    """Each autotune candidate (the autotuner may pick any of them on a GPU; the interpreter only runs 16/32/16),
    with the GPU's vocabulary splits (256 + 77 columns) and one backward chunk of the whole vocabulary, so that
    a column-tile grid or mask that depends on the block shape shows; with more rows than words, a gradient grid
    that counted its row blocks by the chunk's columns (a mutation run: tests at the interpreter's plan, one row
    block per chunk, let it pass)."""
    for tuner in (kernel._forward_kernel, kernel._gradient_kernel):
        force_tile_config(monkeypatch, tuner, *tile)
    use_gpu_plans(monkeypatch)
    check_against_reference(*shape, dtype, with_bias=True, tol=tol)


@pytest.mark.parametrize("gpu_plan", [False, True], ids=["own_plan", "gpu_plan"])
def test_only_the_split_holding_a_target_writes_its_logit(monkeypatch, gpu_plan):
    """On a GPU the programs of all splits run at once; the interpreter runs them in grid order, so a split that
    also wrote (a wrong) z[t, y_t] for a target just past its range is overwritten by the next split here but
    races there. Split 0 of row block 0 run alone must leave every other split's targets untouched. The vocabulary
    spans several split ranges of either plan (131 words made one split of a GPU's 256-aligned ranges)."""
    if gpu_plan:
        use_gpu_plans(monkeypatch)
    num_rows, hidden_size, vocab = 8, 24, 4 * tiles._SPLIT_ALIGN + 3
    hidden, weight, _, _, _ = make_inputs(num_rows, hidden_size, vocab, torch.float32, with_bias=False)
    num_splits, per_split = tiles.vocab_splits(num_rows, vocab, hidden.device)
    assert num_splits >= 2
    target = torch.tensor([0, per_split - 1, per_split, per_split + 1, vocab - 1, 5, per_split, per_split - 1],
                          device=hidden.device)
    split_stats = torch.empty(2, num_rows, num_splits, device=hidden.device)
    target_logit = torch.full((num_rows,), float("nan"), device=hidden.device)
    kernel._forward_kernel[(1,)](hidden, weight, weight, hidden, target, split_stats, target_logit, 0.0, 0.0, 0.0,
                                 num_rows, hidden_size, vocab, per_split, num_splits, 0, HAS_BIAS=False,
                                 HAS_SOFTCAP=False, HAS_SMOOTHING=False, FROM_BUFFER=False)
    inside = target < per_split
    expected = (hidden.double() @ weight.double().T).gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(target_logit[inside].double(), expected[inside], rtol=1e-5, atol=1e-5)
    assert target_logit[~inside].isnan().all(), target_logit
