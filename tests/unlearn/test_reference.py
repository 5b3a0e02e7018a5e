"""The reference sources of fastalign/unlearn/reference.py beyond those tested with the objective."""
import warnings

import pytest
import torch

from fastalign import peft_adapters
from fastalign.peft_adapters import lora_layers
from fastalign.unlearn import reference as reference_module
from fastalign.unlearn.reference import AdapterDisabledReference
from tests.unlearn.tiny import byte_bpe_tokenizer, tiny_llama, tiny_streams


def lora_policy(**config):
    """A tiny Llama with LoRA (`config`) on q_proj and v_proj, in train mode; a batch's normal rows and their index."""
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
    return policy, batch.tokens.rows(first, first + batch.num_normal), batch.normal_index


@pytest.mark.parametrize("config", [dict(), dict(bias="lora_only"), dict(modules_to_save=["lm_head"])],
                         ids=["lora", "lora-bias", "modules-to-save"])
def test_the_adapter_reference_toggles_the_lora_layers_without_walking_the_model(config, monkeypatch):
    """PeftModel.disable_adapter walks every module twice a call (47,844 Python calls a step at Llama-3.2-1B with
    LoRA): for plain LoRA the reference toggles the LoRA layers it found once instead, with the same hidden states
    and the same requires_grad after; a LoRA with bias terms or modules_to_save keeps PEFT's (its warning, its
    wrappers). The adapter takes part in the policy's forward again after each call."""
    policy, normal, normal_index = lora_policy(**config)
    found = []
    monkeypatch.setattr(peft_adapters, "lora_layers", lambda model: found.append(1) or lora_layers(model))
    reference = AdapterDisabledReference(policy)
    trains = {name: p.requires_grad for name, p in policy.named_parameters()}
    with policy.disable_adapter(), torch.no_grad():
        expected = reference(normal, normal_index, None)[0]
    with torch.no_grad():
        adapted = policy(normal.input_ids).logits
    walks = []
    disable_adapter = type(policy).disable_adapter
    monkeypatch.setattr(type(policy), "disable_adapter", lambda model: walks.append(1) or disable_adapter(model))
    for _ in range(2):
        torch.testing.assert_close(reference(normal, normal_index, None)[0], expected, rtol=0, atol=0)
        assert {name: p.requires_grad for name, p in policy.named_parameters()} == trains
        with torch.no_grad():
            torch.testing.assert_close(policy(normal.input_ids).logits, adapted, rtol=0, atol=0)
    assert len(walks) == (0 if not config else 2)
    assert len(found) == 1   # the layers are found at the first call only, not by a walk of the model each step


@pytest.mark.parametrize("disabled", ["all", "first"])
def test_lora_layers_disabled_before_a_reference_call_are_as_peft_leaves_them(disabled):
    """LoRA layers the user disabled before a reference call are left as PEFT's disable_adapter leaves them, their
    gradients too: all disabled stay disabled (not trained again); some disabled take PEFT's own path, its warning,
    then every layer enabled (a toggle would leave them all disabled: the policy its own reference for good)."""
    policy, normal, normal_index = lora_policy()
    layers = lora_layers(policy)
    chosen = layers if disabled == "all" else layers[:1]

    def after(call):
        """The layers' state and requires_grad after `call` from the chosen layers disabled, and PEFT's warnings."""
        for layer in layers:
            layer.enable_adapters(layer not in chosen)
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            call()
        trains = {name: p.requires_grad for name, p in policy.named_parameters()}
        return ([layer.disable_adapters for layer in layers], trains,
                [str(w.message) for w in warned if "adapter layers" in str(w.message)])

    def peft_own():
        with policy.disable_adapter():
            pass
    expected = after(peft_own)
    assert expected[0] == [disabled == "all"] * len(layers) and bool(expected[2]) == (disabled == "first")
    assert after(lambda: AdapterDisabledReference(policy)(normal, normal_index, None)) == expected


def cached_policy():
    """A tiny Llama with a frozen lm_head, its CachedReference's objective and a batch."""
    from fastalign.unlearn.objective import UnlearningObjective
    tokenizer = byte_bpe_tokenizer()
    streams = tiny_streams(tokenizer)
    model = tiny_llama(len(tokenizer))
    model.lm_head.requires_grad_(False)
    reference = reference_module.CachedReference(model, streams.normal, batch_size=2)
    return model, UnlearningObjective(model, reference=reference), streams.batch(0)


def test_the_cached_reference_fingerprints_the_lm_head_once_while_it_is_the_same_unwritten_tensor():
    """The fingerprint read the whole [V, H] weight and waited for the device at every step (525 MB and a sync at
    Llama-3.2-1B): after the first step, a step of the same unwritten weight skips it, one sync fewer."""
    from tests.sync_counter import SyncCounter
    model, objective, batch = cached_policy()
    counts = []
    with SyncCounter(model) as counter:
        on_device = batch.to(torch.device("cpu"))
        for _ in range(3):
            counter.reset()
            objective(on_device).total.backward()
            counts.append(dict(counter.by_file()))
    fingerprint = "_local_scalar_dense.default @ fastalign/unlearn/reference.py"
    assert counts[0].pop(fingerprint) == 1 and counts[1] == counts[2] == counts[0], counts


def same_values_other_memory(p):
    p.data = p.data.clone()


def copied_in_place(p):
    with torch.no_grad():
        p.copy_(p * 1.01)


def data_replaced(p):
    p.data = p.data * 1.01


def optimizer_step(p):
    p.grad = torch.ones_like(p)
    torch.optim.SGD([p], lr=0.1).step()


def state_dict_loaded(p):
    head = torch.nn.Linear(p.shape[1], p.shape[0], bias=False)
    head.weight = p
    head.load_state_dict({"weight": p * 1.01})


@pytest.mark.parametrize("write, refused", [(same_values_other_memory, False), (copied_in_place, True),
                                            (data_replaced, True), (optimizer_step, True),
                                            (state_dict_loaded, True)],
                         ids=["same-values", "copy_", "data-replaced", "optimizer-step", "load_state_dict"])
def test_the_cached_reference_refuses_a_head_written_after_a_step_that_skipped_the_fingerprint(write, refused):
    """After steps that skip the fingerprint, a write that bumps the weight's version (an in-place copy_, an
    optimizer's step, load_state_dict's copy_) or gives it other memory (`.data` replaced) fingerprints it again:
    the changed head is refused by name, one with the same values accepted."""
    model, objective, batch = cached_policy()
    for _ in range(2):
        objective(batch)
    write(model.lm_head.weight)
    if refused:
        with pytest.raises(RuntimeError, match="the lm_head weight was modified after the reference was cached"):
            objective(batch)
    else:
        objective(batch)


@pytest.fixture
def one_process_group():
    """A gloo group of one process, as a process under accelerate/FSDP is in; destroyed after the test."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("this torch has no gloo backend")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_the_cached_reference_fingerprints_the_lm_head_at_every_step_in_a_process_group(one_process_group):
    """FSDP's all-gathers write the kept head without bumping its version counter, so a process in a distributed
    group fingerprints at every step: a head changed by such a write (here through a `.data` alias) is refused."""
    model, objective, batch = cached_policy()
    for _ in range(2):
        objective(batch)
    model.lm_head.weight.data.mul_(1.01)
    with pytest.raises(RuntimeError, match="the lm_head weight was modified after the reference was cached"):
        objective(batch)
