"""The backward's chunk plan as a GPU computes it (the interpreter uses tiny fixed chunks), and the loop of
backward_in_chunks over row segments and vocabulary chunks, driven by plain torch segment writers."""
import pytest
import torch

from fastalign.kernels import chunked_backward


@pytest.mark.parametrize("hidden_size", [64, 4096, 16384, 32768, 131072])
def test_gpu_chunk_plan_is_positive_and_within_the_shape(monkeypatch, hidden_size):
    """A segment of 0 rows (a wide H) would make the backward's range step 0."""
    monkeypatch.setattr(chunked_backward, "INTERPRET", False)
    for num_rows, vocab in [(1, 1), (7, 50), (300, 5003), (8192, 128256)]:
        rows, cols = chunked_backward.chunk_plan(num_rows, vocab, hidden_size)
        assert 1 <= rows <= num_rows and 1 <= cols <= vocab, (num_rows, vocab, hidden_size, rows, cols)


@pytest.mark.parametrize("hidden_size, vocab", [(2048, 128256), (4096, 128256), (8192, 128256), (8192, 152064)])
def test_gpu_chunk_plan_takes_at_most_32_segments_in_under_1_percent_of_the_logits(monkeypatch, hidden_size, vocab):
    """d_weight is rounded once per segment, so their number is bounded whatever N; the scratch that then grows
    with N (fp32 accumulator, matmul output, G chunk) stays far under the bf16 logits it replaces."""
    monkeypatch.setattr(chunked_backward, "INTERPRET", False)
    for num_rows in [1000, 8192, 65536, 65537, 1 << 20, (1 << 20) + 1]:   # (one row past 32 segments' multiple)
        rows, cols = chunked_backward.chunk_plan(num_rows, vocab, hidden_size)
        assert -(-num_rows // rows) <= 32 and 1 <= cols <= vocab, (num_rows, rows, cols)
        scratch = rows * hidden_size * (4 + 2) + rows * cols * 2
        assert scratch < 0.01 * num_rows * vocab * 2 or scratch <= 24 * 2 ** 20, (num_rows, rows, cols)


@pytest.mark.parametrize("num_rows", [4096, 32768])
def test_bf16_weight_gradient_error_stays_near_one_rounding_at_any_n(monkeypatch, num_rows):
    """The backward's d_weight, summed in bf16 segment by segment on the GPU plan (with segments made small, so
    that 32768 rows would take 256 of them), against the exact G^T x: within 5x the error of rounding the
    exact sum once (32 segments: ~3.5x; 256: ~12x)."""
    monkeypatch.setattr(chunked_backward, "INTERPRET", False)
    monkeypatch.setattr(chunked_backward, "_SEGMENT_ACCUMULATOR_BYTES", 4 * 32 * 128)   # 128-row segments
    torch.manual_seed(0)
    h, v = 32, 256
    weight = (torch.randn(v, h) / h ** 0.5).bfloat16()
    hidden = torch.randn(num_rows, h).bfloat16()
    d = torch.softmax(hidden.double() @ weight.double().t(), 1)
    d[torch.arange(num_rows), torch.randint(0, v, (num_rows,))] -= 1
    grad_scale = torch.full((num_rows,), 1.0 / num_rows)

    def segment_writer(rows, row_scale):
        return lambda cols, out: out.copy_(d[rows, cols] * row_scale.double()[:, None])

    _, d_weight, _ = chunked_backward.backward_in_chunks(hidden, weight, grad_scale, True, False, segment_writer,
                                                         need_hidden_grad=False)
    exact = (d / num_rows).t() @ hidden.double()
    error = lambda got: ((got.double() - exact).norm() / exact.norm()).item()  # noqa: E731
    assert error(d_weight) < 5 * error(exact.bfloat16())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hidden_gradient_sums_many_vocabulary_chunks_in_fp32(monkeypatch, dtype):
    """d_hidden over 64 vocabulary chunks: each chunk's G @ W is rounded to the input dtype once, but their sum
    runs in fp32, so the error stays within 3x that of rounding the exact result once (~1.7x measured); a running
    sum in the input dtype rounds once per chunk (5x in fp16, 10x in bf16)."""
    monkeypatch.setattr(chunked_backward, "INTERPRET", False)
    monkeypatch.setattr(chunked_backward, "_GRADIENT_CHUNK_ENTRIES", 64 * 128)   # 128-column chunks of 64 rows
    torch.manual_seed(0)
    n, h, v = 64, 32, 64 * 128
    weight = (torch.randn(v, h) / h ** 0.5).to(dtype)
    hidden = torch.randn(n, h).to(dtype)
    d = torch.softmax(hidden.double() @ weight.double().t(), 1)
    d[torch.arange(n), torch.randint(0, v, (n,))] -= 1
    grad_scale = torch.randn(n)
    assert chunked_backward.chunk_plan(n, v, h) == (n, 128)

    def segment_writer(rows, row_scale):
        return lambda cols, out: out.copy_(d[rows, cols] * row_scale.double()[:, None])

    d_hidden, _, _ = chunked_backward.backward_in_chunks(hidden, weight, grad_scale, False, False, segment_writer)
    exact = (d * grad_scale.double()[:, None]) @ weight.double()
    error = lambda got: ((got.double() - exact).norm() / exact.norm()).item()  # noqa: E731
    assert error(d_hidden) < 3 * error(exact.to(dtype))


def test_fp16_gradients_of_a_zero_grad_scale_are_zeros():
    """fp16 writes G / max|grad_scale|: a grad_scale of zeros (a loss multiplied by 0, every token weighted 0) gives
    gradients of zeros, not the NaNs of 0 / 0."""
    n, h, v = 5, 8, 40
    weight, hidden = torch.randn(v, h).half(), torch.randn(n, h).half()

    def segment_writer(rows, row_scale):
        return lambda cols, out: out.copy_(torch.ones(out.shape) * row_scale[:, None])

    grads = chunked_backward.backward_in_chunks(hidden, weight, torch.zeros(n), True, True, segment_writer)
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))


