"""What autograd keeps for the backward, for the tests of ops and layers that keep less than the modules they stand
for."""
import torch


def saved_bytes(fn, excluded=()):
    """(fn()'s result, the bytes of the storages of the tensors autograd saved while it ran, each counted once, those
    of the `excluded` tensors (a model's parameters) aside)."""
    skip = {t.untyped_storage().data_ptr() for t in excluded}
    held = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            held[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(held.values())
