"""What changes when DDP or FSDP (1 or 2) wraps the unlearning objective: the lm_head weight the fused
losses read, and full (unsharded) state dicts for checkpoints and the saved model.

The fused losses read `lm_head.weight` directly instead of calling the lm_head, so FSDP's hooks around the
lm_head's own forward never run. Inside the objective's forward that is harmless while the lm_head belongs
to the objective's (root) FSDP unit: the root's parameters are gathered for the whole forward. When an
auto-wrap policy gave the lm_head a unit of its own (e.g. a size-based policy on a large vocabulary),
`head_weight` gathers it explicitly; FSDP2's end-of-backward callback then reduce-scatters its gradient and
reshards it like any other unit whose forward did not run.

FSDP1 without use_orig_params flattens each unit's weights into one parameter, all trainable or all frozen:
`check_flat_units` names the settings where a unit would mix them (the cached reference's frozen lm_head beside the
trainable embeddings or final norm, LoRA's frozen base weights beside its adapters).

State dicts go through torch.distributed.checkpoint's helpers, which treat a plain module, DDP, FSDP1 and
FSDP2 alike: full tensors of the trainable parameters and their optimizer state, on CPU.
"""
from __future__ import annotations

import torch

from fastalign.base_model import base_causal_lm
from fastalign.model_devices import check_head_loaded

# torch.distributed's FSDP, DTensor and checkpoint modules take about a second to import: they are imported
# where used, so that importing fastalign stays quick.


def head_weight(lm_head: torch.nn.Module, whose: str = "model") -> torch.Tensor:
    """The lm_head's full weight, to be read inside the objective's forward (gathered if FSDP sharded it); ValueError
    where it is on the meta device (check_head_loaded, naming the lm_head as `whose`: "model" or "reference")."""
    check_head_loaded(lm_head, whose)
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if isinstance(lm_head, FSDPModule):
        lm_head.unshard()
    elif isinstance(lm_head, FullyShardedDataParallel):
        raise NotImplementedError("the lm_head is wrapped in an FSDP (version 1) unit of its own, whose weight the "
                                  "fused losses cannot gather; keep it in the root unit (transformer-based "
                                  "auto wrap) or use FSDP version 2")
    weight = lm_head.weight
    if isinstance(weight, DTensor):
        raise RuntimeError("the lm_head weight is still sharded (a DTensor) inside the objective's forward: the "
                           "objective must be the module that FSDP wraps (it is, when the trainer prepares it)")
    return weight


def check_flat_units(model: torch.nn.Module, plugin) -> None:
    """Raises where FSDP version 1 without use_orig_params cannot flatten a unit: it makes one parameter of a unit's
    weights, all trainable or all frozen. The units are those the plugin's auto-wrap policy makes of `model`; the
    root unit holds what no other unit took. The cached reference freezes the lm_head, which the root unit holds
    beside the input embeddings and the final norm (a tied lm_head is the embeddings: the norm still trains); LoRA
    freezes the base weights beside its adapters. FSDP's own error named no setting."""
    if plugin is None or plugin.fsdp_version != 1 or plugin.use_orig_params:
        return
    base = base_causal_lm(model)
    names = {}
    for name, parameter in base.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    for unit, parameters in _flat_units(base, plugin):
        frozen = [p for p in parameters if not p.requires_grad]
        trainable = [p for p in parameters if p.requires_grad]
        if frozen and trainable:
            lm_head = base.get_output_embeddings().weight
            first_frozen = lm_head if any(p is lm_head for p in frozen) else frozen[0]
            raise ValueError(
                f"FSDP version 1 without use_orig_params flattens the weights of each unit into one parameter, all "
                f"trainable or all frozen, but {unit} holds the frozen {' = '.join(names[id(first_frozen)])} beside "
                f"the trainable {' = '.join(names[id(trainable[0])])} (reference='cached' freezes the lm_head, LoRA "
                "the base weights): set use_orig_params (accelerate launch --fsdp_use_orig_params true, "
                "fsdp_use_orig_params: true in accelerate's config), use FSDP version 2, or, for a frozen lm_head, "
                "choose reference='copy' (--reference copy)")


