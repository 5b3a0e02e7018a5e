"""Where a model computes: parameters on their devices, weights accelerate offloads on their hook's execution
device, weights on the meta device without a hook not loaded; and where its input ids go."""
import pytest
import torch

from fastalign.model_devices import (META, as_device, check_not_dispatched, compute_devices, input_device, model_device,
                                     warn_if_moved)
from tests.unlearn.tiny import byte_bpe_tokenizer, tiny_llama

accelerate = pytest.importorskip("accelerate")
CPU = torch.device("cpu")


def dispatched_to(module, device):
    """`module` given the hook a device_map gives a block it places on `device` (AlignDevicesHook: its inputs moved
    there at each forward). Not placing the block's weights (place_submodules=False, and a block holds none of its
    own): the CPU has no second device to put them on; the hook alone says where the block runs."""
    accelerate.hooks.add_hook_to_module(module, accelerate.hooks.AlignDevicesHook(execution_device=device))
    return module


def test_accelerates_device_names_as_devices():
    assert as_device("cpu") == CPU and as_device(torch.device("meta")) == META
    assert as_device(1) == torch.device(getattr(torch.accelerator.current_accelerator(), "type", "cuda"), 1)
    assert as_device("cuda:1") == torch.device("cuda", 1)


def test_an_accelerators_device_without_an_index_is_its_current_device(monkeypatch):
    """accelerate's one-process Accelerator.device is torch.device("cuda"): the trainer compares it with the hooks'
    cuda:0, cuda:1."""
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 1)
    assert as_device(torch.device("cuda")) == as_device("cuda:1") == torch.device("cuda", 1)
    assert as_device(0) == torch.device("cuda", 0) and as_device("cpu") == CPU


def test_an_index_is_a_device_of_the_current_accelerator(monkeypatch):
    """A device_map's ints, as accelerate's hooks hold them, on a machine whose accelerator is not CUDA."""
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("xpu"))
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    assert as_device(1) == torch.device("xpu", 1) and as_device("xpu") == torch.device("xpu", 0)


def test_the_models_own_weights_and_hooks_count_named_by_its_class():
    """The model is a module too: its own parameters and hooks compute somewhere, and it has no name of its own."""
    assert compute_devices(torch.nn.Linear(2, 2)) == {CPU: "Linear"}
    model = dispatched_to(tiny_llama(50), "cuda:1")
    assert compute_devices(model) == {torch.device("cuda", 1): "LlamaForCausalLM", CPU: "model.embed_tokens"}


def test_a_model_offloaded_by_accelerate_computes_on_its_hooks_device():
    model = tiny_llama(50)
    assert compute_devices(model) == {CPU: "model.embed_tokens"}
    accelerate.cpu_offload(model.model.embed_tokens, execution_device=CPU)
    assert model.model.embed_tokens.weight.is_meta
    assert model_device(model, "a test") == CPU and input_device(model, "a test") == CPU


def test_weights_on_the_meta_device_without_a_hook_are_not_loaded():
    model = tiny_llama(50)
    model.model.layers[1].mlp.to("meta")
    assert compute_devices(model) == {CPU: "model.embed_tokens", META: "model.layers.1.mlp.gate_proj"}
    with pytest.raises(ValueError, match=r"^model: its weights are not loaded \(model.layers.1.mlp.gate_proj has no "
                                         r"accelerate hook .* meta device\); load them onto a device before a test "):
        model_device(model, "a test")


def test_the_input_device_of_a_model_with_a_part_not_loaded_is_refused():
    """Only the input embeddings were checked: generation, the KL and the slow RAIN engine ran a model with a part on
    the meta device and no hook to load it, whose F.linear of a CPU input returned uninitialised memory (a different
    KL at every run); TreeRunner refused it. The argument is named (mean_token_kl's reference)."""
    model = tiny_llama(50)
    assert input_device(model, "a test") == CPU
    model.model.layers[1].mlp.down_proj.to("meta")
    with pytest.raises(ValueError, match=r"^reference: its weights are not loaded \(model.layers.1.mlp.down_proj "
                                         r"has no accelerate hook .* meta device\); load them onto a device before a "):
        input_device(model, "a test", "reference")
    model = tiny_llama(50)
    model.model.embed_tokens.to("meta")
    with pytest.raises(ValueError, match=r"^model: its weights are not loaded \(model.embed_tokens has"):
        input_device(model, "a test")


def test_a_model_dispatched_over_two_devices_is_named_on_both():
    model = tiny_llama(50)
    dispatched_to(model.model.layers[1], "cuda:1")
    assert compute_devices(model) == {CPU: "model.embed_tokens", torch.device("cuda", 1): "model.layers.1"}
    with pytest.raises(ValueError, match=r"^model: a test runs the whole model on one device, but it computes on cpu "
                                         r"\(model.embed_tokens\) and cuda:1 \(model.layers.1\)"):
        model_device(model, "a test")
    assert input_device(model, "a test") == CPU   # its embeddings run on the CPU


