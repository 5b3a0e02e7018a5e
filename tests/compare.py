"""Comparison helpers shared by the tests: norm-wise relative error against a float64 ground truth."""
import torch

# Tolerances by precision of the inputs (relative, norm-wise: max|a - b| / max|b|).
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def rel_error(actual, expected):
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = expected.abs().max().clamp(min=1e-12) if expected.numel() else torch.tensor(1.0, dtype=torch.float64)
    return float((actual - expected).abs().max() / scale) if expected.numel() else 0.0


def assert_rel_close(name, actual, expected, rel):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_error(actual, expected)
    assert err <= rel, f"{name}: relative error {err:.3g} > {rel:.1g}"


def grads_of(output, inputs, seed):
    """Gradients of sum(output * seed) wrt `inputs` (None for inputs that get no gradient)."""
    return torch.autograd.grad((output * seed.to(output.dtype)).sum(), inputs, allow_unused=True)


def assert_grads_close(names, actual, expected, inputs, rel):
    """The gradients of `actual` and of `expected` wrt `inputs` agree within `rel` under one random upstream
    gradient (drawn in actual's shape, given to expected in its own)."""
    seed = torch.randn(actual.shape, device=actual.device)
    for name, got, want in zip(names, grads_of(actual, inputs, seed),
                               grads_of(expected, inputs, seed.reshape(expected.shape))):
        assert_rel_close(name, got, want, rel)
