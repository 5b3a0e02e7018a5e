"""fastalign.KahanAdamW: fp32 weights step as AdamW (against torch's in float64), bf16 weights keep the updates that
torch's AdamW on bf16 weights rounds away, both backends give the same bits through the optimizer (non-contiguous
weights, parameter groups), state saves and loads (torch's AdamW's too), copies of the optimizer, the step inside the
backward, and errors."""
import contextlib
import copy
import functools
import pickle
import re

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastalign.optim.kahan_adamw as kahan_module
from fastalign.ops.backend import select_backend
from fastalign.optim import KahanAdamW
from fastalign.unlearn.backward_step import step_in_backward
from tests.conftest import TRITON_DEVICE, triton_cases


def gradients(shape, steps, seed=0):
    """`steps` gradients of a loss whose slope keeps a sign per weight, with noise, as a fine-tuning's do."""
    generator = torch.Generator().manual_seed(seed)
    slope = torch.randn(shape, generator=generator)
    return [slope + torch.randn(shape, generator=generator) for _ in range(steps)]


def run(optimizer_class, start, grads, **kwargs):
    """The weights after stepping `optimizer_class` from `start` through `grads` (given in the weights' dtype), and
    the optimizer."""
    weight = torch.nn.Parameter(start.clone())
    optimizer = optimizer_class([weight], **kwargs)
    for grad in grads:
        weight.grad = grad.to(weight.dtype)
        optimizer.step()
    return weight.detach(), optimizer