def run_backward(hidden, weight, grad_scale, d, plan=None):
    """backward_in_chunks of the gradient d * grad_scale[:, None] (d [M, V] in any dtype), every gradient asked for:
    (d_hidden, d_weight, d_bias, G), G the exact fp32 gradient."""
    def segment_writer(rows, row_scale):
        return lambda cols, out: out.copy_(d[rows, cols] * row_scale[:, None])

    grads = chunked_backward.backward_in_chunks(hidden, weight, grad_scale, True, True, segment_writer, plan=plan)
    return grads + (d.float() * grad_scale[:, None],)


def assert_exact_gradients(grads, hidden, weight):
    """run_backward's fp32 gradients are those of its exact G: G @ weight, G^T @ hidden and G summed over rows."""
    d_hidden, d_weight, d_bias, g = grads
    torch.testing.assert_close(d_hidden, g @ weight)
    torch.testing.assert_close(d_weight, g.t() @ hidden)
    torch.testing.assert_close(d_bias, g.sum(0))


def test_last_row_segment_and_vocabulary_chunk_of_one_entry():
    """9 rows in segments of 4 and 17 words in chunks of 8: the last segment is one row and the last chunk one
    column, which a loop or a slice stopping one short of the shape would skip."""
    torch.manual_seed(0)
    n, h, v = 9, 8, 17
    hidden, weight, d, grad_scale = torch.randn(n, h), torch.randn(v, h), torch.randn(n, v), torch.randn(n)
    assert_exact_gradients(run_backward(hidden, weight, grad_scale, d, plan=(4, 8)), hidden, weight)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bias_gradient_is_summed_and_kept_in_fp32(dtype):
    """d_bias comes in fp32, summed over rows in fp32: G entries 1 and 2^-12 (both exact in 16 bits) sum to
    1 + 2^-12, which a sum rounded to the input dtype would make 1."""
    hidden, weight = torch.ones(2, 4, dtype=dtype), torch.ones(3, 4, dtype=dtype)
    d = torch.tensor([[1.0, 1.0, 1.0], [2.0 ** -12, 2.0 ** -12, 2.0 ** -12]])
    _, _, d_bias, _ = run_backward(hidden, weight, torch.ones(2), d)
    assert d_bias.dtype == torch.float32
    assert torch.equal(d_bias, torch.full((3,), 1.0 + 2.0 ** -12))


