"""The reference sources of fastalign/unlearn/reference.py beyond those tested with the objective."""
import pytest
import torch

from fastalign.unlearn.reference import AdapterDisabledReference
from tests.unlearn.tiny import byte_bpe_tokenizer, tiny_llama, tiny_streams


@pytest.mark.parametrize("config", [dict(), dict(bias="lora_only"), dict(modules_to_save=["lm_head"])],
                         ids=["lora", "lora-bias", "modules-to-save"])
def test_the_adapter_reference_toggles_the_lora_layers_without_walking_the_model(config, monkeypatch):
    """PeftModel.disable_adapter walks every module twice a call (47,844 Python calls a step at Llama-3.2-1B with
    LoRA): for plain LoRA the reference toggles the LoRA layers it found once instead, with the same hidden states
    and the same requires_grad after; a LoRA with bias terms or modules_to_save keeps PEFT's (its warning, its
    wrappers). The adapter takes part in the policy's forward again after each call."""
    peft = pytest.importorskip("peft")
    tokenizer = byte_bpe_tokenizer()
    policy = peft.get_peft_model(tiny_llama(len(tokenizer)), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **config)).train()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_()   # B starts at zero: an adapter that changes the model
    batch = tiny_streams(tokenizer).batch(0)
    first = batch.num_forget + batch.num_mismatch
    normal = batch.tokens.rows(first, first + batch.num_normal)
    reference = AdapterDisabledReference(policy)
    trains = {name: p.requires_grad for name, p in policy.named_parameters()}
    with policy.disable_adapter(), torch.no_grad():
        expected = reference(normal, batch.normal_index, None)[0]
    with torch.no_grad():
        adapted = policy(normal.input_ids).logits
    walks = []
    disable_adapter = type(policy).disable_adapter
    monkeypatch.setattr(type(policy), "disable_adapter", lambda model: walks.append(1) or disable_adapter(model))
    for _ in range(2):
        torch.testing.assert_close(reference(normal, batch.normal_index, None)[0], expected, rtol=0, atol=0)
        assert {name: p.requires_grad for name, p in policy.named_parameters()} == trains
        with torch.no_grad():
            torch.testing.assert_close(policy(normal.input_ids).logits, adapted, rtol=0, atol=0)
    assert len(walks) == (0 if not config else 2)
