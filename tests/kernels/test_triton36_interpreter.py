"""Kernel loops bounded by kernel scalars run under Triton 3.6's interpreter with numpy >= 2.4
(kernels/triton36_interpreter.py). Triton 3.6's conversion of a scalar to an index is put back in place, so
that the test means the same on the Triton release CI installs."""
import os

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

from fastalign.kernels import triton36_interpreter

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="concerns Triton's interpreter")


@triton.jit
def _count_tiles_kernel(out_ptr, n, BLOCK: tl.constexpr):
    start = tl.program_id(0) * n
    count = 0
    for _ in range(start, start + n, BLOCK):
        count += 1
    tl.store(out_ptr + tl.program_id(0), count)


def numpy_refuses_one_dimensional_int():
    try:
        int(np.ones(1))
    except TypeError:
        return True
    return False


def test_loop_over_kernel_scalars_runs_on_triton_36s_interpreter(monkeypatch):
    installed_patch = interpreter._patch_lang_tensor

    def triton36_patch_lang_tensor(tensor, scope):
        installed_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", triton36_patch_lang_tensor)
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    counts = torch.zeros(2, dtype=torch.int32)
    if numpy_refuses_one_dimensional_int():
        with pytest.raises(Exception, match="only 0-dimensional arrays"):
            _count_tiles_kernel[(2,)](counts, 37, BLOCK=16)

    triton36_interpreter.squeeze_loop_bounds()
    triton36_interpreter.squeeze_loop_bounds()  # idempotent
    _count_tiles_kernel[(2,)](counts, 37, BLOCK=16)
    assert counts.tolist() == [3, 3]


def test_newer_triton_is_left_alone(monkeypatch):
    monkeypatch.setattr(triton, "__version__", "3.7.1")
    installed_patch = interpreter._patch_lang_tensor
    triton36_interpreter.squeeze_loop_bounds()
    assert interpreter._patch_lang_tensor is installed_patch
