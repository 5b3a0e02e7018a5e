"""PagedHF: what its probe refuses, and how its routing of a model's attention stays inside the runner's forwards.
(Its trees match Hugging Face's logits in test_tree_runner.py, on the families of tiny_models.py.)"""
import copy
import functools
import re
import threading
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import (FalconConfig, FalconForCausalLM, GPT2LMHeadModel, Llama4ForCausalLM, Llama4TextConfig,
                          PhimoeConfig, PhimoeForCausalLM)
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

from fastalign import TreeRunner
from fastalign.runtime import attention_routing, hf_paged, model_runners
from fastalign.runtime.hf_paged import PagedHF, _Recorder, _Unfit
from tests.conftest import TRITON_DEVICE, triton_cases
from tests.runtime.tiny_models import assert_matches, drawn_weights, grow_random_tree, reference, tiny_model


def refusal(model):
    """The reason the runner gives when made with fallback=False."""
    with pytest.raises(ValueError) as error:
        TreeRunner(model, max_tokens=64, block_size=4, fallback=False)
    return str(error.value)


def test_an_argument_to_attention_that_the_pool_does_not_compute_is_refused_by_name():
    """A layer that passes the attention function something of its own (here a bias tensor, as an attention variant
    might) would be attended without it, silently: the probe refuses the model and names the argument."""
    model = tiny_model("gpt2-learned-positions")
    attention = model.transformer.h[0].attn
    attention.forward = functools.partial(attention.forward, score_bias=torch.zeros(1))
    assert "GPT2LMHeadModel cannot run on the paged pool: layer 0 passes score_bias to attention" in refusal(model)
    assert not TreeRunner(model, max_tokens=64, block_size=4).paged   # the fallback takes it


def test_a_model_whose_own_forward_runs_hooks_is_left_to_a_fallback():
    """PagedHF runs a forward that computes no logits (a prefill) on the decoder alone, passing over the model's own
    pre-hooks: the K/V of a prefill were the unhooked model's, and its children's logits off. Such a model runs on a
    fallback, which calls the model itself every time, with the reason in the warning."""
    model = tiny_model("gpt2-learned-positions")
    vocab = model.config.vocab_size

    def shifted_ids(module, args, kwargs):   # the model reads each token as the next id
        if args:
            return ((args[0] + 1) % vocab,) + args[1:], kwargs
        return args, {**kwargs, "input_ids": (kwargs["input_ids"] + 1) % vocab}
    model.register_forward_pre_hook(shifted_ids, with_kwargs=True)
    with pytest.warns(UserWarning, match="runs hooks on the model itself"):
        runner = TreeRunner(model, max_tokens=64, block_size=4)
    assert not runner.paged
    seq = [3, 5, 7, 9, 11, 13]
    (child,), logits = runner.extend([runner.prefill(seq[:4])], [seq[4:]], logits="all")
    assert_matches(model, [child], logits)


class PositionsFromZero(GPT2LMHeadModel):
    """GPT-2 that ignores the positions it is given (as a model computing them from its own cache would)."""

    def forward(self, input_ids=None, position_ids=None, **kwargs):
        return super().forward(input_ids=input_ids, **kwargs)


def test_a_model_whose_logits_on_the_pool_differ_from_its_own_is_refused():
    """Routing passes the probe's first checks, and the probe's sequence run in one forward gives the model's own
    logits, but split over two forwards the second gets positions 0, 1, 2 instead of 3, 4, 5: refused, in fp32 and
    in bf16 (the error is ~0.36 of the logits' scale either way, rounding ~0.01 in bf16)."""
    gpt2 = tiny_model("gpt2-learned-positions")
    model = PositionsFromZero(gpt2.config).eval()
    model.load_state_dict(gpt2.state_dict())
    for dtype in (torch.float32, torch.bfloat16):
        assert re.search(r"its logits on the pool change by 0\.3\d+ of their scale", refusal(model.to(dtype)))


