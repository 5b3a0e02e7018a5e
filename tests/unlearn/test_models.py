"""Checks of a model's weights (fastalign/unlearn/models.py) that no other test file covers."""
import pytest
import torch

from fastalign import CausalLMLoss
from fastalign.unlearn.models import check_fused_logits, finite, logit_softcap
from tests.runtime.tiny_models import drawn_weights
from tests.test_causal_lm_loss import VOCAB, assert_same_loss_and_gradients, batch
from tests.unlearn.test_objective import tiny_model


@pytest.mark.parametrize("where", [0, -1], ids=["first chunk", "last chunk"])
def test_a_nan_in_any_chunk_of_a_large_float8_weight_is_found(where):
    """A float8 weight is read in chunks of 2**24 elements (torch.isfinite takes no float8): a NaN in any of them is
    a non-finite weight, whichever chunk holds it, where the tests' tiny weights are one chunk each."""
    weight = torch.zeros((1 << 24) + 8, dtype=torch.float8_e4m3fn)
    assert bool(finite(weight))
    weight[where] = float("nan")
    assert not bool(finite(weight))


WIDE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=1)   # where fp32 rounding showed (128 and more)
MULTIPLIED = {"cohere-logit-scale-0.3": ("Cohere", dict(logit_scale=0.3)),
              "granite-logits-scaling-6": ("Granite", dict(logits_scaling=6.0, tie_word_embeddings=False))}


def wide_model(case, seed):
    """A 1-layer fp32 model of MULTIPLIED[case] of width 256, its weights drawn by `seed` so that logits are O(1)."""
    architecture, settings = MULTIPLIED[case]
    model = tiny_model(architecture, VOCAB, **WIDE, **settings)
    torch.manual_seed(seed)
    return drawn_weights(model)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("case", MULTIPLIED)
def test_a_wide_fp32_model_whose_multiplier_is_no_power_of_two_is_served(case, seed):
    """The probe computed (s h) W^T + s b, as the fused losses do, and compared it with the model's s (h W^T + b) to
    2 fp32 eps of the largest logit: the two round differently, by several ulps of the unscaled dot product, so fp32
    Cohere (logit_scale 0.3) and Granite (logits_scaling 6.0) models of width 128 and more were refused as models
    that transform their logits (2.8e-7 to 4.8e-7 on logits of about 1), 10 seeds in 10 for Cohere. Served, their
    loss and gradients are their own."""
    model = wide_model(case, seed)
    inputs = batch()
    assert_same_loss_and_gradients(model, CausalLMLoss(model, backend="torch")(**inputs), model(**inputs).loss)


TRANSFORMS = {   # changes of ~1e-4 relative between the decoder and the logits, which no config name reveals
    "logits times 1 + 1e-4": ("forward", lambda output: output * (1 + 1e-4)),
    "1e-4 of the largest logit added on every other token":
        ("forward", lambda output: output + 1e-4 * output.abs().max() * (torch.arange(output.shape[-1]) % 2)),
    "hidden states times 1 + 1e-4": ("input", lambda hidden: hidden * (1 + 1e-4))}


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("case", MULTIPLIED)
def test_a_transform_of_1e_4_of_a_wide_fp32_models_logits_is_refused(case, transform):
    """The probe's bound is a few fp32 roundings of the largest logit, no more: a wide model with a multiplier whose
    lm_head's output or input is changed by 1e-4 relative is still refused, not trained on another objective."""
    model = wide_model(case, seed=0)
    check_fused_logits(model)
    where, change = TRANSFORMS[transform]
    if where == "forward":
        model.lm_head.register_forward_hook(lambda module, args, output: change(output))
    else:
        model.lm_head.register_forward_pre_hook(lambda module, args: (change(args[0]),))
    with pytest.raises(NotImplementedError, match="its logits are not its lm_head's weight applied to the final"):
        check_fused_logits(model)


def test_recurrent_gemmas_soft_cap_is_the_models_own():
    """RecurrentGemma caps its logits at c tanh(z / c) as Gemma 2 does, with c its config's logits_soft_cap: read
    under Gemma 2's name alone (final_logit_softcapping), it was refused as a model that transforms its logits (they
    differ by up to 0.93). Served, its loss and gradients are its own."""
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM
    torch.manual_seed(0)
    config = RecurrentGemmaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=1, lru_width=32, attention_window_size=8,
                                  logits_soft_cap=3.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = drawn_weights(RecurrentGemmaForCausalLM(config))
    assert logit_softcap(model) == 3.0
    inputs = batch()
    assert_same_loss_and_gradients(model, CausalLMLoss(model, backend="torch")(**inputs), model(**inputs).loss)
