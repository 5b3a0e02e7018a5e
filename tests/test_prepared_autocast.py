"""PreparedAutocast under torch.compile: a compiled caller runs under the autocast of accelerate's prepare, as the
eager one does (the fused losses' own tests, tests/test_causal_lm_loss.py, check what it gives them uncompiled)."""
import pytest
import torch

from fastalign import CausalLMLoss
from fastalign.prepared_autocast import PreparedAutocast
from tests.test_causal_lm_loss import VOCAB, assert_same_loss_and_gradients, batch
from tests.unlearn.tiny import tiny_llama

accelerate = pytest.importorskip("accelerate")


def prepared_for_bf16(model):
    return accelerate.Accelerator(mixed_precision="bf16", cpu=True).prepare_model(model)


def logits_and_grads(model, autocast, run, input_ids):
    """The lm_head's logits of the decoder's hidden states, run by `run` under `autocast()`, and the gradients of
    their sum wrt the model's parameters."""
    logits = run(model, autocast, input_ids)
    return logits, torch.autograd.grad(logits.float().sum(), list(model.parameters()))


def decode(model, autocast, input_ids):
    with autocast():
        return model.lm_head(model.model(input_ids=input_ids).last_hidden_state)


@pytest.mark.parametrize("order", ["prepared-first", "called-once-since"])
def test_a_fullgraph_compiled_caller_runs_under_the_prepared_autocast(order):
    """dynamo could neither trace the search for the autocast (an error under fullgraph=True, a graph break a call
    without) nor copy the autocast found. The settings are found outside the compiled graph, once a wrapper (where
    the model was prepared first, or at an uncompiled call since), and the graph builds its autocast: the decoder's
    head computes in bf16, the logits and gradients as the eager caller's (to bf16's rounding)."""
    model = tiny_llama(VOCAB)
    if order == "prepared-first":
        model = prepared_for_bf16(model)
    autocast = PreparedAutocast(model)
    input_ids = batch(seed=1)["input_ids"]
    if order != "prepared-first":
        model = prepared_for_bf16(model)
        decode(model, autocast, input_ids)
    torch._dynamo.reset()
    compiled = torch.compile(decode, backend="aot_eager", fullgraph=True)
    (logits, grads), (expected, expected_grads) = (logits_and_grads(model, autocast, run, input_ids)
                                                   for run in (compiled, decode))
    assert logits.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(logits, expected, rtol=1e-2, atol=1e-2)
    for got, want in zip(grads, expected_grads):   # (to bf16's rounding: transformers 5.17 computes in another order
        assert (got - want).norm() <= 1e-2 * want.norm()   # compiled, 0.5% of each gradient under plain autocast)


def test_a_model_prepared_since_the_last_call_costs_a_compiled_call_one_graph_break_saying_so():
    """The settings of a wrapper first met in a compiled call are found outside its graph: without fullgraph the
    call runs in bf16 all the same; with it, the error says what serves."""
    model = tiny_llama(VOCAB)
    autocast = PreparedAutocast(model)
    model = prepared_for_bf16(model)
    input_ids = batch(seed=2)["input_ids"]
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="call the loss once uncompiled after the prepare"):
        torch.compile(decode, backend="eager", fullgraph=True)(model, autocast, input_ids)
    torch._dynamo.reset()
    assert torch.compile(decode, backend="eager")(model, autocast, input_ids).dtype == torch.bfloat16


def test_a_compiled_loss_on_a_prepared_model_is_the_eager_one():
    """CausalLMLoss of a model prepared for bf16, compiled: the eager loss and gradients, bf16's (not fp32's), the
    fused op its only graph break (under fullgraph=True, the error its reason: it was dynamo's on the search for the
    autocast)."""
    model = tiny_llama(VOCAB)
    inputs = batch(seed=3)
    fp32 = CausalLMLoss(model, backend="torch")(**inputs)
    model = prepared_for_bf16(model)
    loss = CausalLMLoss(model, backend="torch")
    expected = loss(**inputs)
    assert expected.item() != fp32.item()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss)(**inputs)
    assert explained.break_reasons and all("linear_cross_entropy runs outside the compiled graph" in str(reason.reason)
                                           for reason in explained.break_reasons)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="linear_cross_entropy runs outside the compiled graph"):
        torch.compile(loss, backend="eager", fullgraph=True)(**inputs)
    torch._dynamo.reset()
    assert_same_loss_and_gradients(model, torch.compile(loss, backend="aot_eager")(**inputs), expected)