def test_fp32_weights_step_as_torchs_adamw_in_float64():
    torch.manual_seed(0)
    start, grads = torch.randn(1000), gradients(1000, 5)
    ours, optimizer = run(KahanAdamW, start, grads, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6)
    reference, _ = run(torch.optim.AdamW, start.double(), grads, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99),
                       eps=1e-6)
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-7)
    assert "compensation" not in optimizer.state[optimizer.param_groups[0]["params"][0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_gradient_whose_square_overflows_steps_as_torchs_adamw(dtype):
    """|g| = 1e20: (g g) (1 - beta2) overflowed to a v of inf and the weight did not move, where torch's AdamW takes
    ((1 - beta2) g) g, finite up to |g| ~ 5.8e20, and moves it by ~lr a step as at any gradient scale."""
    start, grads = torch.full((4,), 0.5, dtype=dtype), [torch.full((4,), 1e20)] * 2
    ours, _ = run(KahanAdamW, start, grads, lr=1e-2, weight_decay=0.0, backend="torch")
    theirs, _ = run(torch.optim.AdamW, start, grads, lr=1e-2, weight_decay=0.0)
    assert theirs[0] < 0.49
    torch.testing.assert_close(ours, theirs)

def test_each_group_steps_with_its_own_betas_eps_and_weight_decay():
    """fp32 weights in two groups, the second with betas, eps and weight_decay of its own (no decay for norms, say):
    each steps as torch's AdamW in float64 with that group's options."""
    torch.manual_seed(0)
    starts = [torch.randn(200), torch.randn(300)]
    options = [{}, {"betas": (0.5, 0.9), "eps": 1e-1, "weight_decay": 0.0}]

    def stepped(optimizer_class, dtype):
        weights = [torch.nn.Parameter(start.to(dtype, copy=True)) for start in starts]
        optimizer = optimizer_class([{"params": [w], **o} for w, o in zip(weights, options)], lr=1e-2,
                                    weight_decay=0.5)
        for grads in zip(gradients(200, 4, seed=1), gradients(300, 4, seed=2)):
            for weight, grad in zip(weights, grads):
                weight.grad = grad.to(dtype)
            optimizer.step()
        return [weight.detach().double() for weight in weights]

    for ours, reference in zip(stepped(KahanAdamW, torch.float32), stepped(torch.optim.AdamW, torch.float64)):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_bf16_weights_keep_the_updates_that_bf16_adamw_rounds_away():
    """At a fine-tuning learning rate (2e-6, weights of 0.02: a sixtieth of their last place) weight + compensation
    follows AdamW run in float64 from the same weights; torch's AdamW on the bf16 weights barely moves them."""
    start = (0.02 * torch.randn(4096, generator=torch.Generator().manual_seed(1))).bfloat16()
    grads = [g.bfloat16() for g in gradients(4096, 200)]
    reference, _ = run(torch.optim.AdamW, start.double(), [g.double() for g in grads], lr=2e-6)
    moved = (reference - start.double()).norm()

    def error(weights):
        return float((weights.double() - reference).norm() / moved)

    ours, optimizer = run(KahanAdamW, start, grads, lr=2e-6)
    compensation = optimizer.state[optimizer.param_groups[0]["params"][0]]["compensation"]
    assert compensation.dtype == torch.bfloat16
    assert error(ours.double() + compensation.double()) < 0.02   # (0.005)
    assert error(ours) < 0.25   # the weights themselves, to within their last place (0.14)
    plain, _ = run(torch.optim.AdamW, start, grads, lr=2e-6)
    assert error(plain) > 0.9   # (0.985)


@pytest.mark.parametrize("contiguous", triton_cases([True, False]))
def test_both_backends_step_parameter_groups_to_the_same_bits(contiguous):
    """A bf16 and an fp32 group with their own learning rates, on both backends, step to the bits of the torch
    backend's contiguous run: weights and every state tensor (a weight stored transposed steps a contiguous copy,
    whose moments and compensation are written back too)."""
    torch.manual_seed(2)
    starts = [0.02 * torch.randn(33, 17), torch.randn(40)]

    def stepped(backend, device, contiguous):
        weights = [torch.nn.Parameter(starts[0].to(device, torch.bfloat16) if contiguous
                                      else starts[0].t().contiguous().t().to(device, torch.bfloat16)),
                   torch.nn.Parameter(starts[1].to(device))]
        assert weights[0].is_contiguous() is contiguous
        optimizer = KahanAdamW([{"params": [weights[0]]}, {"params": [weights[1]], "lr": 1e-2}], lr=1e-3,
                               backend=backend)
        for grads in zip(gradients((33, 17), 3, seed=3), gradients(40, 3, seed=4)):
            for weight, grad in zip(weights, grads):
                weight.grad = grad.to(device, weight.dtype)
            optimizer.step()
        return {f"{what} {name}": tensor.detach().cpu() for what, weight in zip(("bf16", "fp32"), weights)
                for name, tensor in [("weight", weight), *optimizer.state[weight].items()] if name != "step"}

    expected = stepped("torch", "cpu", contiguous=True)
    assert set(expected) == {f"{what} {name}" for what in ("bf16", "fp32") for name in
                             ("weight", "exp_avg", "exp_avg_sq")} | {"bf16 compensation"}, set(expected)
    for backend, device in (("torch", "cpu"), ("triton", TRITON_DEVICE)):
        got = stepped(backend, device, contiguous)
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), (backend, name)
    assert not torch.equal(expected["bf16 weight"], starts[0].bfloat16())


def test_a_saved_state_resumes_to_the_bit():
    start, grads = (0.02 * torch.randn(500)).bfloat16(), [g.bfloat16() for g in gradients(500, 6, seed=5)]
    whole, _ = run(KahanAdamW, start, grads, lr=1e-4)
    weight, optimizer = run(KahanAdamW, start, grads[:3], lr=1e-4)
    saved = copy.deepcopy(optimizer.state_dict())
    resumed_weight = torch.nn.Parameter(weight.clone())
    resumed = KahanAdamW([resumed_weight], lr=1e-4)
    resumed.load_state_dict(saved)
    for grad in grads[3:]:
        resumed_weight.grad = grad
        resumed.step()
    assert torch.equal(resumed_weight.detach(), whole)


def test_torchs_adamw_state_loads_and_gets_a_compensation():
    weight, torch_optimizer = run(torch.optim.AdamW, (0.02 * torch.randn(50)).bfloat16(),
                                  [g.bfloat16() for g in gradients(50, 2)], lr=1e-3)
    saved = torch_optimizer.state_dict()
    moment = saved["state"][0]["exp_avg"].clone()   # (the loaded state is saved's tensors, stepped in place)
    weight = torch.nn.Parameter(weight)
    optimizer = KahanAdamW([weight], lr=1e-3)
    optimizer.load_state_dict(saved)
    weight.grad = torch.ones(50, dtype=torch.bfloat16)
    optimizer.step()
    state = optimizer.state[weight]
    assert float(state["step"]) == 3 and state["compensation"].dtype == torch.bfloat16
    assert torch.equal(state["exp_avg"], (moment.float() * 0.9 + 0.1).bfloat16())


def test_its_state_has_the_layout_of_torchs_adamw_both_ways():
    """The same keys in each parameter group as torch's AdamW (torch.distributed.checkpoint maps a loaded state onto
    the optimizer's own keys); how a loaded state's AdamW ran (fused) is not taken over."""
    start, grads = (0.02 * torch.randn(20)).bfloat16(), [g.bfloat16() for g in gradients(20, 2)]
    _, fused = run(functools.partial(torch.optim.AdamW, fused=True), start, grads, lr=1e-3)
    _, ours = run(KahanAdamW, start, grads, lr=1e-3)
    assert ours.state_dict()["param_groups"][0].keys() == fused.state_dict()["param_groups"][0].keys()
    loaded = KahanAdamW([torch.nn.Parameter(start.clone())])
    loaded.load_state_dict(fused.state_dict())
    assert loaded.param_groups[0]["fused"] is None and loaded.param_groups[0]["lr"] == 1e-3
    torch.optim.AdamW([torch.nn.Parameter(start.clone())]).load_state_dict(ours.state_dict())


@pytest.mark.parametrize("optimizer, option", [(torch.optim.Adam, "decoupled_weight_decay=False"),
                                               (functools.partial(torch.optim.AdamW, amsgrad=True), "amsgrad=True")])
def test_the_state_of_an_optimizer_that_steps_otherwise_is_refused(optimizer, option):
    if optimizer is torch.optim.Adam and "decoupled_weight_decay" not in optimizer([torch.ones(1)]).defaults:
        pytest.skip("this torch's Adam names no decoupled_weight_decay")
    weight, other = run(optimizer, torch.ones(3), gradients(3, 1))
    with pytest.raises(ValueError, match=f"param group 0 has {option}, which KahanAdamW does not step as"):
        KahanAdamW([torch.nn.Parameter(weight)]).load_state_dict(other.state_dict())


@pytest.mark.parametrize("option", ["maximize", "amsgrad"])
def test_a_group_that_asks_for_what_the_step_does_not_compute_is_refused(option):
    """In a group given to the optimizer, or set on one after: maximize=True stepped downhill and amsgrad=True as
    plain AdamW, silently (and the optimizer's own state dict then failed to load)."""
    weight = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=f"params: param group 1 has {option}=True, which KahanAdamW does not step"):
        KahanAdamW([{"params": [torch.nn.Parameter(torch.ones(2))]}, {"params": [weight], option: True}])
    optimizer = KahanAdamW([weight])
    optimizer.param_groups[0][option] = True
    weight.grad = torch.ones(3)
    with pytest.raises(ValueError, match=f"param_groups\\[0\\] has {option}=True, which KahanAdamW does not step"):
        optimizer.step()
    assert torch.equal(weight, torch.ones(3))


