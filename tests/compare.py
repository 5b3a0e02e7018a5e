"""Comparison helpers shared by the tests: norm-wise relative error against a float64 ground truth."""
import pytest
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


def assert_func_grad_is_autograds(loss, ref, inputs, rel, name="loss"):
    """torch.func.grad_and_value of the scalar `loss` wrt `inputs` (hidden, weight, bias): the value and gradients
    torch.autograd takes of `loss` itself exactly, those of `ref` (its float64 reference) within `rel`."""
    grads, value = torch.func.grad_and_value(loss, argnums=tuple(range(len(inputs))))(*inputs)
    leaves = [t.clone().requires_grad_() for t in inputs]
    autograd_value, ref_value = loss(*leaves), ref(*leaves)
    assert torch.equal(value, autograd_value)
    assert_rel_close(name, value, ref_value, rel)
    for grad_name, got, same, want in zip(["d_hidden", "d_weight", "d_bias"], grads,
                                          torch.autograd.grad(autograd_value, leaves),
                                          torch.autograd.grad(ref_value, leaves)):
        assert torch.equal(got, same), grad_name
        assert_rel_close(grad_name, got, want, rel)


def assert_vjp_and_jacrev_close(names, op, ref, inputs, rel):
    """torch.func.vjp of `op` under a random cotangent, and torch.func.jacrev's whole Jacobians, wrt every one of
    `inputs` agree with `ref`'s (float64) within `rel`; returns op's Jacobians."""
    (out, vjp_fn), (ref_out, ref_vjp_fn) = (torch.func.vjp(f, *inputs) for f in (op, ref))
    assert_rel_close("output", out, ref_out, rel)
    cotangent = torch.randn(out.shape, device=out.device)
    for name, got, want in zip(names, vjp_fn(cotangent), ref_vjp_fn(cotangent.double())):
        assert_rel_close(name, got, want, rel)
    argnums = tuple(range(len(inputs)))
    jacobians = torch.func.jacrev(op, argnums=argnums)(*inputs)
    for name, got, want in zip(names, jacobians, torch.func.jacrev(ref, argnums=argnums)(*inputs)):
        assert_rel_close(f"jacobian {name}", got, want, rel)
    return jacobians


def assert_only_first_order(op, loss, hidden):
    """Under torch.func, differentiating `loss`'s gradient wrt `hidden` (nested grad or jacrev, forward over
    reverse) and forward mode (jvp, jacfwd, hessian) raise errors naming `op`."""
    vjp_fn = torch.func.vjp(loss, hidden)[1]
    for twice in (lambda h: torch.func.grad(lambda x: torch.func.grad(loss)(x).sum())(h),
                  lambda h: torch.func.jacrev(torch.func.jacrev(loss))(h),
                  lambda h: torch.func.jvp(vjp_fn, (h.new_ones(()),), (h.new_ones(()),))):  # forward over reverse
        with pytest.raises(RuntimeError, match=f"{op} is not twice differentiable"):
            twice(hidden)
    for forward_mode in (lambda h: torch.func.jvp(loss, (h,), (torch.ones_like(h),)), torch.func.jacfwd(loss),
                         torch.func.hessian(loss)):
        with pytest.raises(RuntimeError, match=f"{op} has no forward-mode derivative"):
            forward_mode(hidden)


def assert_per_sample_grads_close(op, ref, weight, bias, batched, rel):
    """torch.func.vmap(grad_and_value(op)) over the samples of `batched` (tensors with the samples on dim 0, the
    first one the hidden states), differentiated wrt weight, bias and the hidden states, against a loop of `ref`
    (op's float64 twin, `op(weight, bias, *sample)`) with autograd; returns (grads, values)."""
    in_dims = (None, None) + (0,) * len(batched)
    grads, values = torch.func.vmap(torch.func.grad_and_value(op, argnums=(0, 1, 2)), in_dims=in_dims)(
        weight, bias, *batched)
    for i in range(batched[0].shape[0]):
        inputs = [t.clone().requires_grad_() for t in (weight, bias, batched[0][i])]
        ref_value = ref(*inputs, *(t[i] for t in batched[1:]))
        assert_rel_close(f"value {i}", values[i], ref_value, rel)
        for name, got, want in zip(["d_weight", "d_bias", "d_hidden"], grads, torch.autograd.grad(ref_value, inputs)):
            assert_rel_close(f"{name} {i}", got[i], want, rel)
    return grads, values


# The two ways a compiled caller differentiates a loss itself (`differentiate` of the helper below)
COMPILED_CALLER_DIFFERENTIATIONS = [
    pytest.param(lambda loss, h, w: torch.func.grad(loss, argnums=(0, 1))(h, w), id="func_grad"),
    pytest.param(lambda loss, h, w: torch.autograd.grad(loss(h, w), (h, w)), id="autograd_grad")]


def assert_grads_of_a_compiled_caller_close(differentiate, op, ref, hidden, weight, args, kwargs, rel):
    """torch.compile of a caller that differentiates `op(tanh(h), w, *args, **kwargs)` wrt (h, w) itself, by
    `differentiate(loss, h, w)`, gives the gradients torch.autograd takes of `ref` (op's float64 twin) uncompiled."""
    def caller(loss_fn, h, w):
        def loss(h, w):
            return loss_fn(torch.tanh(h), w, *args, **kwargs)
        if loss_fn is ref:
            return torch.autograd.grad(loss(h, w), (h, w))
        return differentiate(loss, h, w)

    got = torch.compile(caller, backend="eager")(op, *(t.clone().requires_grad_() for t in (hidden, weight)))
    want = caller(ref, *(t.clone().requires_grad_() for t in (hidden, weight)))
    for name, g, w in zip(["d_hidden", "d_weight"], got, want):
        assert_rel_close(name, g, w, rel)


def assert_a_compiled_caller_close(op, ref, inputs, rel):
    """torch.compile of a caller of the scalar `op(tanh(inputs[0]), *inputs[1:])`: its value, and its gradients wrt
    `inputs` taken after the caller and by torch.autograd.grad inside it, are those of `ref` (op's float64 twin)
    uncompiled."""
    def loss(fn, x, *rest):
        return fn(torch.tanh(x), *rest)

    def differentiating(fn, *inputs):
        return torch.autograd.grad(loss(fn, *inputs), inputs)

    torch._dynamo.reset()   # a fresh compile for each case, not an eager run past the recompile limit
    want_value = loss(ref, *inputs)
    want = torch.autograd.grad(want_value, inputs)
    value = torch.compile(loss, backend="eager")(op, *inputs)
    assert_rel_close("value", value, want_value, rel)
    for got in (torch.autograd.grad(value, inputs), torch.compile(differentiating, backend="eager")(op, *inputs)):
        for i, (g, w) in enumerate(zip(got, want)):
            assert_rel_close(f"gradient of input {i}", g, w, rel)
