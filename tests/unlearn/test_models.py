"""Checks of a model's weights (fastalign/unlearn/models.py) that no other test file covers."""
import pytest
import torch

from fastalign.unlearn.models import finite


@pytest.mark.parametrize("where", [0, -1], ids=["first chunk", "last chunk"])
def test_a_nan_in_any_chunk_of_a_large_float8_weight_is_found(where):
    """A float8 weight is read in chunks of 2**24 elements (torch.isfinite takes no float8): a NaN in any of them is
    a non-finite weight, whichever chunk holds it, where the tests' tiny weights are one chunk each."""
    weight = torch.zeros((1 << 24) + 8, dtype=torch.float8_e4m3fn)
    assert bool(finite(weight))
    weight[where] = float("nan")
    assert not bool(finite(weight))