def test_torchs_adamw_options_are_taken_at_their_defaults_and_refused_otherwise():
    """Code written for torch's AdamW passes its options: at their defaults they are taken (a TypeError before),
    otherwise refused by name."""
    weight = torch.nn.Parameter(torch.ones(3))
    defaults = dict(amsgrad=False, maximize=False, foreach=None, capturable=False, differentiable=False, fused=None)
    KahanAdamW([weight], lr=1e-3, **defaults)
    for option, value, message in [("amsgrad", True, "KahanAdamW has amsgrad=True, which KahanAdamW does not step"),
                                   ("maximize", True, "KahanAdamW has maximize=True"),
                                   ("fused", True, "KahanAdamW: fused=True chooses how torch's AdamW runs its step"),
                                   ("foreach", True, "KahanAdamW: foreach=True chooses how"),
                                   ("capturable", True, "KahanAdamW: capturable=True chooses how"),
                                   ("differentiable", True, "KahanAdamW: differentiable=True chooses how")]:
        with pytest.raises(ValueError, match=message):
            KahanAdamW([weight], **{**defaults, option: value})


def test_a_tensor_learning_rate_steps_as_its_float():
    start, grads = (0.02 * torch.randn(30)).bfloat16(), [g.bfloat16() for g in gradients(30, 2)]
    tensor_lr, float_lr = (run(KahanAdamW, start, grads, lr=lr)[0] for lr in (torch.tensor(1e-3), 1e-3))
    assert torch.equal(tensor_lr, float_lr)