class EagerAttention(GPT2Attention):
    """GPT-2's attention that always attends by its eager code, whatever its config names (as a module that does not
    go through transformers' attention interface)."""

    def forward(self, *args, **kwargs):
        config = self.config
        self.config = copy.copy(config)
        self.config._attn_implementation = "eager"
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.config = config


def test_a_layer_whose_attention_bypasses_the_interface_is_refused():
    """A layer that attends by itself would write no K/V to the pool; the probe sees its call missing."""
    model = tiny_model("gpt2-learned-positions")
    model.transformer.h[1].attn.__class__ = EagerAttention
    assert "the attention calls of a forward came from layers [0], not once from each of its 2 layers" in refusal(model)


def test_a_forward_where_a_layer_skips_attention_raises():
    """The same bypass arising after the probe: the forward raises instead of returning logits computed without
    that layer's cache."""
    model = tiny_model("gpt2-learned-positions")
    runner = TreeRunner(model, max_tokens=64, block_size=4)
    model.transformer.h[1].attn.__class__ = EagerAttention
    with pytest.raises(RuntimeError, match="model: 1 of its 2 layers attended in this forward"):
        runner.prefill([1, 2, 3])


def test_the_model_attends_by_its_own_implementation_outside_the_runners_forwards():
    """Routing lasts one forward: the config names the model's implementation again afterwards, and the model's
    own forward still gives its logits."""
    model = tiny_model("gpt2-learned-positions")
    implementation = model.config._attn_implementation
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.no_grad():
        before = model(ids).logits
    runner = TreeRunner(model, max_tokens=64, block_size=4)
    runner.extend([runner.prefill([5, 9])], [[2, 7]])
    assert model.config._attn_implementation == implementation
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_another_thread_using_the_model_during_a_routed_forward_is_refused():
    """While a runner's forward runs, the model's config names the routed implementation; the model's own forward
    in another thread then has no handler and is refused by name instead of attending without a cache."""
    model = tiny_model("gpt2-learned-positions")
    errors = []

    def elsewhere():
        try:
            model(torch.tensor([[1, 2]]))
        except RuntimeError as error:
            errors.append(str(error))

    with attention_routing.routed([model.config], handler=None):
        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
    assert errors and "its attention is routed to a fastalign TreeRunner's KV pool" in errors[0]
    assert model.config._attn_implementation != attention_routing.IMPLEMENTATION


def test_a_routed_block_inside_another_gives_the_outer_one_its_handler_back():
    """A runner's forward inside another's (a hook of one model running a second runner) routes the inner block's
    calls to its handler, then the outer block's rest to the outer handler again, not to none (as from another
    thread), and the config names its own implementation once both end."""
    model = tiny_model("gpt2-learned-positions")
    implementation = model.config._attn_implementation
    outer, inner = [], []

    def handler(seen):
        def attend(module, query, key, value, attention_mask, kwargs):   # as attention to the token alone
            seen.append(module.layer_idx)
            return value.transpose(1, 2), None
        return attend

    ids = torch.tensor([[1, 2]])
    with torch.no_grad(), attention_routing.routed([model.config], handler(outer)):
        with attention_routing.routed([model.config], handler(inner)):
            model(ids)
        model(ids)
    assert inner == [0, 1] and outer == [0, 1]
    assert model.config._attn_implementation == implementation


def _calling_from(model, call, where="layer"):
    """A hook that runs call() once, not again from the forwards that call() makes, keeping what it returns or the
    RuntimeError it raises (a probe hook that swallows its errors): a forward hook on the model's first layer, or
    (where="decoder") a forward pre-hook on the decoder itself, registered before any runner's call."""
    seen, running = [], []

    def hook(module, *_):
        if not running:
            running.append(call)
            try:
                seen.append(call())
            except RuntimeError as error:
                seen.append(error)
    if where == "decoder":
        return model.transformer.register_forward_pre_hook(hook), seen
    return model.transformer.h[0].register_forward_hook(hook), seen


