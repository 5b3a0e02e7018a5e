"""Slow, obviously correct float64 version of fastalign.rms_norm, for tests: the RMSNorm of the rows written out from
its definition, with the weight applied as WEIGHT_RULES' rule says, differentiated by autograd."""
import torch


def rms_norm(x, weight, eps=1e-6, *, rule="rounded"):
    """float64 x / sqrt(mean(x^2) + eps) times weight ("rounded", "fp32") or 1 + weight ("one plus")."""
    x = x.double()
    normalised = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return normalised * (weight.double() + (1.0 if rule == "one plus" else 0.0))