def test_torchs_adamw_argument_forms_are_taken_and_step_as_their_floats():
    """torch's AdamW takes numpy scalars, tensor betas and amsgrad as its sixth positional argument: KahanAdamW refused
    the first two and had amsgrad keyword-only, so code swapping torch's AdamW for it failed."""
    start, grads = (0.02 * torch.randn(30)).bfloat16(), [g.bfloat16() for g in gradients(30, 2)]
    lr, betas, eps, weight_decay = np.float32(1e-3), (torch.tensor(0.8), torch.tensor(0.99)), np.float64(1e-6), 0.1
    given, _ = run(lambda params: KahanAdamW(params, lr, betas, eps, weight_decay, False), start, grads)
    floats, _ = run(KahanAdamW, start, grads, lr=float(lr), betas=tuple(map(float, betas)), eps=float(eps),
                    weight_decay=weight_decay)
    assert torch.equal(given, floats) and not torch.equal(given, start)
    optimizer = KahanAdamW([torch.nn.Parameter(torch.ones(2))])
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "lr": lr, "betas": betas})
    with pytest.raises(ValueError, match="KahanAdamW has amsgrad=True"):
        KahanAdamW([torch.nn.Parameter(torch.ones(2))], lr, betas, eps, weight_decay, True)


def test_a_weight_without_gradient_is_not_stepped_and_closure_runs_with_grad():
    stepped, idle = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    optimizer = KahanAdamW([stepped, idle], lr=0.1)

    def closure():
        loss = (stepped * 2).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        assert float(optimizer.step(closure)) == 6.0
    assert not torch.equal(stepped, torch.ones(3)) and torch.equal(idle, torch.ones(3)) and idle not in optimizer.state


def test_the_step_inside_the_backward_gives_the_step_after_it():
    torch.manual_seed(6)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).bfloat16()]
    models.append(copy.deepcopy(models[0]))
    optimizers = [KahanAdamW(model.parameters(), lr=1e-4) for model in models]
    hooks = step_in_backward(optimizers[0])
    for _ in range(3):
        x = torch.randn(5, 8).bfloat16()
        for model in models:
            model(x).float().square().sum().backward()
        optimizers[1].step()
        optimizers[1].zero_grad(set_to_none=True)
    for hook in hooks:
        hook.remove()
    for ours, theirs in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(ours, theirs) and ours.grad is None


@pytest.mark.parametrize("option, message", [
    ({"betas": (0.9, 1.0)}, "betas: expected two floats in [0, 1)"),   # every weight NaN at the first step
    ({"betas": (0.9, 0.99, 0.5)}, "betas: expected two floats in [0, 1)"),   # an unpacking error inside step()
    ({"lr": -1.0}, "lr: expected a float >= 0"),   # climbed the gradient
    ({"eps": -1e-8}, "eps: expected a float >= 0"),
    ({"weight_decay": "0.1"}, "weight_decay: expected a float >= 0"),
])
def test_a_param_groups_own_options_are_checked_as_the_constructors(option, message):
    """Options given in a group (the usual way to give a group its own) were taken unchecked."""
    with pytest.raises(ValueError, match=re.escape(f"params: param group 1's {message}")):
        KahanAdamW([{"params": [torch.nn.Parameter(torch.ones(2))]},
                    {"params": [torch.nn.Parameter(torch.ones(3))], **option}], backend="torch")


def test_a_refused_param_group_is_not_kept():
    """A group added with a float16 parameter is refused, and not left in param_groups, where the next step stepped
    it in float16 after all (and a state dict saved it)."""
    weight, refused = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    optimizer = KahanAdamW([weight], lr=1e-2, backend="torch")
    with pytest.raises(ValueError, match="parameter 0 of group 1 is torch.float16"):
        optimizer.add_param_group({"params": [refused]})
    assert len(optimizer.param_groups) == 1
    weight.grad, refused.grad = torch.ones_like(weight), torch.ones_like(refused)
    optimizer.step()
    assert torch.equal(refused, torch.ones_like(refused)) and refused not in optimizer.state


