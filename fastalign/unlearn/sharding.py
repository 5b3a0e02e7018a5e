"""What changes when DDP or FSDP (1 or 2) wraps the unlearning objective: the lm_head weight the fused
losses read, and full (unsharded) state dicts for checkpoints and the saved model.

The fused losses read `lm_head.weight` directly instead of calling the lm_head, so FSDP's hooks around the
lm_head's own forward never run. Inside the objective's forward that is harmless while the lm_head belongs
to the objective's (root) FSDP unit: the root's parameters are gathered for the whole forward. When an
auto-wrap policy gave the lm_head a unit of its own (e.g. a size-based policy on a large vocabulary),
`head_weight` gathers it explicitly; FSDP2's end-of-backward callback then reduce-scatters its gradient and
reshards it like any other unit whose forward did not run.

FSDP1 without use_orig_params flattens each unit's weights into one parameter, all trainable or all frozen:
`check_flat_root_unit` names the settings where the cached reference's frozen lm_head would share the root unit
with trainable embeddings.

State dicts go through torch.distributed.checkpoint's helpers, which treat a plain module, DDP, FSDP1 and
FSDP2 alike: full tensors of the trainable parameters and their optimizer state, on CPU.
"""
from __future__ import annotations

import torch

from fastalign.unlearn.models import base_causal_lm

# torch.distributed's FSDP, DTensor and checkpoint modules take about a second to import: they are imported
# where used, so that importing fastalign stays quick.


def head_weight(lm_head: torch.nn.Module) -> torch.Tensor:
    """The lm_head's full weight, to be read inside the objective's forward (gathered if FSDP sharded it)."""
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


def check_flat_root_unit(model: torch.nn.Module, plugin) -> None:
    """Raises where FSDP version 1 without use_orig_params cannot flatten the root unit: it makes one parameter of
    a unit's weights, all trainable or all frozen, and the root unit holds the lm_head beside the input embeddings,
    which the cached reference leaves trainable while it freezes the lm_head. FSDP's own error named no setting."""
    if plugin is None or plugin.fsdp_version != 1 or plugin.use_orig_params:
        return
    base = base_causal_lm(model)
    lm_head, embeddings = base.get_output_embeddings(), base.get_input_embeddings()
    if lm_head.weight.requires_grad or not any(p.requires_grad for p in embeddings.parameters()):
        return
    raise ValueError("FSDP version 1 without use_orig_params flattens the weights of each unit into one parameter, "
                     "all trainable or all frozen, but its root unit holds the frozen lm_head.weight "
                     "(reference='cached' freezes it) beside the trainable input embeddings: set use_orig_params "
                     "(accelerate launch --fsdp_use_orig_params true, fsdp_use_orig_params: true in accelerate's "
                     "config), use FSDP version 2, or choose reference='copy' (--reference copy)")


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
    """Loads full tensors of (at least) every trainable parameter; each process reads the whole `state`."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    set_model_state_dict(model, state, options=_options(full_state_dict=True, strict=False))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of optimizer_state; each process reads the whole `state`."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=_options(full_state_dict=True))
