"""Peak extra memory of the fused losses is bounded by their chunks, not by N x V: measured, not asserted on code.

On CPU (the chunked torch path) each run happens in a fresh process whose peak resident set size (VmHWM) is read
before and after one forward + backward. Not ru_maxrss: Linux carries it over from the parent through fork and exec,
so that after a test session's parent had grown past the child's peak, no growth showed (the naive path's 512 MB
read as 121 MB, and as 0 beside a 2 GB parent). The naive materialised-logits computation is measured the same way,
so the test also shows that the measurement can see an N x V buffer. On a GPU (the Triton path) the CUDA
allocator's peak is read around one forward + backward.
"""
import os
import subprocess
import sys

import pytest

from tests.conftest import requires_cuda

N, H, V = 4096, 32, 16384
LOGITS_MB = N * V * 4 / 2 ** 20  # 256 MB of fp32 logits

SCRIPT = f"""
import torch
import fastalign

def peak_kib():   # this process's own peak resident set (VmHWM, in KiB), which exec starts afresh
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

torch.manual_seed(0)
torch.set_num_threads(1)
hidden = torch.randn({N}, {H}, requires_grad=True)
weight = torch.randn({V}, {H}, requires_grad=True)
target = torch.randint(0, {V}, ({N},))

def chunked(h, w, y):
    return fastalign.linear_cross_entropy(h, w, y, backend="torch")

def naive(h, w, y):
    return torch.nn.functional.cross_entropy(h @ w.t(), y)

ref_hidden, ref_weight = torch.randn({N}, {H}), torch.randn({V}, {H})

def chunked_kl(h, w, y):
    return fastalign.linear_kl_div(h, w, ref_hidden[:len(h)], ref_weight[:len(w)], backend="torch")

def chunked_in_forward(h, w, y):
    return fastalign.linear_cross_entropy(h, w, y, backend="torch", grads_in_forward=True)

def chunked_kl_in_forward(h, w, y):
    return fastalign.linear_kl_div(h, w, ref_hidden[:len(h)], ref_weight[:len(w)], backend="torch",
                                   grads_in_forward=True)

loss_fn = {{"chunked": chunked, "naive": naive, "chunked_kl": chunked_kl, "chunked_in_forward": chunked_in_forward,
           "chunked_kl_in_forward": chunked_kl_in_forward}}[MODE]
loss_fn(hidden[:2], weight[:64], target[:2] % 64).backward()  # load kernels and libraries outside the measure
before = peak_kib()
loss_fn(hidden, weight, target).backward()
after = peak_kib()
print((after - before) / 1024)
"""


