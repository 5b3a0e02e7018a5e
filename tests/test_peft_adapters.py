"""fastalign/peft_adapters.py's toggle of the LoRA layers; its use by the KL's references is tested with them
(tests/unlearn/test_reference.py, tests/test_causal_lm_kl_div.py)."""
import pytest

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
