"""The interpreter fixes of kernels/interpreter_fixes.py: kernel loops bounded by kernel scalars run under Triton
3.6's interpreter with numpy >= 2.4 (Triton 3.6's conversion of a scalar to an index is put back in place, so that
the test means the same on the Triton release CI installs), tl.dot computes bf16 operands by their values, fp32 ->
bf16 casts round to the nearest even, and launches from two threads run one at a time."""
import inspect
import os
import sys
import threading

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

from fastalign.kernels import interpreter_fixes

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

    interpreter_fixes.squeeze_loop_bounds()
    interpreter_fixes.squeeze_loop_bounds()  # idempotent
    _count_tiles_kernel[(2,)](counts, 37, BLOCK=16)
    assert counts.tolist() == [3, 3]


def test_newer_triton_is_left_alone(monkeypatch):
    monkeypatch.setattr(triton, "__version__", "3.7.1")
    installed_patch = interpreter._patch_lang_tensor
    interpreter_fixes.squeeze_loop_bounds()
    assert interpreter._patch_lang_tensor is installed_patch


@triton.jit
def _dot_kernel(a_ptr, b_ptr, out_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    rows, inner, cols = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(a_ptr + rows[:, None] * K + inner[None, :])
    b = tl.load(b_ptr + inner[:, None] * N + cols[None, :])
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], tl.dot(a, b))


def test_bf16_dots_take_the_operands_values(monkeypatch):
    """fp32 accumulation of exact bf16 products, as tensor cores do; the unfixed interpreter is far off."""
    a, b = torch.randn(16, 32).bfloat16(), torch.randn(32, 16).bfloat16()
    out = torch.empty(16, 16)
    # the interpreter's own tl.dot, without the fix that importing the kernels applied
    builder = interpreter.InterpreterBuilder
    monkeypatch.setattr(builder, "create_dot", inspect.unwrap(builder.create_dot))
    _dot_kernel[(1,)](a, b, out, 16, 32, 16)
    assert not torch.allclose(out, a.float() @ b.float(), rtol=1e-2, atol=1e-2)

    interpreter_fixes.upcast_bf16_dots()
    interpreter_fixes.upcast_bf16_dots()  # idempotent
    _dot_kernel[(1,)](a, b, out, 16, 32, 16)
    torch.testing.assert_close(out, a.double().matmul(b.double()).float(), rtol=1e-6, atol=1e-5)
    _dot_kernel[(1,)](a.float(), b.float(), out, 16, 32, 16)  # other dtypes as before
    torch.testing.assert_close(out, a.float() @ b.float(), rtol=1e-6, atol=1e-5)


@triton.jit
def _to_bf16_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs).to(tl.bfloat16))


def test_bf16_casts_round_to_nearest_even(monkeypatch):
    """As torch's (and a GPU's) casts; the unfixed interpreter drops the bits past bf16's mantissa. Ties go to the
    even neighbour: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7, and rounds down; 1 + 3 * 2^-8 rounds up."""
    x = torch.cat([torch.randn(252), torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 3 * 2 ** -8), 3e38])])
    out = torch.empty(256, dtype=torch.bfloat16)
    builder = interpreter.InterpreterBuilder
    monkeypatch.setattr(builder, "cast_impl", inspect.unwrap(builder.cast_impl))
    _to_bf16_kernel[(1,)](x, out, 256)
    assert (out != x.bfloat16()).float().mean() > 0.2

    interpreter_fixes.round_bf16_casts()
    interpreter_fixes.round_bf16_casts()  # idempotent
    _to_bf16_kernel[(1,)](x, out, 256)
    assert torch.equal(out, x.bfloat16())
    assert out[-4:-1].tolist() == [1.0, 1 + 2 ** -6, -(1 + 2 ** -6)]


@triton.jit
def _program_ids_kernel(out_ptr):
    tl.store(out_ptr + tl.program_id(0), tl.program_id(0) + 1)


def _waiting_to_launch(thread):
    """Whether `thread` waits for the launch lock of one_launch_at_a_time (its innermost frame is the wrapper's)."""
    launch = interpreter.GridExecutor.__call__
    frame = sys._current_frames().get(thread.ident)
    return getattr(launch, "one_at_a_time", False) and frame is not None and frame.f_code is launch.__code__


def test_launches_from_two_threads_run_one_at_a_time(monkeypatch):
    """Thread A's launch is held inside (program 1's id set); thread B launches meanwhile and would be held at its
    program 0; A goes on, then B. Overlapping, A's programs ran with B's program id and grid (an error here, a
    silently wrong output where the ids fit), and B with the language that A's end unpatched. Serialised, B waits
    for A and both are right."""
    interpreter_fixes.one_launch_at_a_time()
    interpreter_fixes.one_launch_at_a_time()  # idempotent
    builder = interpreter.interpreter_builder
    set_grid_idx = builder.set_grid_idx
    outs = {"A": torch.zeros(3, dtype=torch.int32), "B": torch.zeros(2, dtype=torch.int32)}
    hold_at, errors = {"A": 1, "B": 0}, {}
    held, go = {n: threading.Event() for n in outs}, {n: threading.Event() for n in outs}
    threads = {}

    def holding_set_grid_idx(x, y, z):
        set_grid_idx(x, y, z)
        name = next((n for n, t in threads.items() if t is threading.current_thread()), None)
        if name is not None and x == hold_at[name] and not held[name].is_set():
            held[name].set()
            assert go[name].wait(timeout=60)    # a guard against a hung test, not a synchronisation

    def launch(name):
        try:
            _program_ids_kernel[(len(outs[name]),)](outs[name])
        except Exception as err:    # handed to the test
            errors[name] = err

    monkeypatch.setattr(builder, "set_grid_idx", holding_set_grid_idx)
    for name in outs:
        threads[name] = threading.Thread(target=launch, args=(name,), daemon=True)
    try:
        threads["A"].start()
        assert held["A"].wait(timeout=60)
        threads["B"].start()
        while not (held["B"].wait(timeout=0.01) or _waiting_to_launch(threads["B"])):
            pass                                # until B is held inside its launch, or waits to start it
    finally:
        for name in outs:
            go[name].set()
            threads[name].join(timeout=60)
    assert errors == {}
    assert outs["A"].tolist() == [1, 2, 3] and outs["B"].tolist() == [1, 2]


def test_each_fix_applied_again_wraps_nothing_more():
    """kernels/__init__.py applied every fix on import: applied again, each leaves the interpreter's patched
    callables as they are, not wrapped once more (a lock taken twice, a cast rounded twice, per call)."""
    def patched():
        builder, grid = interpreter.InterpreterBuilder, interpreter.GridExecutor
        return [builder.create_dot, builder.cast_impl, grid.__call__, interpreter._patch_lang_tensor]

    before = patched()
    assert all(getattr(f, mark) for f, mark in zip(before, ("upcasts_bf16", "rounds_bf16", "one_at_a_time")))
    for fix in (interpreter_fixes.squeeze_loop_bounds, interpreter_fixes.upcast_bf16_dots,
                interpreter_fixes.round_bf16_casts, interpreter_fixes.one_launch_at_a_time):
        fix()
    assert all(now is then for now, then in zip(patched(), before))
