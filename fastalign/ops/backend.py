"""Chooses the implementation behind a fused op: Triton kernels or the chunked torch path.

Both implement the same launcher contract (`forward`, `backward`, `forward_with_gradients` in a module named after
the op): `fastalign.kernels.<op>` (Triton) and `fastalign.ops.torch_chunked.<op>` (pure torch, bounded memory).
"""
import functools
import importlib
import inspect
import os
from typing import Callable, Literal, get_args

import torch
from torch._functorch.utils import unwrap_dead_wrappers
from torch._guards import active_fake_mode
from torch._subclasses.fake_tensor import is_fake

from .compiler_disable import F, compiler_disable

Backend = Literal["auto", "triton", "torch"]   # the `backend` argument of the ops
BACKENDS = get_args(Backend)


def triton_interpreting():
    """True when Triton kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_launch_method():
    """(class, method name) through which every Triton kernel launch of this process passes: the interpreter's grid
    call under TRITON_INTERPRET=1, the JIT's run otherwise (for counting or inspecting launches); ImportError without
    triton."""
    if triton_interpreting():
        from triton.runtime.interpreter import GridExecutor
        return GridExecutor, "__call__"
    from triton.runtime.jit import JITFunction
    return JITFunction, "run"


def check_backend(backend, name="backend"):
    """ValueError unless `backend` (the argument `name`) is one of BACKENDS (the modules that pass it on to an op check
    it when given)."""
    if backend not in BACKENDS:
        raise ValueError(f"{name} must be one of {BACKENDS}, got {backend!r}")


class TritonUnavailableError(ValueError, RuntimeError):
    """backend='triton' for tensors that Triton cannot run on here (neither CUDA nor under the interpreter): a
    ValueError, as the ops' other argument errors, and a RuntimeError, as paged_attention raised it before."""


def resolve_backend(backend, device, name="backend", dtype=None):
    """The backend ("triton" or "torch") that `backend` (the argument `name`; "auto" = Triton on CUDA tensors but
    float64 ones, whose `dtype` the Triton kernels do not take, torch elsewhere) runs for tensors on `device`;
    ValueError for a backend not of BACKENDS and for meta tensors, which hold
    no values to compute on (torch's errors named neither the op nor the device), TritonUnavailableError for "triton"
    where Triton cannot run. The one resolution of the ops and of the TreeRunner's attention_backend."""
    check_backend(backend, name)
    if device.type == "meta":
        raise ValueError("fastalign's ops cannot run on tensors on the meta device (they hold no values): "
                         "materialize them first (a model built under torch.device('meta'): to_empty, then load "
                         "its weights)")
    if backend == "auto":
        return "triton" if device.type == "cuda" and dtype != torch.float64 else "torch"
    if backend == "triton" and device.type != "cuda" and not triton_interpreting():
        raise TritonUnavailableError(
            f"{name}='triton' needs CUDA tensors (got tensors on {device}); set TRITON_INTERPRET=1 before "
            "importing fastalign to run the Triton kernels on the CPU through Triton's interpreter")
    return backend


def select_backend(op, backend, device, dtype=None):
    """The launcher module of `op` for `backend` on `device` for inputs of `dtype` (resolve_backend). Imports nothing
    where the launcher was imported before, so that dynamo traces it in a compiled caller (an import is a graph break,
    refused under fullgraph=True)."""
    if resolve_backend(backend, device, dtype=dtype) == "torch":
        return _TORCH_LAUNCHERS[op]
    launcher = _triton_launchers.get(op)
    if launcher is None:
        launcher = _triton_launchers[op] = _import_triton_launcher(op)
    return launcher


# The torch launchers, imported with this module (plain torch, cheap); the Triton ones on their op's first call (it
# imports triton), kept here for dynamo to read.
_TORCH_LAUNCHERS = {op: importlib.import_module(f"fastalign.ops.torch_chunked.{op}")
                    for op in ("gated_activation", "kahan_adamw", "linear_cross_entropy", "linear_kl_div", "rms_norm")}
_triton_launchers = {}


@compiler_disable(reason="the Triton backend of fastalign's ops runs outside the compiled graph (graph breaks): "
                         "dynamo cannot trace the import of its kernels (fastalign.kernels) nor their launches; "
                         "compile the caller without fullgraph=True")
def _import_triton_launcher(op):
    """fastalign.kernels.<op>; an ImportError saying what is missing."""
    try:
        return importlib.import_module(f"fastalign.kernels.{op}")
    except ImportError as err:
        if (err.name or "").split(".")[0] == "triton":
            raise ImportError(f"backend='triton' needs the triton package ({err}); use backend='torch'") from err
        # triton is there, the kernels are not: fastalign.kernels is kernels/ as an install maps it (a checkout put
        # on PYTHONPATH has no such package), or a kernel module failed to import under this triton
        raise ImportError(f"backend='triton': cannot import fastalign.kernels.{op} ({err}); install fastalign "
                          "(pip install -e . in a checkout), or use backend='torch'") from err


