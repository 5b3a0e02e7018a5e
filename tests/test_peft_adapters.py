"""fastalign/peft_adapters.py's toggle of the LoRA layers; its use by the KL's references is tested with them
(tests/unlearn/test_reference.py, tests/test_causal_lm_kl_div.py)."""
import pytest
import torch

from fastalign import peft_adapters
from fastalign.peft_adapters import lora_layers
from tests.interrupts import interrupted_at
from tests.unlearn.test_reference import lora_policy


def test_a_ctrl_c_anywhere_in_disabling_the_lora_layers_leaves_them_enabled_and_trained():
    """A Ctrl-C (KeyboardInterrupt raised at each line of the toggle's start in turn) while the adapter reference
    disabled the LoRA layers left those disabled so far disabled and frozen: the resumed unlearning run's optimizer
    got 12 of its 16 LoRA weights. The layers are enabled again, their adapters' gradients on."""
    policy = lora_policy()[0]
    layers = lora_layers(policy)
    trains = {name: p.requires_grad for name, p in policy.named_parameters()}
    code = peft_adapters._layers_off.__wrapped__.__code__
    with interrupted_at([code], 0) as seen, peft_adapters._layers_off(layers):
        lines = seen[0]
    assert lines >= 2 * len(layers)
    for line in range(1, lines + 1):
        with pytest.raises(KeyboardInterrupt), interrupted_at([code], line), peft_adapters._layers_off(layers):
            pass
        assert not any(layer.disable_adapters for layer in layers), line
        assert {name: p.requires_grad for name, p in policy.named_parameters()} == trains, line


@pytest.mark.parametrize("added", [dict(target_modules=["o_proj"]),
                                   dict(target_modules=["o_proj"], modules_to_save=["lm_head"])],
                         ids=["other-modules", "modules-to-save"])
def test_an_adapter_added_after_the_first_call_is_off_too(added):
    """The toggle found the LoRA layers at its first call and kept them: an adapter added since on other modules
    stayed on in the "reference" (the KL of CausalLMKLDiv(model, "adapter") 1.6e-5 where it was 0.0105), and one with
    a trained head copy kept it (0.0029 where 8.67). The adapters are looked up again when they change."""
    peft = pytest.importorskip("peft")
    policy = lora_policy()[0].eval()
    adapter_off = peft_adapters.AdapterOff(policy)
    ids = torch.randint(0, policy.config.vocab_size, (2, 7))
    with adapter_off():
        policy(input_ids=ids)
    policy.add_adapter("second", peft.LoraConfig(r=4, init_lora_weights=False, **added))
    policy.base_model.set_adapter(["default", "second"])
    if "modules_to_save" in added:
        with torch.no_grad():
            policy.base_model.model.lm_head.modules_to_save["second"].weight.mul_(3.0)
    with torch.no_grad():
        with policy.disable_adapter():
            expected = policy(input_ids=ids).logits
        assert not torch.allclose(policy(input_ids=ids).logits, expected)   # the adapters change the model
        with adapter_off():
            got = policy(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
