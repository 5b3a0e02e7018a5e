"""Test-wide setup.

Without a CUDA device the Triton kernels run under Triton's CPU interpreter, so that the kernels
themselves (not only the torch fallback) are tested everywhere. The variable must be set before any
kernel module is imported, which is why it lives here; so must transformers' switch for Hub kernels.
"""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# transformers 5.25 on: unless this is off, from_pretrained swaps layers of a model it loads onto a GPU for kernels it
# downloads from the Hugging Face Hub (and needs the `kernels` package to load any model). Our commands turn them off
# themselves (fastalign/pretrained.py); this covers the tests' own from_pretrained calls, which download nothing and
# compare fastalign's outputs with the model's own code.
os.environ.setdefault("USE_HUB_KERNELS", "NO")

HAS_CUDA = torch.cuda.is_available()
# The team's shared data sets (TruthfulQA, HH harmless-base) lie in shared/data beside the checkout; never in the repo.
SHARED_DATA = Path(os.environ.get("FASTALIGN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
_NEEDS_CUDA = "needs a CUDA device"
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason=_NEEDS_CUDA)
# Where tests run the Triton kernels: on the GPU when there is one, else on CPU tensors in the interpreter.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


def triton_cases(cases, gpu_only=()):
    """Parameters of a test of the Triton backend: on a GPU, `cases` and the larger `gpu_only`, all marked `gpu`
    (bench/gpu_session.sh runs `-m gpu`); without one, `cases` alone, in the interpreter."""
    if HAS_CUDA:
        return [pytest.param(case, marks=requires_cuda) for case in [*cases, *gpu_only]]
    return list(cases)


def device_for(backend):
    """The device of a test's tensors for `backend` ("triton" follows TRITON_DEVICE, the torch path stays on CPU)."""
    return TRITON_DEVICE if backend == "triton" else "cpu"


def pytest_collection_modifyitems(items):
    """Tests marked requires_cuda also carry the `gpu` marker, so that `pytest -m gpu` runs exactly them."""
    for item in items:
        if any(mark.name == "skipif" and mark.kwargs.get("reason") == _NEEDS_CUDA for mark in item.iter_markers()):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(autouse=True, scope="session")
def _one_cpu_thread():
    """The tests run tiny models and shapes, for which one intra-op thread is fastest, and far faster than two
    when the cores are shared with other work; the previous setting is restored at the end."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state that fixes the mixed precision of the first Accelerator, a trainer's
    or a test's own: it is reset after each test, so that any test may choose its precision whatever ran before it
    in the same process (a worker of pytest -n)."""
    yield
    try:
        from accelerate.state import AcceleratorState
    except ImportError:
        return
    AcceleratorState._reset_state(True)
