"""unlearning_token_weights + one signed linear_cross_entropy == w_fgt L_fgt + w_rdn L_rdn of SPEC §1."""
import pytest
import torch

import fastalign
from tests.conftest import device_for


def spec_loss(logits_fgt, y_fgt, mask_fgt, logits_rdn, y_rdn, mask_rdn, w_fgt, w_rdn):
    """SPEC §1 written per sequence in float64: l_i = -(1/|A_i|) sum_{t in A_i} CE_t, averaged over sequences."""
    def stream(logits, y, mask, sign):
        per_seq = []
        for i in range(logits.shape[0]):
            ce = torch.nn.functional.cross_entropy(logits[i].double(), y[i], reduction="none")
            count = int(mask[i].sum())
            per_seq.append(sign * ce[mask[i]].sum() / count if count else torch.zeros((), dtype=torch.float64))
        return torch.stack(per_seq).mean()
    return w_fgt * stream(logits_fgt, y_fgt, mask_fgt, -1.0) + w_rdn * stream(logits_rdn, y_rdn, mask_rdn, 1.0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_signed_cross_entropy_equals_spec_objective(backend):
    h, v = 24, 131
    weight = torch.randn(v, h, dtype=torch.float32) / h ** 0.5
    hid_f, hid_r = torch.randn(3, 7, h), torch.randn(4, 5, h)
    y_f, y_r = torch.randint(0, v, (3, 7)), torch.randint(0, v, (4, 5))
    mask_f = torch.rand(3, 7) < 0.6
    mask_r = torch.rand(4, 5) < 0.6
    mask_f[1] = False  # a forget sequence without answer tokens contributes 0
    weights = fastalign.unlearning_token_weights(mask_f, mask_r, forget_weight=0.5, mismatch_weight=1.0)
    assert weights.shape == (3 * 7 + 4 * 5,) and weights.dtype == torch.float32
    assert torch.all(weights[: 21][mask_f.flatten()] < 0) and torch.all(weights[21:][mask_r.flatten()] > 0)
    hidden = torch.cat([hid_f.reshape(-1, h), hid_r.reshape(-1, h)])
    target = torch.cat([torch.where(mask_f, y_f, -100).flatten(), torch.where(mask_r, y_r, -100).flatten()])
    device = device_for(backend)
    got = fastalign.linear_cross_entropy(hidden.to(device), weight.to(device), target.to(device),
                                         token_weight=weights.to(device), reduction="sum", backend=backend)
    want = spec_loss(hid_f @ weight.t(), y_f, mask_f, hid_r @ weight.t(), y_r, mask_r, 0.5, 1.0)
    assert torch.isfinite(got) and abs(float(got) - float(want)) <= 1e-5 * max(1.0, abs(float(want)))


def test_one_stream_alone_and_empty_answers():
    mask = torch.zeros(2, 4, dtype=torch.bool)
    assert torch.all(fastalign.unlearning_token_weights(mask, None) == 0)
    mask[0, 1:3] = True
    mask[1, 3] = True   # a single answer token carries its sequence's whole share
    weights = fastalign.unlearning_token_weights(None, mask, mismatch_weight=2.0)
    assert torch.allclose(weights, torch.tensor([0, 0.5, 0.5, 0, 0, 0, 0, 1.0]))


@pytest.mark.parametrize("forget,mismatch,message", [
    (None, None, "needs forget_mask, mismatch_mask or both"),
    (torch.ones(3, dtype=torch.bool), None, "forget_mask must be a \\[batch, tokens\\] bool tensor"),
    (None, torch.ones(2, 3), "mismatch_mask must be a \\[batch, tokens\\] bool tensor"),
])
def test_bad_masks_are_named(forget, mismatch, message):
    with pytest.raises((TypeError, ValueError), match=message):
        fastalign.unlearning_token_weights(forget, mismatch)


@pytest.mark.parametrize("weights,message", [
    # were silent: NaN or inf weights on every answer token, a text read as its number, True as 1
    (dict(forget_weight=float("nan")), "forget_weight must be a finite number >= 0, got nan"),
    (dict(mismatch_weight=float("inf")), "mismatch_weight must be a finite number >= 0, got inf"),
    (dict(forget_weight=10 ** 400), "forget_weight must be a finite number >= 0, got 10{400}$"),   # was OverflowError
    (dict(forget_weight="0.5"), "forget_weight must be a finite number >= 0, got '0.5'"),
    (dict(mismatch_weight=True), "mismatch_weight must be a finite number >= 0, got True"),
    (dict(forget_weight=-0.5), "forget_weight must be a finite number >= 0"),   # ascent would become descent
    # were float()'s errors, naming no argument
    (dict(forget_weight=None), "forget_weight must be a finite number >= 0, got None"),
    (dict(mismatch_weight=1j), "mismatch_weight must be a finite number >= 0, got 1j"),
])
def test_bad_weights_are_named(weights, message):
    mask = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=message):
        fastalign.unlearning_token_weights(mask, mask, **weights)


def test_default_weights_are_the_spec_ones():
    """Defaults w_fgt = 0.5, w_rdn = 1.0 (SPEC §1)."""
    mask = torch.tensor([[True, True]])
    assert fastalign.unlearning_token_weights(mask, mask).tolist() == [-0.25, -0.25, 0.5, 0.5]


def test_masks_on_different_devices_are_refused():
    mask = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="forget_mask is on cpu but mismatch_mask on meta"):
        fastalign.unlearning_token_weights(mask, mask.to("meta"))


def test_a_weight_of_zero_switches_its_stream_off():
    """0 is a weight (>= 0, as SPEC's w_fgt and w_rdn): its stream's tokens get 0, the other stream keeps its own."""
    mask = torch.tensor([[True, True]])
    assert fastalign.unlearning_token_weights(mask, mask, forget_weight=0).tolist() == [0, 0, 0.5, 0.5]
    assert fastalign.unlearning_token_weights(mask, mask, mismatch_weight=0.0).tolist() == [-0.25, -0.25, 0, 0]
