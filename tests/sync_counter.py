"""Counts, on the CPU, the device-to-host round trips that the same code would pay on a GPU.

A CUDA run stalls the host wherever it needs a value computed on the device: `.item()`, `int()`, `float()` and
`bool()` of a tensor (aten._local_scalar_dense), ops whose output shape depends on the data (nonzero, masked_select,
indexing with a bool mask, unique, repeat_interleave without output_size) and copies to the host (`.tolist()`,
`.numpy()`, `.cpu()`, `.to("cpu")`). Here every tensor is on the CPU, so the counter tracks which tensors would be
on the device: the parameters and buffers of the modules it is given, tensors moved with `.to(device)` (a
torch.device, not the string "cpu"), tensors made by a factory given `device=` (a torch.device), and every result
of an op that reads one of those. Host-side plans (numpy arrays, torch tensors built from Python lists) are not
counted. Each sync is recorded with the first line of fastalign's code on the stack, so that a test can say which
remain and why.
"""
import collections
import contextlib
import os
import traceback
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_aten = torch.ops.aten
_ALWAYS = {_aten._local_scalar_dense.default, _aten.nonzero.default, _aten.masked_select.default,
           _aten.equal.default, _aten._unique.default, _aten._unique2.default, _aten.unique_dim.default,
           _aten.unique_consecutive.default}
_BOOL_INDEXED = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default}
_REPEAT_INTERLEAVE = {_aten.repeat_interleave.Tensor, _aten.repeat_interleave.self_Tensor}
_FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint")
_TORCH = os.path.dirname(os.path.realpath(torch.__file__)) + os.sep
_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
# the package's code: fastalign/, and kernels/ (installed as fastalign.kernels; a checkout's fastalign/kernels link
# resolves to it)
_PACKAGE = tuple(os.path.join(_ROOT, name) + os.sep for name in ("fastalign", "kernels"))


def _tensors(tree):
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _site():
    """'file:line' of the innermost frame in fastalign's code (else the innermost one outside torch and here)."""
    frames = [(os.path.realpath(f.filename), f.lineno) for f in traceback.extract_stack() if f.filename != __file__]
    inside = [f for f in frames if f[0].startswith(_PACKAGE)]
    filename, line = (inside or [f for f in frames if not f[0].startswith(_TORCH)])[-1]
    return f"{os.path.relpath(filename, _ROOT)}:{line}"


def _is_device(device):
    """True where a GPU run's argument would name the accelerator: a torch.device (a run's model or accelerator
    device, the CPU here), not a "cpu" string that code writes to mean the host."""
    return isinstance(device, torch.device)


class SyncCounter(TorchDispatchMode):
    """with SyncCounter(model) as counter: ...; counter.syncs is a Counter of 'op @ file:line' keys (by_file() without
    the lines), counter.total their sum. mark(*tensors) declares more tensors device-resident; reset() starts
    counting again."""

    def __init__(self, *modules):
        super().__init__()
        self._device = {}   # id -> weakref (a WeakSet would compare tensors with ==)
        self.syncs = collections.Counter()
        for module in modules:
            self.mark(*module.parameters(), *module.buffers())
        self._patches = contextlib.ExitStack()

    @property
    def total(self):
        return sum(self.syncs.values())

    def by_file(self):
        """The counts by 'op @ file' (sites without their line numbers, which any edit above them moves)."""
        out = collections.Counter()
        for key, n in self.syncs.items():
            out[key.rsplit(":", 1)[0]] += n
        return dict(out)

    def reset(self):
        self.syncs.clear()

    def mark(self, *tensors):
        """Declares `tensors` device-resident; returns them."""
        if len(self._device) > 1 << 16:
            self._device = {k: r for k, r in self._device.items() if r() is not None}
        for t in tensors:
            self._device[id(t)] = weakref.ref(t)
        return tensors[0] if len(tensors) == 1 else tensors

    def on_device(self, t):
        ref = self._device.get(id(t)) if isinstance(t, torch.Tensor) else None
        return ref is not None and ref() is t

    def _host_copy(self, t):
        """A copy of `t` that is not marked (what .cpu() or .to(device) give on a GPU)."""
        with torch.utils._python_dispatch._disable_current_modes():
            return t.detach().clone().requires_grad_(t.requires_grad) if t.is_leaf else t.clone()

    def count(self, what):
        self.syncs[f"{what} @ {_site()}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _tensors((args, kwargs))
        out = func(*args, **kwargs)
        if any(self.on_device(t) for t in inputs):
            if func in _ALWAYS or (func in _REPEAT_INTERLEAVE and kwargs.get("output_size") is None) or (
                    func in _BOOL_INDEXED and any(t.dtype in (torch.bool, torch.uint8) for t in _tensors(args[1]))):
                self.count(func.__name__)
            for t in _tensors(out):
                self.mark(t)
        return out

    def __enter__(self):
        counter = self
        to, factories = torch.Tensor.to, {name: getattr(torch, name) for name in _FACTORIES}

        def patched_to(t, *args, **kwargs):
            out = to(t, *args, **kwargs)
            target = kwargs.get("device", next((a for a in args if isinstance(a, (torch.device, str))), None))
            if isinstance(target, str) and target.startswith("cpu"):
                if counter.on_device(t):
                    counter.count("to('cpu')")
                    return counter._host_copy(out)
            elif _is_device(target) or isinstance(target, str):
                if out is t and not counter.on_device(t):  # a GPU run copies a host tensor: keep the host one apart
                    out = counter._host_copy(t)
                counter.mark(out)
            return out

        def host_copy(name):
            method = getattr(torch.Tensor, name)

            def patched(t, *args, **kwargs):
                if not counter.on_device(t):
                    return method(t, *args, **kwargs)
                counter.count(name)
                return counter._host_copy(t) if name == "cpu" else method(t, *args, **kwargs)
            return method, patched

        def factory(name):
            make = factories[name]

            def patched(*args, **kwargs):
                out = make(*args, **kwargs)
                if _is_device(kwargs.get("device")):
                    counter.mark(out)
                return out
            return patched

        for name, value in [("to", patched_to)] + [(n, host_copy(n)[1]) for n in ("tolist", "numpy", "cpu")]:
            self._patches.enter_context(_setattr(torch.Tensor, name, value))
        for name in _FACTORIES:
            self._patches.enter_context(_setattr(torch, name, factory(name)))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._patches.close()


@contextlib.contextmanager
def _setattr(owner, name, value):
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)