@pytest.mark.parametrize("make, message", [
    (lambda: KahanAdamW([torch.nn.Parameter(torch.ones(2, dtype=torch.float16))]), "parameter 0 of group 0 is "
     "torch.float16; expected bfloat16 or float32"),
    (lambda: KahanAdamW([torch.nn.Parameter(torch.ones(2))]).add_param_group(
        {"params": [torch.nn.Parameter(torch.ones(2, dtype=torch.float64))]}),
     "parameter 0 of group 1 is torch.float64"),
    (lambda: KahanAdamW([torch.nn.Parameter(torch.ones(2))], lr=-1),
     "lr: expected a float >= 0 (or a one-element tensor), got -1"),
    (lambda: KahanAdamW([torch.nn.Parameter(torch.ones(2))], betas=(0.9, 1.0)), "betas: expected two floats in"),
    (lambda: KahanAdamW([torch.nn.Parameter(torch.ones(2))], lr=torch.tensor([1e-3, 1e-3])),
     "lr: expected a float >= 0 (or a one-element tensor), got tensor"),
    # three betas were taken, and every step then failed unpacking them; a string failed comparing, naming no argument
    (lambda: KahanAdamW([torch.nn.Parameter(torch.ones(2))], betas=(0.9, 0.99, 0.5)), "betas: expected two floats in"),
    (lambda: KahanAdamW([torch.nn.Parameter(torch.ones(2))], betas=("0.9", 0.99)), "betas: expected two floats in"),
    (lambda: KahanAdamW([torch.nn.Parameter(torch.ones(2))], eps=-1e-8), "eps: expected a float >= 0"),
    (lambda: KahanAdamW([torch.nn.Parameter(torch.ones(2))], weight_decay=None), "weight_decay: expected a float"),
    (lambda: KahanAdamW([torch.nn.Parameter(torch.ones(2))], backend="cuda"), "backend must be one of"),
])
def test_bad_arguments_are_errors_naming_them(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_the_bounds_of_each_argument_are_taken():
    """lr, eps and weight_decay of 0 and betas of 0 are AdamW's too (a frozen group, no decay, no averaging): taken,
    and lr=0 leaves the weights as they were."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = KahanAdamW([weight], lr=0, betas=(0.0, 0.0), eps=0, weight_decay=0)
    weight.grad = torch.ones(3)
    optimizer.step()
    assert torch.equal(weight, torch.ones(3))


def test_the_defaults_are_torchs_adamws():
    """Code that swaps torch's AdamW for KahanAdamW keeps its lr, betas, eps and weight_decay when it names none."""
    ours = KahanAdamW([torch.nn.Parameter(torch.ones(2))]).defaults
    theirs = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))]).defaults
    assert {k: ours[k] for k in ("lr", "betas", "eps", "weight_decay")} == \
        {k: theirs[k] for k in ("lr", "betas", "eps", "weight_decay")} == \
        dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


def test_a_sparse_gradient_is_an_error():
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    optimizer = KahanAdamW(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradient"):
        optimizer.step()


@pytest.mark.parametrize("refusal", ["maximize set on a later group", "a later parameter's sparse gradient"])
def test_a_refused_step_changes_nothing(refusal):
    """The refusal came after the parameters before the refused one had stepped (weights, moments and step counts):
    a caller who mends the group and steps again stepped those twice."""
    first, second = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16)), torch.nn.Parameter(torch.ones(4))
    optimizer = KahanAdamW([{"params": [first]}, {"params": [second]}], lr=0.1, backend="torch")
    first.grad, second.grad = torch.ones_like(first), torch.ones_like(second)
    if refusal.startswith("maximize"):
        optimizer.param_groups[1]["maximize"] = True
    else:
        second.grad = second.grad.to_sparse()
    with pytest.raises(ValueError):
        optimizer.step()
    assert torch.equal(first, torch.ones_like(first)) and not optimizer.state


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_step_never_waits_for_the_device(backend):
    """Nothing the step reads comes back to the host (the step count is a host tensor): on a GPU, a step of a
    parameter is queued behind the backward that made its gradient, as inside the backward it is."""
    from tests.sync_counter import SyncCounter
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    weights = [torch.nn.Parameter(torch.randn(40, device=device).bfloat16()), torch.nn.Parameter(torch.randn(7))]
    optimizer = KahanAdamW(weights, lr=1e-3, backend=backend)
    with SyncCounter() as counter:
        counter.mark(*weights)
        for _ in range(2):
            for weight in weights:
                weight.grad = counter.mark(torch.randn(weight.shape, device=weight.device).to(weight.dtype))
            optimizer.step()
    assert counter.total == 0, counter.syncs


