"""The backward's chunk plan as a GPU computes it (the interpreter uses tiny fixed chunks)."""
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
