"""The optimizer's step inside the backward pass (fastalign/unlearn/backward_step.py) against a step after it."""
import copy
import warnings

import pytest
import torch

from fastalign.unlearn.backward_step import run_step, step_in_backward
from fastalign.unlearn.optimizer import adamw
from tests.conftest import requires_cuda
from tests.unlearn.tiny import tiny_llama


def trained(model, in_backward, steps=3, foreach=None):
    """The parameters of `model` after `steps` AdamW steps on random tokens (a linear learning-rate decay, weight
    decay on), stepped after each backward or inside it; and the most parameters that held a gradient at once. On
    CUDA the trainer's AdamW (torch's fused for fp32, KahanAdamW's kernel for bf16), else torch's with `foreach`."""
    optimizer = (adamw(list(model.parameters()), lr=1e-2, weight_decay=0.1) if model.device.type == "cuda" else
                 torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=foreach))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / 10)
    params = list(model.parameters())
    most = [0]

    def count(_):
        most[0] = max(most[0], sum(p.grad is not None for p in params))
    watchers = [p.register_post_accumulate_grad_hook(count) for p in params]   # before the step's: sees them all
    handles = step_in_backward(optimizer) if in_backward else []
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(model.config.vocab_size, (3, 9), generator=g).to(model.device)
        model(ids, labels=ids).loss.backward()
        if not in_backward:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    for handle in handles + watchers:
        handle.remove()
    return [p.detach().clone() for p in params], most[0]


@pytest.mark.parametrize("foreach", [False, True])
def test_a_step_in_the_backward_is_the_step_after_it(foreach):
    """Bit for bit the same weights after three steps, with one parameter's gradient at a time instead of all."""
    model = tiny_llama(50)
    after, most_after = trained(copy.deepcopy(model), False, foreach=foreach)
    inside, most_inside = trained(copy.deepcopy(model), True, foreach=foreach)
    assert all(torch.equal(a, b) for a, b in zip(after, inside))
    assert most_after == len(after) and most_inside == 1


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_step_in_the_backward_is_the_fused_step_after_it(dtype):
    """The trainer's CUDA optimizer (torch's fused AdamW in fp32, KahanAdamW in bf16) stepped one parameter at a time
    in the backward: the same weights, bit for bit, as its step over all of them after the backward."""
    model = tiny_llama(50).to("cuda", dtype)
    (after, _), (inside, most) = (trained(copy.deepcopy(model), flag) for flag in (False, True))
    assert all(torch.equal(a, b) for a, b in zip(after, inside)) and most == 1
    assert not all(torch.equal(a, b) for a, b in zip(after, model.parameters()))


def test_a_parameter_without_a_gradient_is_left_alone():
    """A frozen parameter gets no hook, and a trainable one the loss does not reach keeps its weights and state."""
    model = tiny_llama(50)
    model.model.embed_tokens.requires_grad_(False)
    unused = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([*filter(lambda p: p.requires_grad, model.parameters()), unused], lr=1e-2)
    handles = step_in_backward(optimizer)
    assert len(handles) == sum(p.requires_grad for p in model.parameters()) + 1
    ids = torch.randint(50, (2, 5))
    model(ids, labels=ids).loss.backward()
    assert torch.equal(unused.detach(), torch.ones(3)) and unused not in optimizer.state
    assert all(p.grad is None for p in model.parameters())
    assert len(optimizer.state) == len(handles) - 1