@pytest.mark.parametrize("where", ["layer", "decoder"])
@pytest.mark.parametrize("logits", ["last", None])   # the model's forward, or (a prefill) the decoder's alone
def test_a_forward_of_the_model_inside_a_runners_forward_is_refused_before_it_attends(logits, where):
    """A hook that runs the model's own forward inside a runner's forward: its attention would go to the runner's
    pool (its logits off by 2.3, its K/V written into the batch's slots, then the runner's call failing on a layer
    count or a slot_mapping shape). It is refused by name as it enters the decoder, before any of its layers
    attends, also from a pre-hook on the decoder registered before the runner's own guard; a hook that swallows the
    error leaves the runner's call and its later ones exact."""
    model = tiny_model("gpt2-learned-positions")
    vocab = model.config.vocab_size
    runner = TreeRunner(model, max_tokens=64, block_size=4)
    parent = runner.prefill(torch.randint(vocab, (6,)).tolist())
    probe = torch.randint(vocab, (1, 3))
    hook, seen = _calling_from(model, lambda: model(input_ids=probe, use_cache=False), where)
    try:
        (span,), got, hidden = runner.extend([parent], [torch.randint(vocab, (3,)).tolist()], logits=logits,
                                             hidden="last")
    finally:
        hook.remove()
    assert len(seen) == 1 and isinstance(seen[0], RuntimeError)
    assert "a forward of it ran inside a forward of a TreeRunner of it in the same thread" in str(seen[0])
    expected_logits, expected_hidden = reference(model, span)
    torch.testing.assert_close(hidden[0], expected_hidden[-1], rtol=1e-4, atol=1e-4)
    if logits:
        torch.testing.assert_close(got[0], expected_logits[-1], rtol=1e-4, atol=1e-4)
    (child,), after = runner.extend([span], [[int(torch.randint(vocab, ()))]])
    assert_matches(model, [child], after[:, None])


def test_another_runners_forward_inside_a_runners_forward_computes_on_its_own_pool():
    """A hook that runs another runner of the model inside a runner's forward is no nested plain forward: each
    runner's forward enters the decoder once, and both give the model's logits."""
    model = tiny_model("gpt2-learned-positions")
    vocab = model.config.vocab_size
    runner, inner = (TreeRunner(model, max_tokens=64, block_size=4) for _ in range(2))
    hook, seen = _calling_from(model, lambda: inner.extend([None], [torch.randint(vocab, (4,)).tolist()]))
    try:
        (span,), logits = runner.extend([None], [torch.randint(vocab, (5,)).tolist()])
    finally:
        hook.remove()
    (inner_span,), inner_logits = seen[0]
    assert_matches(model, [span, inner_span], [logits[:, None][0], inner_logits[:, None][0]])


# on a GPU: under -m gpu
@pytest.mark.parametrize("name", triton_cases(["gpt-oss-sinks-sliding", "gemma4-wide-full-layers-shared-kv",
                                               "deepseek-v3-latent-attention"]))
def test_pagedhf_reaches_the_triton_kernels_with_the_cascade(name):
    """On the Triton path (the interpreter without a GPU), children of one span, so that the layers read the shared
    prefix through the cascade: gpt-oss's sinks merged in there, Gemma 4's layers of two shapes in pool layers
    of their own (its shared-K/V layers reading earlier ones'), DeepSeek's narrower V padded; the sliding layers read
    it within their windows."""
    model = tiny_model(name, device=TRITON_DEVICE)
    runner = TreeRunner(model, max_tokens=128, block_size=4, attention_backend="triton")
    assert runner.paged and None in runner.model_runner.windows and runner._cascade_block_size == 4
    root = runner.prefill(list(range(3, 20)))
    children, logits = runner.extend([root] * 3, [[5, 9], [7], [8, 1, 2]])
    with torch.no_grad():
        for child, row in zip(children, logits):
            expected = model(torch.tensor([child.tokens], device=TRITON_DEVICE)).logits[0, -1]
            torch.testing.assert_close(row, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["qwen3-head-dim-untied", "gemma2-sliding-softcaps", "olmo3-sliding-tied",
                                  "qwen2-moe-shared-expert"])
