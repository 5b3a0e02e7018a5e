"""The launchers run with their inputs' CUDA device made current, as torch's own operators do.

Triton launches a kernel on the current CUDA device and its current stream, whatever device the tensors are on:
with a model on cuda:1 while cuda:0 is current (a process that never called torch.cuda.set_device, a model spread
over GPUs by device_map="auto"), a launch fails with "cannot be accessed from Triton" or reads the wrong device's
memory. Under the guard the kernels, their autotuning and the library matmuls between them run on the inputs'
device and on that device's current stream.
"""
import contextlib
import functools
import inspect

import torch


def device_of(tensor: torch.Tensor):
    """A context in which `tensor`'s CUDA device is current; nothing to do for a CPU tensor (the interpreter's)."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def on_device_of_first_input(launcher):
    """`launcher` run with the device of its first parameter, a tensor, current (passed by position or by name)."""
    first = next(iter(inspect.signature(launcher).parameters))

    @functools.wraps(launcher)
    def launch(*args, **kwargs):
        with device_of(args[0] if args else kwargs[first]):
            return launcher(*args, **kwargs)
    return launch
