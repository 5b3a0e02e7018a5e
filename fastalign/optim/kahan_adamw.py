"""fastalign.KahanAdamW: AdamW (decoupled weight decay, as torch.optim.AdamW) for bf16 weights whose updates are not
rounded away.

Trained in bf16, a weight keeps 8 significant bits: an update below half its last place (lr 2e-6 against a weight of
0.02 is a sixtieth of it) leaves it as it was, so a plain bf16 AdamW at a fine-tuning learning rate barely moves the
model (after 300 such steps, torch's had lost 98.8% of the movement of AdamW in float64: bench_optimizer.py). Kahan
summation keeps, beside each bf16 weight, a bf16 compensation: what the last rounding of the weight lost, added to
the next update before rounding. The weight then moves as soon as its updates add up to a last place, and weight +
compensation follows the fp32 sum of the updates. It costs 2 bytes a weight more than torch's AdamW on bf16 weights
(whose moments are bf16 too, as here): 8 bytes a weight, against 12 for fp32 weights with fp32 moments (what mixed
precision keeps).

fp32 parameters are stepped as AdamW without compensation (they need none); other dtypes are refused. One kernel a
parameter on CUDA (fastalign.kernels.kahan_adamw), torch operations elsewhere (fastalign.ops.torch_chunked), to the
same bits. Parameters sharded by FSDP2 (DTensors) are stepped shard by shard: AdamW is elementwise.
"""
import functools
import math
from collections.abc import Callable
from typing import Any, overload

import torch
from torch.optim.optimizer import ParamsT

from fastalign.ops.backend import (Backend, check_backend, graph_break, is_triton, refuse_fake_tensors_on_triton,
                                   select_backend)
from fastalign.ops.checks import is_real

COMPENSATED_DTYPES = (torch.bfloat16,)
STEPPED_DTYPES = (torch.bfloat16, torch.float32)
# options of torch's Adam and AdamW that this step does not have, with the value it computes as
_TORCH_OPTIONS = {"amsgrad": False, "maximize": False, "decoupled_weight_decay": True}
# how torch's AdamW runs its step, not what it computes: a loaded state's values of these are not this optimizer's
_EXECUTION_OPTIONS = ("foreach", "fused", "capturable", "differentiable")
_OWN_OPTIONS = ("lr", "betas", "eps", "weight_decay")


@functools.lru_cache(maxsize=None)
def _torch_adamw_options():
    """The options beyond lr, betas, eps and weight_decay that the installed torch's AdamW records in each parameter
    group, at their defaults (amsgrad, maximize, foreach, fused, ...). A KahanAdamW group records them too, so that
    the state dicts of the two share one layout: torch.distributed.checkpoint maps a loaded state onto the keys of the
    optimizer's own, and failed on the keys of torch's AdamW that a KahanAdamW group lacked."""
    defaults = torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults
    return tuple((k, v) for k, v in defaults.items() if k not in _OWN_OPTIONS)


def step_scalars(*, lr, beta1, beta2, eps, weight_decay, step):
    """The scalars of step number `step` (1 for the first) that both implementations take, computed on the host in
    double precision (each then rounded once to fp32)."""
    return dict(beta1=beta1, one_minus_beta1=1.0 - beta1, beta2=beta2, one_minus_beta2=1.0 - beta2, eps=eps,
                decay=lr * weight_decay, step_size=lr / (1.0 - beta1 ** step),
                bias_correction2_sqrt=math.sqrt(1.0 - beta2 ** step))


def _check_torch_options(group, where):
    """A ValueError naming `where` when the param group sets an option of torch's Adam / AdamW (amsgrad, maximize,
    Adam's coupled weight decay) to a value this step does not compute, which it would otherwise ignore."""
    for option, value in _TORCH_OPTIONS.items():
        if group.get(option, value) != value:
            raise ValueError(f"{where} has {option}={group[option]!r}, which KahanAdamW does not step as (it steps "
                             f"AdamW with {option}={value!r})")


def _is_scalar(value):
    """Whether `value` is a real number (numpy's too, not a bool) or a one-element tensor, as torch's AdamW takes lr
    and betas."""
    return is_real(value) or torch.is_tensor(value) and value.numel() == 1