def peak_extra_mb(mode):
    """Peak resident growth of one forward + backward. glibc serves large blocks by mmap, but after freeing one it
    raises that threshold and serves later ones from its heap, whose freed space it keeps: the peak then depended
    on timing (97 to 229 MB for the same KL run). A fixed threshold keeps every block of a chunk in its own map."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2 ** 20)}
    result = subprocess.run([sys.executable, "-c", f"MODE = {mode!r}\n" + SCRIPT], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    return float(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status, which is Linux's")
def test_chunked_peak_memory_is_bounded_by_the_chunk():
    from fastalign.ops.torch_chunked.chunking import CHUNK_BYTES

    chunked, naive = peak_extra_mb("chunked"), peak_extra_mb("naive")
    assert naive > LOGITS_MB, f"the measurement missed the naive path's {LOGITS_MB:.0f} MB of logits ({naive:.0f} MB)"
    assert chunked < 4 * CHUNK_BYTES / 2 ** 20, f"chunked path used {chunked:.0f} MB beyond its inputs"


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status, which is Linux's")
def test_the_measurement_does_not_depend_on_the_parents_size():
    """A parent larger than the child's whole peak (a long test session) hid all growth from ru_maxrss."""
    import torch

    parent = torch.ones(3 * 2 ** 29 // 4)   # 1.5 GB resident in this process, more than the child's peak
    assert peak_extra_mb("naive") > LOGITS_MB
    del parent


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status, which is Linux's")
def test_chunked_kl_peak_memory_is_bounded_by_the_chunk():
    """The KL holds two [rows, V] logits matrices per chunk (policy and reference): its chunks take half the rows
    of the cross-entropy's, so that its peak stays within the same bound."""
    from fastalign.ops.torch_chunked.chunking import CHUNK_BYTES

    chunked = peak_extra_mb("chunked_kl")
    assert chunked < 4 * CHUNK_BYTES / 2 ** 20, f"chunked KL used {chunked:.0f} MB beyond its inputs"


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status, which is Linux's")
@pytest.mark.parametrize("mode", ["chunked_in_forward", "chunked_kl_in_forward"])
def test_gradients_taken_in_the_forward_stay_within_the_chunks(mode):
    """grads_in_forward=True on the torch path: each chunk's logits serve the loss and the gradients at once, within
    the same bound."""
    from fastalign.ops.torch_chunked.chunking import CHUNK_BYTES

    chunked = peak_extra_mb(mode)
    assert chunked < 4 * CHUNK_BYTES / 2 ** 20, f"{mode} used {chunked:.0f} MB beyond its inputs"


def gpu_extra_bytes(op, **options):
    """The CUDA allocator's peak during one forward + backward of `op` on bench_loss.py's Llama-3-8B head (N 8192,
    bf16), beyond the inputs and the gradients it returns; and (n, h, v, dtype)."""
    import torch
    import fastalign

    n, h, v, dtype = 8192, 4096, 128256, torch.bfloat16
    hidden = torch.randn(n, h, device="cuda", dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, h, device="cuda", dtype=dtype) / h ** 0.5).requires_grad_()
    if op == "linear_cross_entropy":
        target = torch.randint(0, v, (n,), device="cuda")
        loss_fn = lambda: fastalign.linear_cross_entropy(hidden, weight, target, backend="triton", **options)  # noqa
    else:
        ref_hidden = hidden.detach() + 0.1 * torch.randn_like(hidden)
        loss_fn = lambda: fastalign.linear_kl_div(hidden, weight, ref_hidden, weight, backend="triton",  # noqa: E731
                                                  **options)
    loss_fn().backward()  # autotuning and compilation outside the measure
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss_fn().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - (hidden.numel() + weight.numel()) * dtype.itemsize
    return extra, (n, h, v, dtype)


@requires_cuda
@pytest.mark.parametrize("op", ["linear_cross_entropy", "linear_kl_div"])
def test_triton_backward_extra_memory_is_its_fixed_scratch(op):
    """On the GPU the Triton path needs, beyond its inputs and the gradients it returns, only the backward's
    scratch (one row segment's fp32 accumulator, one matmul output, one gradient chunk) and per-row
    statistics: far under the [N, V] logits, whatever N."""
    from fastalign.kernels.chunked_backward import chunk_plan

    extra, (n, h, v, dtype) = gpu_extra_bytes(op)
    rows, cols = chunk_plan(n, v, h)
    scratch = rows * h * (4 + dtype.itemsize) + rows * cols * dtype.itemsize
    assert extra <= scratch + 64 * n + 2 ** 20, f"{extra / 2 ** 20:.1f} MiB extra, scratch {scratch / 2 ** 20:.1f} MiB"
    assert extra < 0.01 * n * v * dtype.itemsize  # the bound: under 1% of the bf16 logits


@requires_cuda
@pytest.mark.parametrize("op", ["linear_cross_entropy", "linear_kl_div"])
def test_triton_gradients_in_the_forward_take_their_row_blocks(op):
    """grads_in_forward=True on the GPU: beyond the inputs and the gradients, one block of whole logits rows (fp32
    logits of each head, a bf16 G) and the segment's d_hidden scratch, as row_block_plan sizes them; the KL's heads
    share their weight here, so its block's rows of both hidden states are also stacked for their one product."""
    from fastalign.kernels.chunked_backward import row_block_plan

    extra, (n, h, v, dtype) = gpu_extra_bytes(op, grads_in_forward=True)
    heads = 1 if op == "linear_cross_entropy" else 2
    logit_bytes = 4 * heads + dtype.itemsize
    rows, _ = row_block_plan(n, v, logit_bytes)
    block = rows * v * logit_bytes + rows * h * (4 + dtype.itemsize) + (heads > 1) * 2 * rows * h * dtype.itemsize
    assert extra <= block + 64 * n + 2 ** 20, f"{extra / 2 ** 20:.1f} MiB extra, block {block / 2 ** 20:.1f} MiB"
