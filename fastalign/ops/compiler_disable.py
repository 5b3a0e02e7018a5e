"""torch.compiler.disable applied on a function's first call instead of at import.

torch.compiler.disable imports torch._dynamo (1.4 s) as it decorates, so decorating the fused ops made every
`import fastalign` pay for the compiler. torch._disable_dynamo defers that import to the first call; what it
returns is code of torch's that dynamo never traces (its frame is skipped, and it runs the function with dynamo's
frame hook off), so the function stays outside compiled graphs as before. A wrapper of fastalign's own that chose
at call time would itself be traced after the graph break, and dynamo fails on the functorch-wrapped tensors of
torch.func.grad inside a compiled caller there.
"""
from typing import Any, Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def compiler_disable(reason: str | None = None) -> Callable[[F], F]:
    """A decorator that keeps its function out of torch.compile's graphs, as torch.compiler.disable(reason=reason);
    torch._dynamo is imported by the function's first call (on a torch without the private torch._disable_dynamo,
    which a release may drop, torch.compiler.disable itself decorates, importing it then). A caller traced by dynamo
    breaks its graph at the call, with `reason` in the message (the attributes dynamo reads on a function that
    torch.compiler.disable made)."""
    def decorate(fn):
        deferred = getattr(torch, "_disable_dynamo", None)
        if deferred is None:
            return torch.compiler.disable(fn, reason=reason)
        outside = deferred(fn)
        outside._torchdynamo_disable = True
        outside._torchdynamo_disable_msg = reason
        return outside

    return decorate
