"""grads_in_forward=True of both fused losses against their float64 references, on every backend."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fastalign
from fastalign.kernels import chunked_backward
from fastalign.reference.linear_losses import linear_cross_entropy_reference, linear_kl_div_reference
from tests.compare import REL_TOL, assert_rel_close, grads_of
from tests.conftest import TRITON_DEVICE, device_for, triton_cases
from tests.ops import test_linear_cross_entropy as ce_tests, test_linear_kl_div as kl_tests

BACKENDS = ["torch", "triton"]
SHAPES = ce_tests.SHAPES   # one token, V a multiple of no block size; the interpreter's blocks are 16 rows


def cross_entropy_case(shape, dtype=torch.float32, backend="torch", ignored=0.2, softcap=None):
    """(op, reference, differentiable inputs) of a weighted cross-entropy with a bias: op(reduction, **options)."""
    hidden, weight, target, extra = ce_tests.make_inputs(*shape, dtype=dtype, device=device_for(backend), bias=True,
                                                         weighted=True, ignored=ignored)

    def op(reduction, **options):
        return fastalign.linear_cross_entropy(hidden, weight, target, reduction=reduction, backend=backend,
                                              softcap=softcap, **extra, **options)

    def reference(reduction):
        return linear_cross_entropy_reference(hidden, weight, target, reduction=reduction, softcap=softcap, **extra)
    return op, reference, [hidden, weight, extra["bias"]]


def kl_case(shape, dtype=torch.float32, backend="torch", shared=True, masked=0.2, softcap=None, closeness=None):
    """(op, reference, differentiable inputs) of a weighted KL with biases (the reference head shared or not)."""
    hidden, weight, ref_hidden, ref_weight, extra = kl_tests.make_inputs(
        *shape, dtype=dtype, device=device_for(backend), shared=shared, weighted=True, bias=True, masked=masked,
        closeness=closeness)
    # positive weights, as unlearning's: the loss of signed ones may cancel to far below its terms' rounding
    extra["token_weight"] = extra["token_weight"].abs()

    def op(reduction, **options):
        return fastalign.linear_kl_div(hidden, weight, ref_hidden, ref_weight, reduction=reduction, backend=backend,
                                       softcap=softcap, **extra, **options)

    def reference(reduction):
        return linear_kl_div_reference(hidden, weight, ref_hidden, ref_weight, reduction=reduction, softcap=softcap,
                                       **extra)
    return op, reference, [hidden, weight, extra["bias"]]


def check(case, reduction, rel):
    """The loss and its gradients under a random upstream gradient (of either sign) agree with the reference."""
    op, reference, inputs = case
    out, ref = op(reduction, grads_in_forward=True), reference(reduction)
    assert_rel_close("loss", out, ref, rel)
    seed = torch.randn((), device=out.device)
    for name, got, want in zip(["d_hidden", "d_weight", "d_bias"], grads_of(out, inputs, seed),
                               grads_of(ref, inputs, seed)):
        assert got.dtype == inputs[["d_hidden", "d_weight", "d_bias"].index(name)].dtype
        assert_rel_close(name, got, want, rel)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_cross_entropy_matches_reference_fp32(backend, shape, reduction, softcap):
    check(cross_entropy_case(shape, backend=backend, softcap=softcap), reduction, REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shared,softcap", [(True, None), (False, None), (True, 3.0)])
def test_kl_matches_reference_fp32(backend, shape, reduction, shared, softcap):
    check(kl_case(shape, backend=backend, shared=shared, softcap=softcap), reduction, REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [False, True])
def test_kl_near_zero_keeps_its_accuracy(backend, shared):
    """A policy close to its reference (unlearning's KL term near its start), held to the bounds of the default path's
    test (test_linear_kl_div.py::test_policy_close_to_reference): ~1e-6 absolute per token, gradients 1e-3 (16-bit
    operands: test_16_bit_operands_give_fp32_logits)."""
    hidden, weight, ref_hidden, ref_weight, extra = kl_tests.make_inputs(
        13, 24, 131, shared=shared, closeness=1e-2, bias=True, masked=0.0, device=device_for(backend))
    out = fastalign.linear_kl_div(hidden, weight, ref_hidden, ref_weight, reduction="sum", backend=backend,
                                  grads_in_forward=True, **extra)
    ref = linear_kl_div_reference(hidden, weight, ref_hidden, ref_weight, reduction="sum", **extra)
    assert ref > 1e-4 and abs(out.item() - ref.item()) <= 13 * 2e-6
    inputs = kl_tests.differentiable(hidden, weight, extra)
    for name, got, want in zip(["d_hidden", "d_weight", "d_bias"], torch.autograd.grad(out, inputs),
                               torch.autograd.grad(ref, inputs)):
        assert_rel_close(name, got, want, 1e-3)


@pytest.mark.parametrize("shape", triton_cases(SHAPES[1:], gpu_only=[(300, 64, 5000)]))
def test_bfloat16_on_the_triton_backend(shape):
    """16-bit operands: fp32 logits from the library matmul, a bf16 G."""
    check(cross_entropy_case(shape, torch.bfloat16, "triton"), "mean", REL_TOL[torch.bfloat16])
    check(kl_case(shape, torch.bfloat16, "triton"), "sum", REL_TOL[torch.bfloat16])


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_is_refused_where_its_gradients_would_overflow(backend):
    """The gradients taken for an upstream gradient of 1 and rounded to the inputs' dtype are scaled after: 2048
    tokens of one target, summed (as a loss divided by num_items_in_batch is), push d_weight past float16's 65504,
    a true gradient of ~48. The default path scales before it rounds and stays finite; grads_in_forward refuses."""
    n, h, v = 2048, 16, 40
    generator = torch.Generator().manual_seed(0)
    hidden = (48 + torch.randn(n, h, generator=generator)).to(device_for(backend), torch.float16)
    weight = (torch.randn(v, h, generator=generator) / h ** 0.5).to(device_for(backend), torch.float16)
    weight.requires_grad_()
    target = torch.zeros(n, dtype=torch.long)   # one frequent token (an end of sequence), others now and then
    target[::7] = torch.randint(0, v, (len(target[::7]),), generator=generator)
    target = target.to(hidden.device)
    loss = fastalign.linear_cross_entropy(hidden, weight, target, reduction="sum", backend=backend)
    (d_weight,) = torch.autograd.grad(loss / n, [weight])
    summed = linear_cross_entropy_reference(hidden, weight, target, reduction="sum")
    (d_summed,) = torch.autograd.grad(summed, [weight])   # what is rounded before the division
    assert d_weight.isfinite().all() and d_summed.abs().max() > torch.finfo(torch.float16).max
    for op in (lambda: fastalign.linear_cross_entropy(hidden, weight, target, reduction="sum", backend=backend,
                                                      grads_in_forward=True),
               lambda: fastalign.linear_kl_div(hidden, weight, hidden, weight.detach(), backend=backend,
                                               grads_in_forward=True)):
        with pytest.raises(ValueError, match=r"grads_in_forward=True needs hidden and weight in float32, bfloat16 or "
                                             r"float64, got torch.float16 and torch.float16: .* overflow float16"):
            op()



@pytest.mark.parametrize("make_case", [cross_entropy_case, kl_case], ids=["ce", "kl"])
def test_float16_from_an_enclosing_autocast_is_named_as_its_cause(make_case):
    """CausalLMLoss on an fp32 model under a float16 autocast casts the head's operands to float16, as the model's
    lm_head would: the refusal blamed float16 inputs that the user never passed, and named no autocast."""
    op, _, _ = make_case((13, 24, 131), dtype=torch.float16)
    with pytest.raises(ValueError, match=r"got torch.float16 and torch.float16: .* overflow float16") as plain:
        op("sum", grads_in_forward=True)
    assert "autocast" not in str(plain.value)
    with torch.autocast("cpu", dtype=torch.float16):
        with pytest.raises(ValueError, match=r"float16 here from the enclosing float16 autocast.*"
                                             r"torch.autocast\(dtype=torch.bfloat16\)"):
            op("sum", grads_in_forward=True)

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make_case", [lambda b: cross_entropy_case((13, 24, 131), backend=b, ignored=1.0),
                                       lambda b: kl_case((13, 24, 131), backend=b, masked=1.0)], ids=["ce", "kl"])
def test_no_live_token_gives_zero_loss_and_gradients(backend, make_case):
    op, _, inputs = make_case(backend)
    out = op("mean", grads_in_forward=True)
    assert out.item() == 0.0
    for grad in torch.autograd.grad(out, inputs):
        assert grad.abs().max().item() == 0.0


@pytest.mark.parametrize("make_case", [cross_entropy_case, kl_case], ids=["ce", "kl"])
def test_one_product_with_the_weight_fewer(make_case):
    """The torch backend's matmul work with grads_in_forward: the forward's products (one per head) and the gradient
    products, without the backward's recomputation of the logits (counted by FlopCounterMode)."""
    n, h, v = 40, 40, 1000
    op, _, inputs = make_case((n, h, v), ignored=0.0) if make_case is cross_entropy_case else make_case(
        (n, h, v), masked=0.0)
    flops = {}
    for in_forward in (False, True):
        with FlopCounterMode(display=False) as counter:
            out = op("sum", grads_in_forward=in_forward)
            torch.autograd.grad(out, inputs)
        flops[in_forward] = counter.get_total_flops()
    heads = 1 if make_case is cross_entropy_case else 2
    assert flops[False] - flops[True] == 2 * n * h * v * heads   # FlopCounterMode misses d_weight's in-place addmm_
    assert flops[True] == 2 * n * h * v * (heads + 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make_case", [cross_entropy_case, kl_case], ids=["ce", "kl"])
def test_a_second_backward_is_refused_by_name(backend, make_case):
    op, _, inputs = make_case((13, 24, 131), backend=backend)
    out = op("sum", grads_in_forward=True)
    torch.autograd.grad(out, inputs, retain_graph=True)
    with pytest.raises(RuntimeError, match="grads_in_forward=True.*once"):
        torch.autograd.grad(out, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op_name", ["ce", "kl"])
def test_under_torch_func_grad(backend, op_name):
    """torch.func.grad takes one backward per forward: the forward's gradients serve it."""
    device = device_for(backend)
    hidden, weight, target, extra = ce_tests.make_inputs(13, 24, 131, device=device, weighted=True)
    ref_hidden = torch.randn_like(hidden)

    def loss(h, in_forward):
        if op_name == "ce":
            return fastalign.linear_cross_entropy(h, weight.detach(), target, token_weight=extra["token_weight"],
                                                  reduction="sum", backend=backend, grads_in_forward=in_forward)
        return fastalign.linear_kl_div(h, weight.detach(), ref_hidden, weight.detach(), reduction="sum",
                                       backend=backend, grads_in_forward=in_forward)

    got, want = (torch.func.grad(loss)(hidden.detach(), in_forward) for in_forward in (True, False))
    assert_rel_close("d_hidden", got, want, REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make_case", [cross_entropy_case, kl_case], ids=["ce", "kl"])
def test_a_gradient_that_could_be_differentiated_again_is_refused_by_name(backend, make_case):
    """The forward's gradients have no graph: under create_graph=True (a gradient penalty) or a grad transform inside
    another, their derivative came out silently zero; the default path refuses it once it is taken."""
    op, _, inputs = make_case((13, 24, 131), backend=backend)
    name = "linear_cross_entropy" if make_case is cross_entropy_case else "linear_kl_div"
    out = op("sum", grads_in_forward=True) + inputs[0].pow(2).sum()
    with pytest.raises(RuntimeError, match=rf"{name}\(grads_in_forward=True\) .* refuses create_graph=True"):
        torch.autograd.grad(out, inputs[0], create_graph=True)

    def penalty(hidden, grads_in_forward):
        def loss(h):
            return fastalign.linear_cross_entropy(h, inputs[1].detach(), torch.zeros(13, dtype=torch.long,
                                                                                       device=h.device),
                                                  backend=backend, grads_in_forward=grads_in_forward)
        return torch.func.grad(loss)(hidden).pow(2).sum()
    for grads_in_forward, message in ((True, "grad transform inside another"), (False, "not twice differentiable")):
        with pytest.raises(RuntimeError, match=message):
            torch.func.grad(penalty)(inputs[0].detach(), grads_in_forward)


@pytest.mark.parametrize("make_case", [cross_entropy_case, lambda shape: kl_case(shape, shared=False)],
                         ids=["ce", "kl"])
def test_compiled_autograd_beside_a_layer_op_takes_the_forwards_gradients(make_case):
    """Under compiled autograd, the backward of rms_norm, traced by dynamo, leaves grad mode on for the nodes after
    it (torch 2.13): a plain backward was refused as create_graph=True. A real create_graph=True is still refused."""
    op, reference, inputs = make_case((13, 24, 131))
    x, norm_weight = torch.randn(5, 24, requires_grad=True), torch.randn(24, requires_grad=True)
    expected = torch.autograd.grad(reference("sum") + fastalign.rms_norm(x, norm_weight).sum(),
                                   inputs + [x, norm_weight])

    def step(create_graph):
        loss = op("sum", grads_in_forward=True) + fastalign.rms_norm(x, norm_weight).sum()
        loss.backward(create_graph=create_graph)

    torch._dynamo.reset()
    with torch._dynamo.config.patch(compiled_autograd=True):
        torch.compile(step, backend="eager")(False)
        for name, tensor, want in zip(["d_hidden", "d_weight", "d_bias", "d_x", "d_norm_weight"],
                                      inputs + [x, norm_weight], expected):
            assert_rel_close(name, tensor.grad, want, REL_TOL[torch.float32])
        with pytest.raises(RuntimeError, match=r"grads_in_forward=True\) .* refuses create_graph=True"):
            torch.compile(step, backend="eager")(True)
    torch._dynamo.reset()

def loss_of_weight(op_name, backend, grads_in_forward=True):
    """(loss(weight, hidden, target) of the op, a batch of two samples' (weight, hidden [2, 5, 24], target [2, 5]))."""
    device = device_for(backend)
    hidden, weight, target, _ = ce_tests.make_inputs(10, 24, 131, device=device)
    hidden, target = hidden.detach().view(2, 5, 24), target.view(2, 5)

    def loss(w, h, y):
        if op_name == "ce":
            return fastalign.linear_cross_entropy(h, w, y, backend=backend, grads_in_forward=grads_in_forward)
        return fastalign.linear_kl_div(h, w, h.flip(0), w.detach() / 2, backend=backend,
                                       grads_in_forward=grads_in_forward)
    return loss, (weight.detach(), hidden, target)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op_name", ["ce", "kl"])
def test_a_batched_backward_scales_each_sample_by_its_own_upstream_gradient(backend, op_name):
    """vmap over vjp's function and jacrev of several outputs: the backward scaled the forward's gradients in place,
    once per sample, so every sample got the last one's scale (a silently wrong Jacobian)."""
    loss, (weight, hidden, target) = loss_of_weight(op_name, backend)
    expected = torch.func.grad(loss_of_weight(op_name, backend, grads_in_forward=False)[0])(weight, hidden[0],
                                                                                             target[0])
    _, vjp_of = torch.func.vjp(lambda w: loss(w, hidden[0], target[0]), weight)
    (by_vjp,) = torch.func.vmap(vjp_of)(torch.tensor([1.0, -3.0], device=weight.device))
    by_jacrev = torch.func.jacrev(lambda w: loss(w, hidden[0], target[0]) * torch.tensor([2.0, 1.0],
                                                                                          device=weight.device))(weight)
    for got, scale in zip([*by_vjp, *by_jacrev], [1.0, -3.0, 2.0, 1.0]):
        assert_rel_close("d_weight", got, scale * expected, REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op_name", ["ce", "kl"])
def test_vmap_with_a_weight_that_requires_grad(backend, op_name):
    """Per-sample losses and gradients under vmap where the weight requires grad (a model's lm_head): vmap's rule
    sliced the tuple argument of the gradients to take (AttributeError: 'tuple' object has no attribute 'select')."""
    loss, (weight, hidden, target) = loss_of_weight(op_name, backend)
    plain = loss_of_weight(op_name, backend, grads_in_forward=False)[0]
    losses = torch.func.vmap(loss, in_dims=(None, 0, 0))(weight.requires_grad_(), hidden, target)
    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(weight.detach(), hidden, target)
    for i in range(2):
        assert_rel_close("loss", losses[i], plain(weight.detach(), hidden[i], target[i]), REL_TOL[torch.float32])
        assert_rel_close("d_weight", grads[i], torch.func.grad(plain)(weight.detach(), hidden[i], target[i]),
                         REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_a_gradient_to_take_it_is_a_plain_forward(backend, monkeypatch):
    """Under no_grad, or with no input that requires grad, nothing is taken in the forward pass."""
    op, reference, inputs = cross_entropy_case((13, 24, 131), backend=backend)
    launcher = fastalign.ops.backend.select_backend("linear_cross_entropy", backend, inputs[0].device)
    monkeypatch.setattr(launcher, "forward_with_gradients", None)   # calling it would fail
    with torch.no_grad():
        assert_rel_close("loss", op("sum", grads_in_forward=True), reference("sum"), REL_TOL[torch.float32])
    for t in inputs:
        t.requires_grad_(False)
    assert_rel_close("loss", op("sum", grads_in_forward=True), reference("sum"), REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_gradients_asked_for_are_taken(backend, monkeypatch):
    """A frozen head (LoRA) takes d_hidden alone; frozen hidden states (a trained head) d_weight and d_bias alone."""
    launcher = fastalign.ops.backend.select_backend("linear_cross_entropy", backend, torch.device(
        device_for(backend)))
    asked = []
    original = launcher.forward_with_gradients

    def spy(*args):
        asked.append(args[5:8])   # need_weight_grad, need_bias_grad, need_hidden_grad
        return original(*args)

    monkeypatch.setattr(launcher, "forward_with_gradients", spy)
    for frozen in ([1, 2], [0]):
        op, reference, inputs = cross_entropy_case((13, 24, 131), backend=backend)
        for i in frozen:
            inputs[i].requires_grad_(False)
        trained = [t for t in inputs if t.requires_grad]
        out, ref = op("sum", grads_in_forward=True), reference("sum")
        for got, want in zip(torch.autograd.grad(out, trained), torch.autograd.grad(ref, trained)):
            assert_rel_close("gradient", got, want, REL_TOL[torch.float32])
    assert asked == [(False, False, True), (True, True, False)]


@pytest.mark.parametrize("make_op,message", [
    (lambda: cross_entropy_case((13, 24, 131))[0]("none", grads_in_forward=True), "needs reduction 'sum' or 'mean'"),
    (lambda: kl_case((13, 24, 131))[0]("none", grads_in_forward=True), "needs reduction 'sum' or 'mean'"),
    (lambda: cross_entropy_case((13, 24, 131))[0]("sum", grads_in_forward=1), "must be True or False"),
])
def test_bad_options_are_named(make_op, message):
    with pytest.raises((ValueError, TypeError), match=f"grads_in_forward.*{message}|{message}"):
        make_op()


@pytest.mark.parametrize("make_case", [cross_entropy_case, kl_case], ids=["cross_entropy", "kl"])
def test_per_token_losses_under_no_grad_are_those_without_forward_gradients(make_case):
    """reduction 'none' was refused with grads_in_forward=True under torch.no_grad() too, where no gradient is taken:
    an evaluation pass of a module built to train that way failed. It gives the per-token losses there."""
    op = make_case((13, 24, 131))[0]
    with torch.no_grad():
        torch.testing.assert_close(op("none", grads_in_forward=True), op("none"))


def test_gpu_row_block_plan_holds_its_budget_and_at_most_32_segments(monkeypatch):
    """On a GPU (the plan outside the interpreter): blocks of whole rows within the 192 MiB budget while that gives at
    most 32 blocks (d_weight's roundings), more rows past that; every row in some block."""
    monkeypatch.setattr(chunked_backward, "INTERPRET", False)
    for vocab in (32000, 128256, 262144):
        for bytes_per_logit in (6, 8, 10):
            for num_rows in (1, 100, 8192, 65536, 100000):
                rows, cols = chunked_backward.row_block_plan(num_rows, vocab, bytes_per_logit)
                assert cols == vocab and 1 <= rows <= num_rows
                assert -(-num_rows // rows) <= 32 and (rows == num_rows or rows % 64 == 0)   # whole 64-row tiles
                budget_rows = chunked_backward._ROW_BLOCK_BYTES // (bytes_per_logit * vocab)
                if num_rows <= 32 * budget_rows and rows < num_rows:
                    assert rows * bytes_per_logit * vocab <= chunked_backward._ROW_BLOCK_BYTES


@pytest.mark.parametrize("shape", triton_cases([(40, 40, 1000)]))
def test_triton_blocks_cross_their_boundaries(shape):
    """The interpreter's blocks are 16 rows: 40 rows take three, the last one short."""
    assert chunked_backward.row_block_plan(40, 1000, 6)[0] == 16 or TRITON_DEVICE == "cuda"
    check(cross_entropy_case(shape, backend="triton", ignored=0.0), "sum", REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_models_batch_of_sequences_is_taken_as_it_is(backend):
    """hidden [B, T, H] with targets [B, T] (padding ignored): the gradient of hidden comes back in its shape, equal to
    the one taken in the backward."""
    device = device_for(backend)
    hidden = torch.randn(3, 7, 24, device=device, requires_grad=True)
    weight = (torch.randn(131, 24, device=device) / 24 ** 0.5).requires_grad_()
    target = torch.randint(0, 131, (3, 7), device=device)
    target[1, 4:] = -100
    grads = {}
    for in_forward in (False, True):
        loss = fastalign.linear_cross_entropy(hidden, weight, target, backend=backend, grads_in_forward=in_forward)
        grads[in_forward] = torch.autograd.grad(2.5 * loss, [hidden, weight])
    for got, want in zip(grads[True], grads[False]):
        assert got.shape == want.shape
        assert_rel_close("gradient", got, want, REL_TOL[torch.float32])


@pytest.mark.parametrize("shape", triton_cases([(13, 24, 131)], gpu_only=[(300, 64, 5000)]))
def test_16_bit_operands_give_fp32_logits(shape):
    """bf16 hidden states and head: the block's logits are the fp32 products, as the default path's tiles are, so a
    KL near 0 (a policy close to its reference) equals the default path's to fp32 rounding. Logits rounded to bf16
    (~4e-3 at |z| ~ 2) would move each token's KL by about as much as the KL itself."""
    hidden, weight, ref_hidden, ref_weight, extra = kl_tests.make_inputs(
        *shape, dtype=torch.bfloat16, device=TRITON_DEVICE, shared=True, closeness=1e-2, masked=0.0)
    kl = {in_forward: fastalign.linear_kl_div(hidden, weight, ref_hidden, ref_weight, reduction="sum",
                                              backend="triton", grads_in_forward=in_forward, **extra)
          for in_forward in (False, True)}
    assert kl[False] > 1e-4
    assert_rel_close("kl", kl[True], kl[False], 1e-4)


@pytest.mark.parametrize("op_name", ["ce", "kl"])
def test_an_input_made_under_inference_mode_is_refused_by_name_where_the_backward_would_save_it(op_name):
    """A reference's hidden states made under torch.inference_mode() (or targets so made): autograd cannot save them,
    and the default path failed in torch's save_for_backward naming no argument. With the gradients taken in the
    forward, or with nothing differentiated, nothing is saved: they are used as they are."""
    hidden, weight, target, _ = ce_tests.make_inputs(5, 6, 9, device="cpu")
    with torch.inference_mode():
        made_so = torch.randn(5, 6) if op_name == "kl" else target.clone()
    name = "ref_hidden" if op_name == "kl" else "target"

    def loss(grads_in_forward, h=hidden):
        if op_name == "ce":
            return fastalign.linear_cross_entropy(h, weight, made_so, grads_in_forward=grads_in_forward)
        return fastalign.linear_kl_div(h, weight, made_so, weight.detach(), grads_in_forward=grads_in_forward)
    with pytest.raises(ValueError, match=rf"{name} was made under torch.inference_mode\(\).*{name}.clone\(\)"):
        loss(False)
    in_forward = loss(True)
    torch.autograd.grad(in_forward, [hidden, weight])
    with torch.no_grad():
        assert_rel_close("loss", loss(False), in_forward.detach(), REL_TOL[torch.float32])
