"""Where a Hugging Face model computes: the devices of its weights, as accelerate's hooks place them.

A parameter computes on its own device, except one that accelerate offloads (a device_map with "cpu" or "disk"
next to a GPU, cpu_offload): it waits on the meta device, and the hook of its module brings it to the hook's
execution device at each forward. A module that a device_map dispatches also moves its inputs to its hook's
execution device. A parameter on the meta device whose module has no hook loading it is not loaded at all: a forward
fails on it, or (F.linear on a CPU input) silently returns uninitialised memory.
"""
import warnings

import torch

from fastalign.base_model import base_causal_lm

META = torch.device("meta")
CPU = torch.device("cpu")
# where a parameter on the meta device comes from, as the refusals of one there say
ON_META = ("on the meta device (offloaded by accelerate, a device_map with 'cpu' or 'disk' or cpu_offload, or not "
           "loaded)")


def as_device(device) -> torch.device:
    """`device` (an int, a string or a torch.device, as accelerate's hooks and Accelerator.device hold them) as a
    torch.device with its index: an int is an index of the current accelerator (CUDA where there is none), and an
    accelerator's device without an index ("cuda") names its current device, as a tensor sent there finds. The CPU
    is one device, without an index, as its tensors name it: accelerate's Accelerator.device under a launcher is
    cpu:0, which compared unequal to the weights' cpu."""
    accelerator = torch.accelerator.current_accelerator()
    if isinstance(device, int):
        device = torch.device(accelerator.type if accelerator is not None else "cuda", device)
    device = torch.device(device)
    if device.type == "cpu":
        return CPU
    if device.index is None and accelerator is not None and device.type == accelerator.type:
        device = torch.device(device.type, torch.accelerator.current_device_index())
    return device


def hook_devices(module: torch.nn.Module) -> list[tuple[torch.device, bool]]:
    """(execution device, whether it loads offloaded weights) of each accelerate hook on `module` itself."""
    hook = getattr(module, "_hf_hook", None)
    hooks = [] if hook is None else getattr(hook, "hooks", [hook])   # a SequentialHook chains several
    return [(as_device(h.execution_device), bool(getattr(h, "offload", False))) for h in hooks
            if getattr(h, "execution_device", None) is not None]


def module_devices(module: torch.nn.Module) -> list[torch.device]:
    """The devices `module`'s own hooks and parameters (not its submodules') compute on; meta for a parameter not
    loaded."""
    hooks = hook_devices(module)
    loads = next((device for device, offload in hooks if offload), None)
    return [device for device, _ in hooks] + [loads if p.is_meta and loads is not None else p.device
                                              for p in module.parameters(recurse=False)]


def compute_devices(model: torch.nn.Module) -> dict[torch.device, str]:
    """{device: the first module computing on it} over every module of `model`, meta for weights not loaded."""
    found = {}
    for name, module in model.named_modules():
        for device in module_devices(module):
            found.setdefault(device, name or type(model).__name__)
    return found


def loaded_devices(model: torch.nn.Module, user: str, name: str = "model") -> dict[torch.device, str]:
    """compute_devices of `model` (the argument `name`), for `user`, which runs the whole model: ValueError when some
    of its weights are not loaded, whose forward fails or (F.linear on a CPU input) returns uninitialised memory."""
    found = compute_devices(model)
    if META in found:
        raise ValueError(f"{name}: its weights are not loaded ({found[META]} has no accelerate hook to load its "
                         f"parameters, which are on the meta device); load them onto a device before {user} uses it")
    return found


def model_device(model: torch.nn.Module, user: str) -> torch.device | None:
    """The one device `model` computes on (None: it has no parameters), for `user` (e.g. "a TreeRunner"), which runs
    the whole model there: ValueError naming the model when its weights are not loaded or it computes on several
    devices (a device_map over several GPUs, a part moved by hand)."""
    found = loaded_devices(model, user)
    if len(found) > 1:
        where = " and ".join(f"{device} ({name})" for device, name in found.items())
        raise ValueError(f"model: {user} runs the whole model on one device, but it computes on {where} (a "
                         "device_map over several devices?); load the model onto one device")
    return next(iter(found), None)


def check_head_loaded(lm_head: torch.nn.Module, whose: str) -> None:
    """ValueError where the lm_head of `whose` ("model", "reference") has its weight on the meta device: the fused
    losses read the weight itself and never run the lm_head, whose accelerate hook loads an offloaded weight only when
    the lm_head runs."""
    if lm_head.weight.is_meta:
        raise ValueError(f"the {whose}'s lm_head weight is {ON_META}: the fused losses read it directly, not through "
                         "the lm_head's forward, whose accelerate hook would load an offloaded one; load the lm_head "
                         "onto a device (a device_map that does not offload it)")


def input_device(model: torch.nn.Module, user: str, name: str = "model") -> torch.device:
    """The device the input ids of `model` (the argument `name`), which `user` runs whole, go to: where its input
    embeddings compute (for embeddings that accelerate offloads, their hook's execution device, not the meta device
    their weight waits on), else where its first module computes. ValueError when some of its weights are not
    loaded (loaded_devices)."""
    found = loaded_devices(model, user, name)
    try:   # transformers' get_input_embeddings raises NotImplementedError on a model that does not say which
        embeddings = base_causal_lm(model).get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embeddings = None
    modules = embeddings.modules() if isinstance(embeddings, torch.nn.Module) else iter(())
    return next((d for m in modules for d in module_devices(m)), next(iter(found), torch.device("cpu")))


def check_not_dispatched(model, device) -> None:
    """Raises where accelerate's hooks (a device_map over several devices) would move a module's inputs off the
    accelerator's `device`: the trainer moves every weight there (model.to), and the hooks would go on moving the
    activations to the devices the device_map named, failing the first forward deep inside torch ("Expected all
    tensors to be on the same device")."""
    device, elsewhere = as_device(device), {}
    for name, module in model.named_modules():
        for hooked, _ in hook_devices(module):
            if hooked != device:
                elsewhere.setdefault(hooked, name or type(model).__name__)
    if elsewhere:
        where = " and ".join(f"{d} ({name})" for d, name in elsewhere.items())
        raise ValueError(f"model: accelerate dispatched it to run on {where} (a device_map over several devices?): the "
                         f"trainer trains the whole model on the accelerator's device, {device}; load the model "
                         "without a device_map, or with every module on that device")


def warn_if_moved(devices, device) -> None:
    """Warns when weights on one accelerator (`devices`, where they are) will train on another of its kind, the
    accelerator's `device`, where the trainer moves them: a model put on cuda:1 in a process whose current device is
    cuda:0 (accelerate's device without an index is the current one) trains on cuda:0, beside whatever runs there."""
    device = as_device(device)
    moved = sorted({d for d in devices if d.type == device.type and d != device}, key=str)
    if moved:
        visible = " or launch with CUDA_VISIBLE_DEVICES" if device.type == "cuda" else ""
        warnings.warn(f"model: its weights are on {', '.join(map(str, moved))}; the trainer trains on the "
                      f"accelerator's device, {device}, and moves them there. To train on {moved[0]}, make it the "
                      f"current device (torch.accelerator.set_device_index({moved[0].index})){visible}, before "
                      "making the trainer", stacklevel=3)