def test_a_gradient_that_is_an_expanded_view_is_read_and_left_as_it_was():
    """A gradient of stride 0 (one value expanded, as a caller may set it) is stepped from a contiguous copy and never
    written back: writing into it raised (its elements share one memory location), and a gradient is only read."""
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    grad = torch.ones(1, dtype=torch.bfloat16)
    p.grad = grad.expand(4)
    KahanAdamW([p], lr=0.1, weight_decay=0.0).step()
    assert torch.equal(p.detach(), torch.full((4,), -0.1, dtype=torch.bfloat16)) and grad.item() == 1.0


@pytest.mark.parametrize("duplicate", [copy.deepcopy, lambda optimizer: pickle.loads(pickle.dumps(optimizer))],
                         ids=["deepcopy", "pickle"])
def test_a_copied_optimizer_steps_as_the_original(duplicate):
    """torch's Optimizer.__getstate__ keeps defaults, state and param_groups only: a copy (how trainers snapshot an
    optimizer) lost its backend, and its step raised AttributeError."""
    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    optimizer = KahanAdamW([weight], lr=0.1, backend="torch")
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    twin = duplicate(optimizer)
    twin_weight = twin.param_groups[0]["params"][0]
    assert twin.backend == "torch" and twin_weight is not weight
    weight.grad, twin_weight.grad = torch.ones_like(weight), torch.ones_like(twin_weight)
    optimizer.step()
    twin.step()
    assert torch.equal(twin_weight, weight) and torch.equal(twin.state[twin_weight]["compensation"],
                                                            optimizer.state[weight]["compensation"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_a_parameter_cast_after_it_was_added_is_refused_at_the_step(dtype):
    """The dtype was checked when a parameter was added only: after model.half() the step ran AdamW on float16
    weights (whose second moment underflows), after model.double() it stepped float64 weights in fp32."""
    model = torch.nn.Linear(4, 3)
    optimizer = KahanAdamW(model.parameters(), lr=1e-3, backend="torch")
    model.to(dtype)
    model(torch.randn(2, 4, dtype=dtype)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=re.escape(f"parameter 0 of param_groups[0] is {dtype}; expected bfloat16")):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)) and not optimizer.state