def _check_hyperparameters(group, prefix):
    """A ValueError, its message starting with `prefix`, for the lr, betas, eps or weight_decay in `group` (the
    constructor's, or a param group's own) that AdamW cannot step with: betas (0.9, 1.0) made every weight NaN, as
    lr=nan did (each bound is checked so that NaN fails it, as torch's AdamW checks them)."""
    lr, betas = group.get("lr", 0.0), group.get("betas", (0.0, 0.0))
    if not (_is_scalar(lr) and float(lr) >= 0):
        raise ValueError(f"{prefix}lr: expected a float >= 0 (or a one-element tensor), got {lr!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(_is_scalar(b) and 0 <= float(b) < 1 for b in betas)):
        raise ValueError(f"{prefix}betas: expected two floats in [0, 1) (or one-element tensors), got {betas!r}")
    for name in ("eps", "weight_decay"):
        value = group.get(name, 0.0)
        if not (is_real(value) and value >= 0):
            raise ValueError(f"{prefix}{name}: expected a float >= 0, got {value!r}")


def _check_dtype(p, where):
    """A ValueError naming `where` for a parameter of a dtype other than bfloat16 and float32, which this step does
    not take."""
    if p.dtype not in STEPPED_DTYPES:
        raise ValueError(f"{where} is {p.dtype}; expected bfloat16 or float32 (train float16 weights in bfloat16 or "
                         "float32: AdamW's second moment underflows in float16)")


def _local(tensor):
    """The tensor itself, or the local shard of a DTensor (a parameter FSDP2 shards, its gradient and its state)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


@graph_break("KahanAdamW's step on the Triton backend", "its kernel launch")
def _step_outside_graphs(launcher, *operands, **scalars):
    """launcher.step of a Triton launcher outside a compiled caller's graphs (one graph break a parameter, as the
    torch step and the fused ops' Triton paths take): torch.compile(optimizer.step) traced into the kernel launch, and
    failed under Triton's interpreter (a KeyError on a uint64 fake tensor)."""
    launcher.step(*operands, **scalars)


class KahanAdamW(torch.optim.Optimizer):
    """AdamW over `params` with Kahan-compensated bf16 weights (see the module's docstring); the arguments are
    torch.optim.AdamW's (its options other than lr, betas, eps and weight_decay only at their defaults). State of each
    parameter: "step", "exp_avg" and "exp_avg_sq" (in the parameter's dtype, as torch's AdamW keeps them, so that
    torch's AdamW state loads here) and, for a bf16 parameter, "compensation" (zeros where a loaded state has none).
    backend: "auto" (the Triton kernel on CUDA, torch elsewhere), "triton" or "torch". Under torch.compile (of the
    step), the torch backend's step of each parameter runs outside the graph (fastalign.ops.torch_chunked.kahan_adamw:
    inductor would drop the compensation), to the eager step's bits."""

    def __init__(self, params: ParamsT, lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, backend: Backend = "auto"):
        # torch's AdamW's other options, taken at their defaults (code written for AdamW passes them): amsgrad and
        # maximize change the step, which computes neither; the rest say how torch runs its step, not this one's
        _check_torch_options(dict(amsgrad=amsgrad, maximize=maximize), "KahanAdamW")
        for name, value in (("foreach", foreach), ("capturable", capturable), ("differentiable", differentiable),
                            ("fused", fused)):
            if value:
                raise ValueError(f"KahanAdamW: {name}={value!r} chooses how torch's AdamW runs its step; KahanAdamW "
                                 "runs its own (one kernel a parameter on CUDA, torch operations elsewhere: backend=)")
        _check_hyperparameters(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), "")
        check_backend(backend)
        self.backend = backend
        super().__init__(params, dict(_torch_adamw_options(), lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))

    def __getstate__(self):
        """torch's (defaults, state and param_groups) and the backend: a copy (copy.deepcopy, pickle, torch.save)
        lacked it, and its step raised AttributeError."""
        return {**super().__getstate__(), "backend": self.backend}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's add_param_group, refusing parameters of a dtype other than bfloat16 and float32, and options of
        torch's AdamW that this step does not have (amsgrad=True, maximize=True)."""
        if isinstance(param_group, dict):
            _check_torch_options(param_group, f"params: param group {len(self.param_groups)}")
            _check_hyperparameters(param_group, f"params: param group {len(self.param_groups)}'s ")
        super().add_param_group(param_group)   # (which makes its params a list, whatever iterable they came in)
        try:
            for i, p in enumerate(self.param_groups[-1]["params"]):
                _check_dtype(p, f"params: parameter {i} of group {len(self.param_groups) - 1}")
        except ValueError:
            self.param_groups.pop()   # refused: not stepped after all by the next step
            raise

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load_state_dict, refusing the state of an optimizer that steps otherwise (torch's Adam, AdamW with
        amsgrad or maximize), whose options would otherwise be ignored. Of torch's AdamW's state, how it ran (fused,
        foreach, ...) is not kept, and a step count a fused AdamW kept on the device comes to the host, once."""
        for i, group in enumerate(state_dict["param_groups"]):
            _check_torch_options(group, f"state_dict: param group {i}")
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.update((k, self.defaults[k]) for k in _EXECUTION_OPTIONS if k in self.defaults)
        for state in self.state.values():
            if torch.is_tensor(state.get("step")) and state["step"].device.type != "cpu":
                state["step"] = state["step"].cpu()   # read at every step: on the host, without a wait

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step of every parameter that has a gradient; returns closure()'s loss (run with grad enabled)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_groups()
        for group in self.param_groups:
            # (given as numpy scalars or one-element tensors too: the step's scalars are Python floats)
            (beta1, beta2), lr = map(float, group["betas"]), float(group["lr"])
            eps, weight_decay = float(group["eps"]), float(group["weight_decay"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state_of(p)
                state["step"] += 1
                scalars = step_scalars(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                                       step=float(state["step"]))
                tensors = [_local(t) for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
                           + (() if "compensation" not in state else (state["compensation"],))]
                contiguous = [t.contiguous() for t in tensors]   # the launchers take contiguous tensors
                launcher = select_backend("kahan_adamw", self.backend, p.device)
                operands = (*contiguous[:4], *(contiguous[4:] or [None]))
                if is_triton(launcher):
                    _step_outside_graphs(launcher, *operands, **scalars)
                else:
                    launcher.step(*operands, **scalars)   # (itself kept out of compiled graphs: see its reason)
                for i, (t, stepped) in enumerate(zip(tensors, contiguous)):
                    if stepped is not t and i != 1:   # a copy stepped in place of t (the gradient is only read)
                        t.copy_(stepped)
        return loss

    def _check_groups(self):
        """ValueError for what step() cannot step, before it steps anything (a refused step changes no weight): an
        option set on a group after it was added, a sparse gradient, a parameter cast to another dtype after it was
        added (model.half() after the optimizer was built), a loaded state of another shape than its parameter (torch
        maps a loaded state to the parameters by position, and checks no shapes), fake tensors (FakeTensorMode) on
        the Triton backend, whose kernel needs their memory (the torch one steps them). Fake tensors come together
        (a step traced under FakeTensorMode): the first parameter on the Triton backend stands for all of them, so
        that a step pays for that check once, not once per parameter."""
        fakes_checked = False
        for i, group in enumerate(self.param_groups):
            _check_torch_options(group, f"param_groups[{i}]")
            for j, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("KahanAdamW: a parameter has a sparse gradient, which AdamW does not take")
                where = f"KahanAdamW: parameter {j} of param_groups[{i}]"
                _check_dtype(p, where)
                state = self.state.get(p, {})
                for name in ("exp_avg", "exp_avg_sq", "compensation"):
                    if name in state and state[name].shape != p.shape:
                        raise ValueError(f"{where} has shape {tuple(p.shape)} but its state's {name} has shape "
                                         f"{tuple(state[name].shape)} (a state dict loaded into an optimizer that "
                                         "lists the parameters in another order?)")
                launcher = select_backend("kahan_adamw", self.backend, p.device)
                if not fakes_checked and is_triton(launcher):
                    refuse_fake_tensors_on_triton(launcher, where, p, p.grad)
                    fakes_checked = True

    def _state_of(self, p):
        """p's state, made on its first step (moments of zeros), completed after a load (a compensation of zeros
        for a bf16 parameter whose state came from an optimizer without one), its moments cast to p's dtype where p
        was cast after its steps (model.to(torch.bfloat16) after fp32 steps: as torch's load_state_dict casts them),
        without a compensation where p is not bf16 (cast to fp32 after bf16 steps)."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, device="cpu")   # read at every step: on the host, without a wait
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        for name in ("exp_avg", "exp_avg_sq"):
            if state[name].dtype != p.dtype:
                state[name] = state[name].to(p.dtype)
        if p.dtype in COMPENSATED_DTYPES and "compensation" not in state:
            state["compensation"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif p.dtype not in COMPENSATED_DTYPES:   # (one cast to fp32 after bf16 steps: it steps as AdamW)
            state.pop("compensation", None)
        return state
