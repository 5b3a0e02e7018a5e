"""Test-wide setup.

Without a CUDA device the Triton kernels run under Triton's CPU interpreter, so that the kernels
themselves (not only the torch fallback) are tested everywhere. The variable must be set before any
kernel module is imported, which is why it lives here.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