def test_fp16_gradients_of_negative_grad_scales():
    """Every token weighted negatively (gradient ascent on forget tokens): fp16 divides G by max|grad_scale|, the
    magnitude of the scales, not their largest value (negative here, which would blow G up to infinities)."""
    torch.manual_seed(0)
    n, h, v = 6, 8, 40
    hidden, weight, d = torch.randn(n, h).half(), torch.randn(v, h).half(), torch.randn(n, v)
    grad_scale = -torch.rand(n) - 0.5
    d_hidden, d_weight, d_bias, g = run_backward(hidden, weight, grad_scale, d)
    for got, want in ((d_hidden, g @ weight.float()), (d_weight, g.t() @ hidden.float()), (d_bias, g.sum(0))):
        torch.testing.assert_close(got.float(), want, rtol=0, atol=1e-2 * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_segment_writer_gets_fp32_row_scales(dtype):
    """The writer's row_scale is fp32 whatever the input dtype (a 16-bit copy would round every token's scale, bf16 to
    3 digits): grad_scale itself, or in fp16 grad_scale / max|grad_scale|, sliced to the segment's rows."""
    torch.manual_seed(0)
    n, h, v = 20, 8, 12
    hidden, weight, grad_scale = torch.randn(n, h).to(dtype), torch.randn(v, h).to(dtype), torch.randn(n) / 3
    expected = grad_scale / grad_scale.abs().max() if dtype == torch.float16 else grad_scale
    seen = []

    def segment_writer(rows, row_scale):
        seen.append((rows, row_scale))
        return lambda cols, out: out.zero_()

    chunked_backward.backward_in_chunks(hidden, weight, grad_scale, True, True, segment_writer, plan=(8, 5))
    assert [rows for rows, _ in seen] == [slice(0, 8), slice(8, 16), slice(16, 20)]
    for rows, row_scale in seen:
        assert row_scale.dtype == torch.float32 and torch.equal(row_scale, expected[rows])


def test_uninitialised_buffers_are_written_before_they_are_read(monkeypatch):
    """The backward allocates d_hidden and its scratch buffers uninitialised, each entry written before it is read,
    and starts the sums d_weight, d_bias and each segment's accumulator from zeros: with every uninitialised
    allocation filled with NaN, the gradients still match the exact ones (two segments, several chunks)."""
    torch.manual_seed(0)
    n, h, v = 9, 8, 17
    hidden, weight, d, grad_scale = torch.randn(n, h), torch.randn(v, h), torch.randn(n, v), torch.randn(n)
    full, full_like = torch.full, torch.full_like
    with monkeypatch.context() as patch:
        patch.setattr(torch, "empty", lambda *size, **kwargs: full(size, float("nan"), **kwargs))
        patch.setattr(torch, "empty_like", lambda t, **kwargs: full_like(t, float("nan"), **kwargs))
        grads = run_backward(hidden, weight, grad_scale, d, plan=(5, 6))
    assert_exact_gradients(grads, hidden, weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_library_logits_rows_are_padded_to_a_multiple_of_16(dtype):
    """grads_in_forward's kernels read the logits buffer by its row stride; at V 32001 (a Llama 2 head with a pad
    token) or GPT-2's 50257 a stride of V is not a multiple of 16, which Triton cannot specialise, and their sm_90
    builds spilled 1.5-5 KB of registers per thread. The buffer's rows are padded; the [rows, V] view is the product."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 8).to(dtype), torch.randn(33, 8).to(dtype)
    logits = chunked_backward.library_logits(hidden, weight)
    assert logits.shape == (3, 33) and logits.dtype == torch.float32 and logits.stride() == (48, 1)
    torch.testing.assert_close(logits, hidden.float() @ weight.float().T)
