"""Fixtures of the unlearning tests.

accelerate keeps one process-wide state that fixes the mixed precision of the first Accelerator; it is
reset after each test so that tests may choose different precisions.
"""
import pytest


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    try:
        from accelerate.state import AcceleratorState
    except ImportError:
        return
    AcceleratorState._reset_state(True)