def test_the_input_device_of_a_lora_model_and_of_a_model_without_embeddings():
    peft = pytest.importorskip("peft")
    model = tiny_llama(50)
    accelerate.cpu_offload(model.model.embed_tokens, execution_device=CPU)
    # (not the embeddings: peft puts their adapter's weights on the meta device of their offloaded weight, unloaded)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert input_device(wrapped, "a test") == CPU
    assert input_device(torch.nn.Linear(2, 2), "a test") == CPU   # no input embeddings: where its first module computes
    assert input_device(accelerate.cpu_offload(torch.nn.Linear(2, 2), execution_device=CPU), "a test") == CPU
    with pytest.raises(ValueError, match="not loaded"):
        input_device(torch.nn.Linear(2, 2).to("meta"), "a test")


def test_the_input_device_of_a_model_that_does_not_name_its_input_embeddings():
    """transformers' get_input_embeddings raises NotImplementedError on a model that does not say which they are: its
    ids go where its first parameter is."""
    class Unnamed(torch.nn.Linear):
        def get_input_embeddings(self):
            raise NotImplementedError

    assert input_device(Unnamed(2, 2), "a test") == CPU


def test_the_input_device_is_the_embeddings_not_the_first_device_the_model_computes_on():
    """A hook on the model itself (a device_map's block around it) computes on cuda:1 and comes first among its
    devices: its ids still go where its input embeddings compute."""
    model = dispatched_to(tiny_llama(50), "cuda:1")
    assert input_device(model, "a test") == CPU


def test_the_input_device_of_a_model_without_embeddings_is_where_its_first_module_computes():
    """No input embeddings: the ids go where the model's first module computes (its hook's execution device, cuda:1
    here, its weight left on the CPU), not to the CPU by default."""
    block = dispatched_to(torch.nn.Sequential(torch.nn.Linear(2, 2)), "cuda:1")
    assert input_device(block, "a test") == torch.device("cuda", 1)


def test_hooks_on_the_accelerators_current_device_are_on_its_device(monkeypatch):
    """accelerate's one-process Accelerator.device is torch.device("cuda"), without an index: a model dispatched to
    the current device (cuda:1 here) is on it; another device is refused, naming the first module dispatched there."""
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 1)
    model = tiny_llama(len(byte_bpe_tokenizer()))
    for block in model.model.layers:
        dispatched_to(block, 1)
    check_not_dispatched(model, torch.device("cuda"))
    with pytest.raises(ValueError, match=r"^model: accelerate dispatched it to run on cuda:1 \(model.layers.0\) .*: "
                                         r"the trainer trains the whole model on the accelerator's device, cuda:0"):
        check_not_dispatched(model, torch.device("cuda", 0))


def test_weights_on_another_device_of_the_accelerators_kind_are_moved_with_a_warning(monkeypatch, recwarn):
    """The one-process Accelerator.device is the current CUDA device: a model the user put on cuda:1 while cuda:0 is
    current trains on cuda:0, which the trainer says (device objects stand in for a model's: no GPU here)."""
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    with pytest.warns(UserWarning, match=r"^model: its weights are on cuda:1; the trainer trains on the accelerator's "
                                         r"device, cuda:0, and moves them there. To train on cuda:1, .*set_device"):
        warn_if_moved({torch.device("cuda", 1)}, torch.device("cuda"))
    for same_or_other_kind in ({torch.device("cuda", 0)}, {torch.device("cpu")}):   # nothing moves between GPUs
        warn_if_moved(same_or_other_kind, torch.device("cuda"))
    assert not recwarn.list


def test_the_cpu_is_one_device_whatever_its_index(recwarn):
    """accelerate's Accelerator.device under a launcher is cpu:0: every process warned that the model's cpu weights
    would be moved there (advising torch.cuda.set_device('cpu')), and a model dispatched to the cpu was refused as
    dispatched elsewhere."""
    assert as_device("cpu:0") == as_device(torch.device("cpu", 3)) == CPU
    warn_if_moved({CPU}, torch.device("cpu", 0))
    assert not recwarn.list
    check_not_dispatched(dispatched_to(tiny_llama(37), "cpu"), torch.device("cpu", 0))


def test_the_advice_to_train_where_the_weights_are_names_the_accelerators_call(monkeypatch):
    """The warning told an XPU user to call torch.cuda.set_device."""
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("xpu"))
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    with pytest.warns(UserWarning, match=r"To train on xpu:1, make it the current device "
                                         r"\(torch.accelerator.set_device_index\(1\)\), before making the trainer"):
        warn_if_moved({torch.device("xpu", 1)}, torch.device("xpu"))