def test_the_moments_of_a_parameter_cast_to_bf16_after_its_steps_take_its_dtype_on_both_backends():
    """After fp32 steps and model.to(torch.bfloat16), exp_avg and exp_avg_sq stayed fp32, against the docstring ("in
    the parameter's dtype", as torch's load_state_dict casts them): they are cast at the next step, to the same bits
    on both backends."""
    def stepped(backend, device):
        weight = torch.nn.Parameter(0.02 * torch.randn(33, 17, generator=torch.Generator().manual_seed(6)).to(device))
        optimizer = KahanAdamW([weight], lr=1e-3, backend=backend)
        grads = gradients((33, 17), 4, seed=7)
        for grad in grads[:2]:
            weight.grad = grad.to(device)
            optimizer.step()
        weight.data = weight.data.bfloat16()   # what model.to(torch.bfloat16) does to it
        for grad in grads[2:]:
            weight.grad = grad.to(device, torch.bfloat16)
            optimizer.step()
        return {name: tensor.detach().cpu() for name, tensor in [("weight", weight), *optimizer.state[weight].items()]
                if name != "step"}

    expected = stepped("torch", "cpu")
    assert {name: t.dtype for name, t in expected.items()} == dict.fromkeys(
        ("weight", "exp_avg", "exp_avg_sq", "compensation"), torch.bfloat16)
    got = stepped("triton", TRITON_DEVICE)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_parameter_cast_to_fp32_after_bf16_steps_steps_as_adamw_without_its_compensation(backend):
    """After bf16 steps and model.float(), the bf16 compensation stayed in the state and went into the fp32 steps,
    against the docstring (fp32 parameters step as AdamW, without compensation): it is dropped at the next step,
    which then equals torch's AdamW's from the same moments."""
    device = "cpu" if backend == "torch" else TRITON_DEVICE
    weight = torch.nn.Parameter((0.02 * torch.randn(33, 17, generator=torch.Generator().manual_seed(8))).bfloat16()
                                .to(device))
    optimizer = KahanAdamW([weight], lr=1e-3, backend=backend)
    grads = gradients((33, 17), 3, seed=9)
    for grad in grads[:2]:
        weight.grad = grad.to(device, torch.bfloat16)
        optimizer.step()
    weight.data = weight.data.float()
    state = optimizer.state[weight]
    twin = torch.nn.Parameter(weight.detach().clone())
    adamw = torch.optim.AdamW([twin], lr=1e-3)
    adamw.state[twin] = {name: state[name].float().clone() for name in ("step", "exp_avg", "exp_avg_sq")}
    weight.grad, twin.grad = grads[2].to(device), grads[2].to(device)
    optimizer.step()
    adamw.step()
    assert "compensation" not in optimizer.state[weight]
    torch.testing.assert_close(weight.detach(), twin.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shapes", [((6, 4), (4, 6)), ((1,), (4,))], ids=["same numel", "other numel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_loaded_state_of_another_shape_is_refused_before_anything_steps(shapes, dtype):
    """A state dict loaded into an optimizer that lists the parameters in another order (torch maps states by
    position, checking no shapes): moments with as many elements were stepped silently through flat views (an MLP's
    up_proj state stepping down_proj), with another number the weights were updated and counted before a RuntimeError
    from deep inside torch."""
    first, second = (torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape in shapes)
    saved = KahanAdamW([first, second], lr=0.1, backend="torch")
    first.grad, second.grad = torch.ones_like(first), torch.ones_like(second)
    saved.step()
    optimizer = KahanAdamW([second, first], lr=0.1, backend="torch")
    optimizer.load_state_dict(saved.state_dict())
    weights = [first.detach().clone(), second.detach().clone()]
    with pytest.raises(ValueError, match=re.escape(f"parameter 0 of param_groups[0] has shape {shapes[1]} but its "
                                                   f"state's exp_avg has shape {shapes[0]}")):
        optimizer.step()
    assert torch.equal(first, weights[0]) and torch.equal(second, weights[1])
    assert [float(optimizer.state[p]["step"]) for p in (first, second)] == [1.0, 1.0]


@pytest.mark.parametrize("option", [{"lr": float("nan")}, {"lr": torch.tensor(float("nan"))}, {"eps": float("nan")},
                                    {"weight_decay": float("nan")}, {"betas": (0.9, float("nan"))}],
                         ids=["lr", "tensor lr", "eps", "weight_decay", "betas"])
def test_a_nan_option_is_refused(option):
    """lr=nan passed the check (`lr < 0` is False for NaN), where torch's AdamW refuses it: the first step made every
    weight NaN. Given to the constructor or in a group."""
    (name, value), = option.items()
    with pytest.raises(ValueError, match=f"^{name}: expected"):
        KahanAdamW([torch.nn.Parameter(torch.ones(2))], **option)
    optimizer = KahanAdamW([torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match=f"param group 1's {name}: expected"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], **option})
    assert len(optimizer.param_groups) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_tensors_step_on_the_torch_backend_and_are_refused_on_the_triton_one_naming_the_parameter(dtype):
    """Under FakeTensorMode (torch.export, FLOP and memory estimators trace a training step in it) the Triton backend
    failed deep inside torch ("Attempted to set the storage of a tensor on device meta", "Cannot copy out of meta
    tensor; no data!"), naming neither the optimizer nor the cause, after counting the parameter's step: it is refused
    before anything steps, naming the parameter. The torch backend steps them, fake tensors used outside the mode too
    (a real tensor it made beside them was refused by torch)."""
    fake = FakeTensorMode()
    with fake:
        weights = {backend: torch.nn.Parameter(torch.empty(4, 3, dtype=dtype, device=TRITON_DEVICE))
                   for backend in ("torch", "triton")}
        for weight in weights.values():
            weight.grad = torch.empty_like(weight)
    optimizers = {backend: KahanAdamW([weight], backend=backend) for backend, weight in weights.items()}
    for mode in (fake, contextlib.nullcontext()):
        with mode:
            optimizers["torch"].step()
            with pytest.raises(ValueError, match=r"KahanAdamW: parameter 0 of param_groups\[0\] on the Triton backend "
                                                 "cannot run on fake tensors"):
                optimizers["triton"].step()
    assert int(optimizers["torch"].state[weights["torch"]]["step"]) == 2
    assert optimizers["triton"].state[weights["triton"]] == {}   # (its step not counted)


