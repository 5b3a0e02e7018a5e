"""Torch launchers of the RMSNorm (same contract as fastalign.kernels.rms_norm): the forward as Hugging Face's modules
compute it, the backward from the same formulas as the kernel, in fp32 (float64 for float64 inputs)."""
import torch


def _normalised(x, eps):
    """(x * rstd, rstd) of the rows of x in the compute dtype."""
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * rstd, rstd


def forward(x, weight, eps, *, weight_offset=0.0, round_before_weight=True):
    """The module's output: weight * round(normalised) ("rounded"), else round(normalised * (weight + offset))."""
    normalised, _ = _normalised(x, eps)
    if round_before_weight:
        return weight * normalised.to(x.dtype)
    return (normalised * (weight.to(normalised.dtype) + weight_offset)).to(x.dtype)


def backward(x, weight, grad_out, eps, *, weight_offset=0.0, round_before_weight=True):
    """(grad_x, grad_weight) of forward given grad_out, in x's and weight's dtypes."""
    normalised, rstd = _normalised(x, eps)
    grad_out = grad_out.to(normalised.dtype)
    scale = weight.to(normalised.dtype) + weight_offset
    rows = tuple(range(x.dim() - 1))
    if round_before_weight:   # the gradient of the rounded normalised rows is a product in the dtype
        grad_weight = (grad_out * normalised.to(x.dtype).to(normalised.dtype)).sum(rows)
        grad_normalised = (grad_out * scale).to(x.dtype).to(normalised.dtype)
    else:
        grad_weight = (grad_out * normalised).sum(rows)
        grad_normalised = grad_out * scale
    grad_x = rstd * (grad_normalised - normalised * (grad_normalised * normalised).mean(-1, keepdim=True))
    return grad_x.to(x.dtype), grad_weight.to(weight.dtype)