# Why the fused losses cannot run on fake tensors (refuse_fake_tensors)
TOKENS_CHOSEN_BY_VALUES = ("the tokens it computes depend on the values of its targets, mask and token weights, "
                           "which fake tensors do not hold; run it on real tensors")


def refuse_fake_tensors(what, tensors, because):
    """ValueError for `what` on fake tensors (one of `tensors`, or FakeTensorMode active), in which torch.export and
    FLOP and memory estimators trace a step, saying `because` it cannot run there (torch failed deep inside, e.g. on
    aten.nonzero's data-dependent shape, naming neither the op nor the cause). Not checked in dynamo's trace, whose
    tensors stand for real ones (and which cannot trace the check)."""
    if torch.compiler.is_dynamo_compiling():
        return
    if active_fake_mode() is not None or any(is_fake(t) for t in tensors):
        raise ValueError(f"{what} cannot run on fake tensors (FakeTensorMode, as torch.export and FLOP or memory "
                         f"estimators use): {because}")


def refuse_fake_tensors_on_triton(launcher, op, *tensors):
    """refuse_fake_tensors for a Triton launcher of `op`, whose kernels need the tensors' memory; the torch ones are
    plain torch, which gives the output's shape."""
    if is_triton(launcher):
        refuse_fake_tensors(f"{op} on the Triton backend", tensors, "its kernels read and write the tensors' memory, "
                            "which fake tensors do not have; use backend='torch', which gives the shapes")


def is_triton(launcher):
    """True for a Triton launcher module (fastalign.kernels.<op>), False for a torch one."""
    return launcher.__name__.startswith("fastalign.kernels.")


def require_triton_dtype(module, name, t):
    """Triton kernels take fp32, fp16 and bf16; float64 is served by the torch path only."""
    if is_triton(module) and t.dtype == torch.float64:
        raise TypeError(f"{name} is float64, which the Triton backend does not support: use backend='torch'")


def autocast_off(device):
    """A context with autocast off on `device`'s type. The ops' launchers run in it: they compute in their inputs'
    dtype with fp32 accumulation, which an enclosing autocast would break on the torch path (bf16 logits and
    logsumexps; a dtype clash in backward; a bf16 scaled_dot_product_attention in paged attention). So do the
    TreeRunner's forwards: a span's KV must not depend on the context of the call that computed it (an evicted span
    is recomputed in a later call's), and under autocast an fp32 model's K/V came out in bf16."""
    return torch.autocast(device.type, enabled=False)


def graph_break(op: str, untraceable: str = "its data-dependent row gather and kernel launches") -> Callable[[F], F]:
    """torch.compiler.disable for a fused op, with the reason a fullgraph=True caller's error gives (else 'None'):
    `untraceable` says what dynamo cannot trace."""
    return compiler_disable(reason=f"{op} runs outside the compiled graph (one graph break): dynamo cannot "
                                   f"trace {untraceable}; compile the caller without fullgraph=True")


@graph_break("a layer op (rms_norm, gated_linear, gated_activation) on the Triton backend", "its kernel launches")
def _apply_outside_graphs(function, *args):
    return apply_function(function, *args)


def apply_on(launcher, function, *args):
    """function.apply(*args), an autograd Function of a layer op (or its backward's) that runs `launcher`: a Triton
    one outside a compiled caller's graphs (one graph break, as the fused losses take: dynamo traced into the kernel
    launches, and failed under Triton's interpreter); a torch one as it is, for dynamo to trace."""
    if is_triton(launcher):
        return _apply_outside_graphs(function, *args)
    return function.apply_in_graph(*args) if torch.compiler.is_compiling() else apply_function(function, *args)


def apply_function(function, *args):
    """function.apply(*args), an autograd Function given its forward's arguments positionally, without the cost
    torch's Function.apply adds to a Function with a setup_context: it binds the arguments to forward's signature
    (inspect.signature, every call: half the Python calls of a layer op) to fill defaults. Where forward has none
    to fill, outside torch.func's transforms and dynamo's trace, it calls what Function.apply then calls."""
    if (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or _forward_has_defaults(function)):
        return function.apply(*args)
    return super(torch.autograd.Function, function).apply(*unwrap_dead_wrappers(args))


@functools.cache
def _forward_has_defaults(function):
    """True where binding positional arguments to function.forward's signature may add some (its defaults)."""
    return any(p.default is not p.empty for p in inspect.signature(function.forward).parameters.values())