def _flat_units(model: torch.nn.Module, plugin) -> list[tuple[str, list[torch.nn.Parameter]]]:
    """[(unit, its parameters)] of the FSDP1 units that the plugin's auto-wrap policy makes of `model`, innermost
    first and the root unit last, chosen as torch's recursive auto wrap chooses them: a module becomes a unit when
    the policy recurses into it and then wraps what its children's units left of it. A parameter shared by two
    units belongs to the first."""
    import copy
    resolved = copy.copy(plugin)
    resolved.set_auto_wrap_policy(model)   # accelerate's policy for this model (its layer classes, its sizes)
    policy, wrapped = resolved.auto_wrap_policy, []

    def visit(module, name, root):
        numel = sum(p.numel() for p in module.parameters())
        if not policy(module=module, recurse=True, nonwrapped_numel=numel):
            return 0
        taken = sum(visit(child, f"{name}.{child_name}".lstrip("."), False)
                    for child_name, child in module.named_children())
        if not root and policy(module=module, recurse=False, nonwrapped_numel=numel - taken):
            wrapped.append((f"unit {name}", module))
            return numel
        return taken

    if policy is not None:
        visit(model, "", True)
    seen, units = set(), []
    for unit, module in wrapped + [("the root unit", model)]:
        parameters = [p for p in module.parameters() if id(p) not in seen]
        seen.update(map(id, parameters))
        units.append((unit, parameters))
    return units


def _options(**options):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(**options)


def _full(model: torch.nn.Module, **options):
    """Full tensors, moved to the CPU of process 0 only, unless the model already lives on the CPU (where
    that move is moot, and FSDP1's version of it crashes: every process then gets the full tensors)."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    return _options(full_state_dict=True, cpu_offload=not on_cpu, **options)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full tensors of the trainable parameters of a (wrapped) model, on the CPU of process 0 (other
    processes may get an empty dict). Collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=_full(model, ignore_frozen_params=True))


def trainable_names(model: torch.nn.Module) -> set[str]:
    """Names of the trainable parameters of a (wrapped) model, as the state dicts above spell them."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return set(get_model_state_dict(model, options=_options(ignore_frozen_params=True)))


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full state dict of a (wrapped) model, on the CPU of process 0 (maybe empty elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=_full(model))


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Full optimizer state keyed by parameter name, on the CPU of process 0 (maybe empty elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=_full(model))


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads full tensors of (at least) every trainable parameter; each process reads the whole `state`, which is
    left as it was (torch's loader adds the model's missing weights to the dict it is given: it gets a copy)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    set_model_state_dict(model, dict(state), options=_options(full_state_dict=True, strict=False))


def check_trainable_names(model: torch.nn.Module, names, whose: str) -> None:
    """A ValueError naming them where `names` are not the trainable parameters of `model` (as the state dicts above
    spell them): `whose` (" lacks trainable parameter(s) ...") says what holds them."""
    own, names = trainable_names(model), set(names)
    missing, extra = sorted(own - names), sorted(names - own)
    if missing or extra:
        parts = ([f"lacks trainable parameter(s) {missing[:5]}"] if missing else []) + (
            [f"holds parameter(s) {extra[:5]} that the model does not train"] if extra else [])
        raise ValueError(f"{whose} {' and '.join(parts)}")


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of optimizer_state, into an optimizer over the trainable parameters of `model`; each process reads the
    whole `state`. A ValueError naming them where the state's parameters are others: torch's loader loads those in
    common and silently leaves the rest out (a resume whose optimizer had 12 of the 16 weights its checkpoint
    trained)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    saved = [name for group in state["param_groups"] for name in group["params"]]
    check_trainable_names(model, saved, "the optimizer state")
    set_optimizer_state_dict(model, optimizer, state, options=_options(full_state_dict=True))
