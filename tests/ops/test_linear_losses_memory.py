"""On CPU the chunked torch path's peak extra memory is bounded by its chunk, not by N x V.

Measured, not asserted on code: each run happens in a fresh process whose peak resident set size is read
before and after one forward + backward. The naive materialised-logits computation is measured the same way,
so the test also shows that the measurement can see an N x V buffer.
"""
import subprocess
import sys

import pytest

N, H, V = 4096, 32, 16384
LOGITS_MB = N * V * 4 / 2 ** 20  # 256 MB of fp32 logits

SCRIPT = f"""
import resource, torch
import fastalign
torch.manual_seed(0)
torch.set_num_threads(1)
hidden = torch.randn({N}, {H}, requires_grad=True)
weight = torch.randn({V}, {H}, requires_grad=True)
target = torch.randint(0, {V}, ({N},))

def chunked(h, w, y):
    return fastalign.linear_cross_entropy(h, w, y, backend="torch")

def naive(h, w, y):
    return torch.nn.functional.cross_entropy(h @ w.t(), y)

loss_fn = {{"chunked": chunked, "naive": naive}}[MODE]
loss_fn(hidden[:2], weight[:64], target[:2] % 64).backward()  # load kernels and libraries outside the measure
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loss_fn(hidden, weight, target).backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) / 1024)
"""


def peak_extra_mb(mode):
    result = subprocess.run([sys.executable, "-c", f"MODE = {mode!r}\n" + SCRIPT], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return float(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's convention")
def test_chunked_peak_memory_is_bounded_by_the_chunk():
    from fastalign.ops.torch_chunked.chunking import CHUNK_BYTES

    chunked, naive = peak_extra_mb("chunked"), peak_extra_mb("naive")
    assert naive > LOGITS_MB, f"the measurement missed the naive path's {LOGITS_MB:.0f} MB of logits ({naive:.0f} MB)"
    assert chunked < 4 * CHUNK_BYTES / 2 ** 20, f"chunked path used {chunked:.0f} MB beyond its inputs"
