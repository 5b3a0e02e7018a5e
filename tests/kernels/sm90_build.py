"""Building Triton kernels for an H100/H200 (sm_90) on a machine without a GPU.

The interpreter that runs the kernels in CPU tests never compiles them; a build with the wheel's ptxas
catches what only the compiler sees. The build runs in a fresh process, outside the interpreter.
"""
import os
import subprocess
import sys

import pytest


def assert_builds_for_sm90(script):
    """Runs `script` (which calls triton.compile for GPUTarget("cuda", 90, 32)) in a fresh process without
    TRITON_INTERPRET; fails with the end of its stderr if it does not exit cleanly."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