def test_an_optimizer_over_frozen_parameters_hooks_the_trainable_ones_only():
    """An optimizer built over all of model.parameters() with some frozen: the frozen get no hook (torch refuses one on
    a tensor that requires no grad) and keep their weights; the others are stepped in the backward."""
    model = tiny_llama(50)
    model.model.embed_tokens.requires_grad_(False)
    frozen = model.model.embed_tokens.weight.detach().clone()
    trained_before = model.lm_head.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    handles = step_in_backward(optimizer)
    assert len(handles) == sum(p.requires_grad for p in model.parameters())
    ids = torch.randint(50, (2, 5))
    model(ids, labels=ids).loss.backward()
    for handle in handles:
        handle.remove()
    assert torch.equal(model.model.embed_tokens.weight, frozen)
    assert not torch.equal(model.lm_head.weight, trained_before) and model.lm_head.weight.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_hook_steps_its_own_parameter_alone_in_its_own_group(dtype):
    """Each hook ran the optimizer's step() over every group's parameters, most without a gradient: N reads of the
    groups in each of N hooks, O(N^2) host time per backward (KahanAdamW checks each parameter it reads). step() now
    sees the hooked parameter alone, in its own group (its learning rate and weight decay), and the groups are whole
    again after the backward; the weights are those of a step after it, bit for bit (KahanAdamW for bf16 weights)."""
    model = tiny_llama(50).to(dtype)
    params = list(model.parameters())

    def step_twice(in_backward):
        weights = [p.detach().clone() for p in params]
        for p, w in zip(params, weights):
            p.data.copy_(w)
        optimizer = adamw(params[:4], lr=1e-2, weight_decay=0.1)
        optimizer.add_param_group({"params": params[4:], "lr": 3e-2, "weight_decay": 0.0})
        seen = []
        optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: seen.append([(g["lr"], len(g["params"])) for g in opt.param_groups]))
        handles = step_in_backward(optimizer) if in_backward else []
        ids = torch.randint(50, (2, 5), generator=torch.Generator().manual_seed(0))
        for _ in range(2):
            model(ids, labels=ids).loss.backward()
            if not in_backward:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for handle in handles:
            handle.remove()
        assert [len(g["params"]) for g in optimizer.param_groups] == [4, len(params) - 4]
        stepped = [p.detach().clone() for p in params]
        for p, w in zip(params, weights):
            p.data.copy_(w)
        return stepped, seen

    after, _ = step_twice(False)
    inside, seen = step_twice(True)
    assert all(torch.equal(a, b) for a, b in zip(after, inside))
    assert sorted(seen) == sorted(([[(1e-2, 1)]] * 4 + [[(3e-2, 1)]] * (len(params) - 4)) * 2)


def test_a_step_in_the_backward_runs_no_profiling_wrapper_per_parameter(monkeypatch):
    """torch wraps every Optimizer's step in a record_function and the step hooks' loops: in the backward that ran
    once per parameter (55 Python calls each, more host time than a one-parameter step). With no step hook and no
    profiler it is skipped; the LR scheduler still sees that the optimizer stepped (no warning that its step came
    first), and a step hook registered later sees every parameter's step again."""
    model = tiny_llama(50)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / 10)
    handles = step_in_backward(optimizer)
    record_function, names = torch.autograd.profiler.record_function, []

    def counting(name, *args):
        names.append(name)
        return record_function(name, *args)
    monkeypatch.setattr(torch.autograd.profiler, "record_function", counting)
    ids = torch.randint(50, (2, 5))
    model(ids, labels=ids).loss.backward()
    assert [name for name in names if name.startswith("Optimizer.step")] == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler.step()
    seen = []
    optimizer.register_step_pre_hook(lambda *_: seen.append(1))
    model(ids, labels=ids).loss.backward()
    assert len(seen) == len(params)
    for handle in handles:
        handle.remove()


def test_a_step_the_user_replaced_on_the_optimizer_is_the_one_run():
    """A step() replaced on the optimizer (a wrapper that clips the gradient, logs or counts) is run once per call, as
    optimizer.step() would: skipping to the class's step was an update of another size, silently."""
    p = torch.nn.Parameter(torch.randn(3))
    optimizer = torch.optim.SGD([p], lr=0.1)
    step, calls = optimizer.step, []

    def clipping(*args, **kwargs):
        calls.append(1)
        torch.nn.utils.clip_grad_norm_([p], 0.01)
        return step(*args, **kwargs)
    optimizer.step = clipping
    before, grad = p.detach().clone(), torch.randn(3) * 10
    p.grad = grad.clone()
    run_step(optimizer)
    assert len(calls) == 1
    torch.testing.assert_close(p.detach(), before - 0.1 * grad * 0.01 / (grad.norm() + 1e-6))   # clip_grad_norm_'s


def test_a_step_under_a_profiler_appears_in_its_trace():
    """While a profiler runs, the step is optimizer.step() itself, with torch's record_function: the trace shows it."""
    p = torch.nn.Parameter(torch.randn(3))
    optimizer = torch.optim.SGD([p], lr=0.1)
    p.grad = torch.randn(3)
    with torch.profiler.profile() as profile:
        run_step(optimizer)
    assert "Optimizer.step#SGD.step" in {event.name for event in profile.events()}