def test_families_of_the_llama_runner_give_the_same_trees_on_pagedhf(monkeypatch, name):
    """The generic path on families that PagedLlama runs by their layouts (q/k norms, Gemma 2's score and logit
    caps and sliding layers, OLMo 3's RoPE per layer type, a shared expert): its random trees match Hugging Face's
    logits and hidden states as PagedLlama's do, so either path is a check on the other."""
    monkeypatch.setattr(model_runners, "llama_family_problem", lambda model: "forced onto PagedHF")
    model = tiny_model(name)
    runner = TreeRunner(model, max_tokens=112, block_size=4, attention_backend="torch")
    assert type(runner.model_runner).__name__ == "PagedHF"

    def check(span, logits, hidden):
        ref_logits, ref_hidden = reference(model, span)
        assert (logits - ref_logits).abs().max() <= 1e-4 and (hidden - ref_hidden).abs().max() <= 1e-4, span

    assert grow_random_tree(runner, seed=2, check=check) > 0


def test_a_layer_type_whose_mask_the_pool_does_not_compute_is_refused():
    """Llama 4's chunked layers mask their keys by chunk, a mask transformers builds from the layer's type alone and
    passes nothing of to the attention function: on the pool they would attend to their whole context, right up to
    the first chunk's end (the probe's six tokens) and silently wrong after it."""
    torch.manual_seed(0)
    model = Llama4ForCausalLM(Llama4TextConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2, attention_chunk_size=8,
        no_rope_layers=[1, 0], attn_temperature_tuning=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()
    assert model.config.layer_types == ["chunked_attention", "full_attention"]
    assert ("its layer 0 is of type 'chunked_attention', whose attention mask the paged attention does not compute"
            in refusal(model))


def test_a_model_that_counts_positions_from_its_input_is_refused():
    """Llama 4's layer without RoPE scales its queries by log1p(floor((position + 1) / floor_scale)), the position
    counted from its cache's length and its input's, never from position_ids: on the pool, each token's place in the
    batch. Past floor_scale (8 here; 8192 in Llama 4's checkpoints, far past any probe) its logits were ~0.3 off
    Hugging Face's. Refused by its config; the fallback matches them. (Its layers are full, not chunked: transformers
    5.17 needs a chunk size even then.)"""
    torch.manual_seed(0)
    model = drawn_weights(Llama4ForCausalLM(Llama4TextConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2, attention_chunk_size=64,
        layer_types=["full_attention", "full_attention"], no_rope_layers=[1, 0], floor_scale=8, attn_scale=0.5,
        bos_token_id=0, eos_token_id=0, pad_token_id=0)))
    assert ("Llama4ForCausalLM cannot run on the paged pool: its layers without RoPE (no_rope_layers) scale their "
            "queries by a temperature of positions it counts from its cache and input" in refusal(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the fallback's warning
        runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    (child,), logits = runner.extend([runner.prefill([(7 * i + 3) % 101 for i in range(12)])], [[5, 9]], logits="all")
    assert not runner.paged
    torch.testing.assert_close(logits[0], reference(model, child)[0], rtol=1e-4, atol=1e-4)


def test_a_sliding_layer_that_passes_no_window_is_refused():
    """A sliding_attention layer whose attention call carries no window (its window would then live in the mask
    alone) is refused, not run over its whole context."""
    model = tiny_model("phi3-partial-rotary-sliding")
    model.config.layer_types = ["full_attention", "sliding_attention"]
    model.config.sliding_window = None   # Phi-3 passes config.sliding_window to attention
    assert "its layer 1 is a sliding_attention layer that passes no sliding_window to attention" in refusal(model)


def test_a_config_window_that_the_attention_calls_do_not_pass_is_refused():
    """PhiMoE's config names no layer types and a sliding_window that its decoder masks every layer by, but its
    attention calls pass no window: on the pool it attended to its whole context, right up to the window's end (8
    tokens, past the probe's six) and silently off Hugging Face's logits after it. Refused; the fallback matches
    them."""
    torch.manual_seed(0)
    model = PhimoeForCausalLM(PhimoeConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1, sliding_window=8, bos_token_id=0,
        eos_token_id=0, pad_token_id=0, attn_implementation="eager")).eval()
    assert ("PhimoeForCausalLM cannot run on the paged pool: its config sets sliding_window=8, but its layer 0 passes "
            "no sliding_window to attention" in refusal(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the fallback's warning
        runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    (span,), logits = runner.extend([None], [[(7 * i + 3) % 101 for i in range(20)]], logits="all")
    assert not runner.paged
    torch.testing.assert_close(logits[0], reference(model, span)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["cohere-parallel-blocks", "gemma3-image-text"])
def test_hidden_states_without_logits_come_from_the_decoder_alone(name):
    """hidden= without logits runs the decoder alone (no LM head): its last hidden states, after the final norm,
    are Hugging Face's, at every new token or at the last one."""
    model = tiny_model(name)
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    root = runner.prefill([5, 17, 3, 9, 2])
    (child, other), logits, hidden = runner.extend([root, root], [[42, 8, 7], [11]], logits=None, hidden="all")
    (last,), _, last_hidden = runner.extend([child], [[4]], logits=None, hidden="last")
    assert logits is None
    for span, states in ((child, hidden[0]), (other, hidden[1]), (last, last_hidden)):
        _, expected = reference(model, span)
        torch.testing.assert_close(states, expected[-len(states):], rtol=1e-4, atol=1e-4)


def test_the_fallback_says_why_it_was_taken_and_the_paged_runners_say_nothing():
    """A model that neither paged runner takes still runs, on Hugging Face's cache, but not silently:
    the warning names the probe's reason, so a user whose search runs slowly learns why, at the user's line that made
    the runner (not inside fastalign)."""
    with pytest.warns(UserWarning, match="TreeRunner: BloomForCausalLM cannot run on the paged pool: its forward takes "
                                         "no position_ids; it runs on Hugging Face's own cache instead, rows that "
                                         "run alike batched") as caught:
        assert not TreeRunner(tiny_model("bloom-alibi-fallback"), max_tokens=64).paged
    assert [w.filename for w in caught if "TreeRunner" in str(w.message)] == [__file__]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("llama-gqa-untied", "gpt2-learned-positions"):
            assert TreeRunner(tiny_model(name), max_tokens=64).paged
    assert not [w for w in caught if "TreeRunner" in str(w.message)]


def test_each_layer_has_a_pool_layer_of_its_own_shape_and_shared_kv_layers_store_none():
    """Gemma 4 here: sliding layers with 2 K/V heads of 16, full layers with 1 of 32, and layers 2 and 3 attending to
    layers 0's and 1's K/V. The pool was one shape as wide as the widest (4 layers x 2 heads x 32, repeated and
    zero-padded); now it holds layers 0 and 1 in their own shapes, 4x less per token, and its trees still match Hugging
    Face's logits (test_tree_runner.py)."""
    model = tiny_model("gemma4-wide-full-layers-shared-kv")
    runner = TreeRunner(model, max_tokens=64, block_size=4, fallback=False)
    hf = runner.model_runner
    assert hf.reads_from == [None, None, 0, 1] and hf.pool_index == [0, 1, 0, 1]
    assert hf.pool_shapes == [(2, 16), (1, 32)] and runner.pool.first_of_shape == {0, 1}
    assert [tuple(runner.pool.k(i).shape[2:]) for i in (0, 1)] == [(2, 16), (1, 32)]
    assert runner.pool.nbytes == runner.num_blocks * 4 * 2 * (2 * 16 + 32) * 4   # tokens x K, V x floats x bytes


@pytest.mark.parametrize("copied", [(0, 1), (1,)])
def test_a_shared_kv_layer_given_other_kv_than_at_the_probe_raises(monkeypatch, copied):
    """A layer that reads another's K/V stores none: were it later given K/V of its own (here copies, as a model
    that stopped sharing would pass; also of its V alone), attending to the other layer's pool layer would be
    silently wrong."""
    model = tiny_model("gemma4-wide-full-layers-shared-kv")
    runner = TreeRunner(model, max_tokens=64, block_size=4, fallback=False)
    root = runner.prefill([1, 2, 3])
    attention = model.model.layers[2].self_attn
    own_forward = attention.forward

    def given_copies(*args, shared_kv_states, **kwargs):
        copies = {kind: tuple(t.clone() if i in copied else t for i, t in enumerate(shared_kv_states[kind]))
                  for kind in ("sliding_attention",)}
        return own_forward(*args, shared_kv_states=copies, **kwargs)
    monkeypatch.setattr(attention, "forward", given_copies)
    with pytest.raises(RuntimeError, match="model: layer 2 attended to K/V other than the very tensors layer 0 "
                                           "attended to"):
        runner.extend([root], [[4]])


def test_layers_that_differ_in_query_heads_or_dtype_are_refused_by_the_probe():
    """One pool holds one dtype and the attention ops check one query shape per K/V shape: a layer whose attention
    runs in float64, or with twice the heads of half the width, is refused by name, not left to fail (or run) on
    the pool."""
    model = tiny_model("gpt2-learned-positions")
    attention = model.transformer.h[1].attn.double()
    attention.register_forward_pre_hook(
        lambda module, args, kwargs: ((args[0].double(),) + args[1:], kwargs) if args else
        (args, dict(kwargs, hidden_states=kwargs["hidden_states"].double())), with_kwargs=True)
    attention.register_forward_hook(lambda module, args, out: (out[0].float(),) + tuple(out[1:]))
    assert ("its layers differ in query heads or dtype ([(4, 'torch.float32'), (4, 'torch.float64')])"
            in refusal(model))
    model = tiny_model("gpt2-learned-positions")
    model.transformer.h[1].attn.head_dim //= 2
    assert "its layers differ in query heads or dtype ([(4, 'torch.float32'), (8, 'torch.float32')])" in refusal(model)


def test_attention_sinks_that_are_not_one_float_per_query_head_are_refused():
    """s_aux is merged into each query head's softmax: sinks of another length (one per K/V head, say) would be
    broadcast or indexed wrong on the pool."""
    model = tiny_model("gpt2-learned-positions")
    attention = model.transformer.h[0].attn
    attention.forward = functools.partial(attention.forward, s_aux=torch.zeros(2))
    assert "layer 0 passes attention sinks (s_aux) that are not one float per query head (4)" in refusal(model)


def test_an_argument_to_attention_that_is_false_is_inert():
    """A flag passed as False (or None) asks for nothing the pool would have to compute: the model stays on the
    paged path instead of falling back to the slow one."""
    model = tiny_model("gpt2-learned-positions")
    attention = model.transformer.h[0].attn
    attention.forward = functools.partial(attention.forward, score_bias=False, other_bias=None)
    assert TreeRunner(model, max_tokens=64, block_size=4, fallback=False).paged


def test_a_layer_that_passes_is_causal_false_is_refused_as_bidirectional():
    """The pool attends causally: a layer asking its attention call for is_causal=False is refused, naming it."""
    model = tiny_model("gpt2-learned-positions")
    attention = model.transformer.h[0].attn
    attention.forward = functools.partial(attention.forward, is_causal=False)
    assert "GPT2LMHeadModel cannot run on the paged pool: layer 0 attends bidirectionally (is_causal=False)" \
        in refusal(model)


def test_a_layer_that_attends_twice_in_one_forward_is_refused_by_name():
    """A layer calling attention twice would write its K/V into the pool twice per forward."""
    model = tiny_model("gpt2-learned-positions")
    attention = model.transformer.h[0].attn
    own_forward = attention.forward

    def twice(*args, **kwargs):
        own_forward(*args, **kwargs)
        return own_forward(*args, **kwargs)
    attention.forward = twice
    assert "GPT2LMHeadModel cannot run on the paged pool: layer 0 attended twice in one forward" in refusal(model)


@pytest.mark.parametrize("window", [0, -5, True])
def test_a_sliding_window_that_is_no_positive_int_is_refused_by_the_probe(window):
    """A window the layer passes to attention that is not a positive int (0, negative, a bool) would be taken for a
    window by the kernels: refused, naming the value."""
    model = tiny_model("gpt2-learned-positions")
    attention = model.transformer.h[1].attn
    attention.forward = functools.partial(attention.forward, sliding_window=window)
    assert f"layer 1 passes sliding_window={window!r}, not a positive int or None" in refusal(model)


def test_a_numpy_integer_layer_index_and_sliding_window_are_taken_by_the_probe():
    """An int check refused a layer_idx or a sliding_window passed as a NumPy integer, which the attention op
    takes (ops.checks.is_integer)."""
    window, recorder = int(np.random.default_rng().integers(1, 64)), _Recorder()
    query, key, value = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
    recorder(SimpleNamespace(layer_idx=np.int64(3)), query, key, value, None, {"sliding_window": np.int64(window)})
    assert recorder.calls[3].window == window


def test_a_layer_given_an_earlier_layers_keys_but_values_of_its_own_reads_no_other_layers_kv():
    """The probe takes a layer for one that reads an earlier layer's K/V (storing none of its own) only where it
    was given that layer's very K and V tensors: sharing K alone, its own V would be lost."""
    recorder = _Recorder()
    key, value, other_value = torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8)
    query = torch.zeros(1, 4, 1, 8)
    for index, v in enumerate((value, other_value, value, torch.zeros(1, 2, 1, 4))):
        recorder(SimpleNamespace(layer_idx=index), query, key, v, None, {})
    assert [recorder.source(i) for i in range(4)] == [None, None, 0, None]
    # with no scaling passed, scores scale by q and k's head_dim, not a narrower V's
    assert recorder.calls[3].scale == 8 ** -0.5 and recorder.calls[3].v_dim == 4


def recorded_call(layer_idx=0, heads=4, kv_heads=2, q_dim=8, v_dim=8, mask=None, **kwargs):
    """The probe's recorder given one attention call of these shapes (tokens: 1)."""
    query, key = torch.zeros(1, heads, 1, q_dim), torch.zeros(1, kv_heads, 1, 8)
    return _Recorder()(SimpleNamespace(layer_idx=layer_idx), query, key, torch.zeros(1, kv_heads, 1, v_dim), mask,
                       kwargs)


@pytest.mark.parametrize("call, reason", [
    (dict(layer_idx=True), "its attention module SimpleNamespace has no integer layer_idx"),
    (dict(mask=torch.zeros(1, 1, 1, 1)), "layer 0 passes a mask or bias of its own to attention (ALiBi, ...)"),
    (dict(dropout=0.1), "layer 0 applies attention dropout in eval mode (0.1)"),
    (dict(q_dim=16), "layer 0's q, k, v are not [1, heads, tokens, head_dim], q and k of one head_dim and v of no more "
                     "(q [1, 4, 1, 16], k [1, 2, 1, 8], v [1, 2, 1, 8])"),
    (dict(v_dim=16), "v of no more (q [1, 4, 1, 8], k [1, 2, 1, 8], v [1, 2, 1, 16])"),
    (dict(heads=3), "layer 0 has 3 query heads, not a multiple of its 2 K/V heads")])
def test_the_probe_refuses_an_attention_call_the_pool_cannot_answer_naming_why(call, reason):
    """Each check of a probe call: dropped, the pool would attend without the model's mask or dropout, with q and k
    of different widths, or with query heads that no K/V head's group holds."""
    with pytest.raises(_Unfit, match=re.escape(reason)):
        recorded_call(**call)
    recorded_call(dropout=0.0, scaling=0.5, is_causal=True)   # what a call may pass


def test_a_model_whose_logits_on_the_pool_are_nan_is_refused(monkeypatch):
    """NaN logits on the pool (an op that breaks there) compare as no error at all unless the probe asks whether the
    error is within tolerance, not whether it exceeds it."""
    monkeypatch.setattr(hf_paged, "pool_attention", lambda *args, **kwargs: torch.full_like(args[1], float("nan")))
    model = tiny_model("gpt2-learned-positions")
    assert "its logits on the pool differ from its own forward's by nan" in refusal(model)


def test_a_decoder_whose_output_is_not_the_models_last_hidden_states_is_refused(monkeypatch):
    """hidden= returns the decoder's output: where it is not the last hidden states the model's own forward reports
    (a decoder found without its final norm, say), the probe refuses the model instead of returning them."""
    own_logits = PagedHF._logits

    def shifted(self, *args):
        logits, hidden = own_logits(self, *args)
        return logits, None if hidden is None else hidden + 1
    monkeypatch.setattr(PagedHF, "_logits", shifted)
    assert ("the output of its decoder (GPT2Model) differs from the last hidden states its own forward reports"
            in refusal(tiny_model("gpt2-learned-positions")))


def test_the_lm_head_runs_only_at_the_tokens_whose_logits_are_asked_for():
    """hidden="all" with logits="last" computes the LM head at each row's last token alone, and hidden states
    without logits none at all ([tokens, vocab] float32 logits of every token are what a value head's training
    on hidden states cannot afford)."""
    model = tiny_model("gpt2-learned-positions")
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    root = runner.prefill([5, 17, 3, 9, 2])
    rows = []
    model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[-2]))
    _, logits, hidden = runner.extend([root, root], [[1, 2, 3], [4]], logits="last", hidden="all")
    assert rows == [2] and logits.shape[0] == 2 and [len(h) for h in hidden] == [3, 1]
    _, logits, hidden = runner.extend([root], [[6, 7]], logits=None, hidden="all")
    assert rows == [2] and logits is None and len(hidden[0]) == 2


@pytest.mark.parametrize("name, setting", [("falcon-alibi", "alibi"), ("mpt-alibi-fallback", "attn_config.alibi")])
def test_a_model_whose_config_says_alibi_is_refused_naming_it(name, setting):
    """Falcon with alibi=True builds its ALiBi biases from the attention mask, which the routed attention does not
    build: its refusal named an AttributeError from inside its forward ("'NoneType' object has no attribute 'dtype'").
    It names the ALiBi setting now, as MPT's does."""
    model = FalconForCausalLM(FalconConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           alibi=True, attn_implementation="eager")).eval() \
        if name == "falcon-alibi" else tiny_model(name)
    assert (f"cannot run on the paged pool: its positions are ALiBi biases ({setting}=True), which it builds from an "
            "attention mask that the routed attention does not build" in refusal(model))


def test_a_model_that_cannot_generate_is_refused_before_its_probe():
    """can_generate() False (an encoder's LM head, a model for another task): not a causal LM to probe."""
    model = tiny_model("gpt2-learned-positions")
    model.can_generate = lambda: False
    assert "GPT2LMHeadModel cannot run on the paged pool: it is not a causal language model (can_generate() is not " \
           "True)" in refusal(model)