def test_a_triton_step_checks_for_fake_tensors_once_not_once_per_parameter(monkeypatch):
    """Fake tensors come together, so the first parameter on the Triton backend stands for all: the check (~8 us)
    runs once a step, not once per parameter."""
    calls = []
    real = kahan_module.refuse_fake_tensors_on_triton
    monkeypatch.setattr(kahan_module, "refuse_fake_tensors_on_triton", lambda *a: calls.append(a) or real(*a))
    weights = [torch.nn.Parameter(torch.randn(4, 3, device=TRITON_DEVICE)) for _ in range(3)]
    for w in weights:
        w.grad = torch.randn_like(w)
    optimizer = KahanAdamW(weights, backend="triton")
    optimizer.step()
    optimizer.step()
    assert len(calls) == 2


def test_fake_tensors_are_refused_on_the_triton_backend_after_a_parameter_on_the_torch_one(monkeypatch):
    """With backend='auto', a CPU parameter (the torch launcher) before a CUDA one (Triton) does not stand for it: the
    Triton parameter's fake tensors are still refused by name (select_backend stands in for the two devices)."""
    launchers = iter([select_backend("kahan_adamw", "torch", torch.device("cpu")),
                      select_backend("kahan_adamw", "triton", torch.device(TRITON_DEVICE))])
    monkeypatch.setattr(kahan_module, "select_backend", lambda *a, **k: next(launchers))
    with FakeTensorMode():
        weights = [torch.nn.Parameter(torch.empty(4, 3)) for _ in range(2)]
        for w in weights:
            w.grad = torch.empty_like(w)
        with pytest.raises(ValueError, match=r"parameter 1 of param_groups\[0\] on the Triton backend cannot run on "
                                             "fake tensors"):
            KahanAdamW(weights, backend="auto").step()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_compiled_step_of_bf16_weights_gives_the_eager_steps_bits(backend):
    """torch.compile(optimizer.step), PyTorch's recipe for compiling an optimizer: inductor fused the bf16 weight's
    write with the compensation's read of it and took the unrounded fp32 sum for the rounded weight, so the
    compensation lost what rounding dropped (weight + compensation 50% off AdamW's path after 30 steps, 0.45%
    eager). The step runs outside the graph: the eager step's bits. Dynamo traced into the Triton step's kernel
    launch, which crashed under Triton's interpreter."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    start = (0.02 * torch.randn(512, generator=torch.Generator().manual_seed(0))).bfloat16().to(device)
    compiled_weight, eager_weight = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    compiled, eager = (KahanAdamW([w], lr=1e-5, backend=backend) for w in (compiled_weight, eager_weight))
    torch._dynamo.reset()
    compiled_step = torch.compile(compiled.step)
    for grad in gradients(512, 3):
        compiled_weight.grad, eager_weight.grad = grad.bfloat16().to(device), grad.bfloat16().to(device)
        compiled_step()
        eager.step()
    assert torch.equal(compiled_weight, eager_weight)
    assert torch.equal(compiled.state[compiled_weight]["compensation"], eager.state[eager_weight]["compensation"])


def test_the_default_device_leaves_the_step_count_on_the_host():
    """torch.set_default_device put a fresh state's step count, read at every step, where the default device was: on
    a GPU a wait a parameter a step; with 'meta' (the weights on the CPU), the step failed with torch's
    'Tensor.item() cannot be called on meta tensors'. torch's AdamW keeps it on the CPU."""
    start, grads = torch.randn(64), gradients(64, 2)
    want, _ = run(torch.optim.AdamW, start, grads, lr=1e-3)
    torch.set_default_device("meta")
    try:
        got, optimizer = run(KahanAdamW, start, grads, lr=1e-3)
    finally:
        torch.set_default_device(None)
    assert optimizer.state[optimizer.param_groups[0]["params"][0]]["step"].device.type == "cpu"
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
