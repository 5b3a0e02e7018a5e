"""TreeRunner against Hugging Face: every span of a randomly grown and pruned tree, under eviction, gives
the logits and final hidden states of the model run on the span's full sequence without a cache."""
import copy
import functools
import warnings

import numpy as np
import pytest
import torch

from fastalign import PoolExhaustedError, TreeRunner
from tests.compare import rel_error
from tests.conftest import TRITON_DEVICE, requires_cuda
from tests.runtime.tiny_models import (CONFIGS, VOCAB, WrappedEmbedding, fill_with_nan, grow_random_tree, reference,
                                      runner_kind, tiny_model)


@pytest.mark.parametrize("index, name", list(enumerate(CONFIGS)))
def test_random_tree_matches_hugging_face_fp32(index, name):
    model = tiny_model(name)
    # 28 blocks of 4 tokens: a batch always fits, the whole tree does not, so spans get evicted.
    runner = TreeRunner(model, max_tokens=112, block_size=4, attention_backend="torch")
    assert type(runner.model_runner).__name__ == runner_kind(name)
    assert runner.paged == (runner_kind(name) not in ("HFCacheModel", "HFStateCacheModel", "HFRecomputeModel"))
    fill_with_nan(runner.pool)

    def check(span, logits, hidden):
        ref_logits, ref_hidden = reference(model, span)
        assert logits.dtype == torch.float32 and logits.shape == ref_logits.shape
        assert (logits - ref_logits).abs().max() <= 1e-4, f"{span}: logits differ from Hugging Face's"
        assert (hidden - ref_hidden).abs().max() <= 1e-4, f"{span}: hidden states differ from Hugging Face's"

    evicted = grow_random_tree(runner, seed=(1, 3, 4, 5)[index % 4], check=check)
    assert evicted > 0 and runner.recomputed_tokens > 0, "no evicted span came back: the test does not cover eviction"


@pytest.mark.parametrize("name", [name for name in CONFIGS if runner_kind(name) == "PagedLlama"])
def test_random_tree_on_the_triton_backend_matches_hugging_face_fp32(name):
    """Every family on the paged Llama path with its Triton kernels: attention, and the fused RMSNorms, rotation and
    gated activation (interpreted without a GPU; a short tree, the kernels being slow there, that still evicts spans
    and brings them back)."""
    model = tiny_model(name, device=TRITON_DEVICE)
    runner = TreeRunner(model, max_tokens=112, block_size=4, attention_backend="triton")
    fill_with_nan(runner.pool)

    def check(span, logits, hidden):
        ref_logits, ref_hidden = reference(model, span)
        assert (logits - ref_logits).abs().max() <= 1e-4, f"{span}: logits differ from Hugging Face's"
        assert (hidden - ref_hidden).abs().max() <= 1e-4, f"{span}: hidden states differ from Hugging Face's"

    evicted = grow_random_tree(runner, seed=1, check=check, steps=8)
    assert evicted > 0 and runner.recomputed_tokens > 0, "no evicted span came back: the test does not cover eviction"


def test_the_triton_backend_runs_no_norm_rotation_or_activation_op_of_torch():
    """A forward on the Triton backend leaves each RMSNorm, the rotation and the MLP's activation to one kernel: none
    of the squares, means, rsqrts of the norm modules, the negations of rotate_half, or the GELU, reach torch."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func._overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    model = tiny_model("gemma3-sliding-softcap", device=TRITON_DEVICE)
    runner = TreeRunner(model, max_tokens=112, block_size=4, attention_backend="triton")
    (root,), _ = runner.extend([None], [[1, 2, 3, 4, 5]])
    with Ops() as ops:
        runner.extend([root, root], [[6], [7, 8]])
    assert "mm" in ops.seen and not ops.seen & {"pow", "mean", "rsqrt", "neg", "gelu"}, ops.seen


# Triton kernels run in the interpreter without a GPU; its bf16 dots compute by value (kernels/interpreter_fixes.py).
# (The mixtures of experts are left out: a bf16 rounding can flip a token's experts, in the runner or in Hugging
# Face's forward, which moves its logits by far more than rounding.)
BF16_CASES = [("cpu", "torch", name) for name in ("llama-gqa-untied", "mistral-mqa-head-dim", "qwen3-head-dim-untied",
                                                  "gemma2-sliding-softcaps", "gemma3-sliding-softcap",
                                                  "olmo3-sliding-tied", "phi3-partial-rotary-sliding",
                                                  "granite-multipliers", "gemma4-wide-full-layers-shared-kv",
                                                  "qwen3.5-linear-attention-states", "mamba2-states",
                                                  "mamba-stepped-states")] + [
    (TRITON_DEVICE, "triton", "mistral-mqa-head-dim"), (TRITON_DEVICE, "triton", "phi3-partial-rotary-sliding"),
    (TRITON_DEVICE, "triton", "gemma3-sliding-softcap")] + [
    pytest.param("cuda", "auto", name, marks=requires_cuda)
    for name in ("llama-gqa-untied", "qwen2-tied", "mistral-mqa-head-dim", "qwen3-head-dim-untied",
                 "gemma2-sliding-softcaps", "gemma3-sliding-softcap", "olmo3-sliding-tied",
                 "phi3-partial-rotary-sliding", "gemma4-wide-full-layers-shared-kv", "gpt2-learned-positions",
                 "bloom-alibi-fallback", "qwen3.5-linear-attention-states", "mamba2-states", "mamba-stepped-states")]


@pytest.mark.parametrize("device, backend, name", BF16_CASES)
def test_random_tree_in_bf16_is_as_close_to_fp32_as_hugging_face(device, backend, name):
    """bf16 runs of the runner and of Hugging Face differ by rounding, so both are measured against the fp32
    model. Over the tree's spans the runner's mean error may be at most 1.25x Hugging Face's, and its largest at
    most 2x: in a random bf16 model one span's error swings with the order of rounding (on an H200, Triton's
    attention gave 0.37 against Hugging Face's 0.22 on one Gemma 4 span, 1.09x on the mean), while a defect
    raises the mean, or one span's error far past Hugging Face's."""
    model = tiny_model(name, dtype=torch.bfloat16, device=device)
    model32 = tiny_model(name, device=device)
    runner = TreeRunner(model, max_tokens=112, block_size=4, attention_backend=backend)
    fill_with_nan(runner.pool)
    errors = []

    def check(span, logits, hidden):
        (logits32, hidden32), (logits16, hidden16) = reference(model32, span), reference(model, span)
        errors.append([rel_error(logits, logits32), rel_error(logits16, logits32),
                       rel_error(hidden.float(), hidden32), rel_error(hidden16.float(), hidden32)])

    # 8 steps where the Triton kernels are interpreted (their bf16 dots by value; 20 steps took 26-52 s a family):
    # the same ratios to Hugging Face's errors over fewer spans
    interpreted = backend == "triton" and device == "cpu"
    assert grow_random_tree(runner, seed=1, check=check, steps=8 if interpreted else 20) > 0
    errors = torch.tensor(errors)
    for statistic, values, bound in (("mean", errors.mean(dim=0), 1.25), ("max", errors.amax(dim=0), 2.0)):
        ours_logits, hf_logits, ours_hidden, hf_hidden = values.tolist()
        for what, ours, hf in (("logits", ours_logits, hf_logits), ("hidden", ours_hidden, hf_hidden)):
            assert ours <= bound * hf + 1e-3, f"{what}: {statistic} error {ours:.3g} vs Hugging Face {hf:.3g}"


def test_rewinding_to_an_ancestor_reuses_its_cache():
    model = tiny_model("llama-gqa-untied")
    runner = TreeRunner(model, max_tokens=256, block_size=4, attention_backend="torch")
    root = runner.prefill(list(range(10)))
    (child,), _ = runner.extend([root], [[11, 12, 13]])
    free, table = runner.num_free_blocks, runner.tree.block_table(root.id).tolist()
    (again,), logits = runner.extend([root], [[14]])  # rewind: extend the ancestor again
    assert runner.tree.block_table(root.id).tolist() == table
    assert runner.num_free_blocks == free - 1  # only the new token's block copy
    ref = model(torch.tensor([list(range(10)) + [14]])).logits[0, -1]
    assert (logits[0] - ref).abs().max() <= 1e-4


def test_output_choices_agree():
    model = tiny_model("qwen2-tied")
    runner = TreeRunner(model, max_tokens=256, block_size=4, attention_backend="torch")
    root = runner.prefill([3, 1, 4, 1, 5])
    lists = [[9, 2, 6], [5], [3, 5]]
    _, all_logits, all_hidden = runner.extend([root] * 3, lists, logits="all", hidden="all")
    _, last_logits, all_hidden2 = runner.extend([root] * 3, lists, logits="last", hidden="all")
    _, none_logits, last_hidden = runner.extend([root] * 3, lists, logits=None, hidden="last")
    _, all_logits2, last_hidden2 = runner.extend([root] * 3, lists, logits="all", hidden="last")
    children, only_logits = runner.extend([root] * 3, lists)
    assert none_logits is None and last_logits.shape == (3, runner.vocab_size)
    assert [h.shape[0] for h in all_hidden] == [3, 1, 2]
    # the LM head then runs on all new tokens or on the last ones only: matmuls of other shapes, a few ulps apart
    close = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(last_logits, torch.stack([lg[-1] for lg in all_logits]), **close)
    torch.testing.assert_close(only_logits, last_logits, **close)
    torch.testing.assert_close(last_hidden, torch.stack([h[-1] for h in all_hidden2]), **close)
    # every token's hidden state is computed for "all" logits; "last" still returns the last ones only
    assert last_hidden2.shape == last_hidden.shape and [lg.shape[0] for lg in all_logits2] == [3, 1, 2]
    torch.testing.assert_close(last_hidden2, last_hidden, **close)


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gpt2-learned-positions"])
def test_last_logits_with_every_hidden_state_run_the_lm_head_on_the_last_tokens_only(name):
    """On either paged runner (PagedHF's through the model's logits_to_keep)."""
    model = tiny_model(name)
    runner = TreeRunner(model, max_tokens=256, block_size=4, attention_backend="torch")
    head_rows = []
    model.lm_head.register_forward_hook(lambda module, args, out: head_rows.append(args[0][..., 0].numel()))
    _, logits, hidden = runner.extend([None, None], [list(range(40)), [7, 8]], logits="last", hidden="all")
    assert head_rows == [2] and logits.shape == (2, runner.vocab_size) and [h.shape[0] for h in hidden] == [40, 2]
    torch.testing.assert_close(logits, model.lm_head(torch.stack([h[-1] for h in hidden])), rtol=1e-6, atol=1e-6)
    head_rows.clear()   # last logits alone (the default) run it on the last tokens too, not on all 42
    _, last = runner.extend([None, None], [list(range(40)), [7, 8]])
    assert head_rows == [2]
    torch.testing.assert_close(last, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gpt2-learned-positions", "bloom-alibi-fallback"])
def test_logits_are_float32_and_hidden_states_in_the_model_dtype(name):
    runner = TreeRunner(tiny_model(name, dtype=torch.bfloat16), max_tokens=64, block_size=4, attention_backend="torch")
    _, last_logits, last_hidden = runner.extend([None, None], [[1, 2, 3], [4]], hidden="last")
    _, all_logits, all_hidden = runner.extend([None], [[5, 6]], logits="all", hidden="all")
    assert last_logits.dtype == all_logits[0].dtype == torch.float32
    assert last_hidden.dtype == all_hidden[0].dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gpt2-learned-positions", "bloom-alibi-fallback"])
def test_an_enclosing_autocast_does_not_apply_inside(name):
    """The runner computes in the model's dtypes whatever autocast encloses its calls, so that a span's KV does not
    depend on the context of the call that computed it (an evicted span is recomputed in a later call's). Under bf16
    autocast the fp32 model's K/V came out in bf16, which the fp32 pool refused deep in write_kv; a fallback runner
    built under autocast got a bf16 pool that the model's fp32 K/V then did not fit."""
    model = tiny_model(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    span = None
    for autocast, tokens in ((True, [5, 9, 2, 7, 1, 3, 8]), (False, [4, 6, 2]), (True, [9, 9, 1, 0])):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            (span,), (logits,), (hidden,) = runner.extend([span], [tokens], logits="all", hidden="all")
        ref_logits, ref_hidden = reference(model, span)
        assert logits.dtype == torch.float32 and hidden.dtype == torch.float32
        assert (logits - ref_logits).abs().max() <= 1e-4, f"{span}: logits differ from Hugging Face's"
        assert (hidden - ref_hidden).abs().max() <= 1e-4, f"{span}: hidden states differ from Hugging Face's"


@pytest.mark.parametrize("body, head", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_an_lm_head_in_another_dtype_than_the_layers_takes_the_hidden_states_in_its_own(body, head):
    """An untied lm_head kept in another dtype (fp32 on a bf16 model) gets the final hidden states in its dtype,
    in or out of autocast. Hugging Face's forward runs such a model only under autocast; the runner's forward
    runs without one, and its lm_head refused the hidden states of the layers' dtype."""
    model = tiny_model("llama-gqa-untied", dtype=body)
    model.lm_head.to(head)
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    span = None
    for autocast, tokens in ((False, [5, 9, 2, 7, 1]), (True, [4, 6, 2])):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            (span,), (logits,), (hidden,) = runner.extend([span], [tokens], logits="all", hidden="all")
        with torch.no_grad():  # Hugging Face's decoder (its whole forward fails without autocast), then the head
            ref_hidden = model.model(torch.tensor([span.tokens])).last_hidden_state[0, -len(tokens):]
            ref_logits = model.lm_head(ref_hidden.to(head)).float()
        assert hidden.dtype == body and rel_error(hidden, ref_hidden) <= 2e-2
        assert rel_error(logits, ref_logits) <= 2e-2


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gpt2-learned-positions", "bloom-alibi-fallback"])
def test_outputs_are_ordinary_tensors_the_caller_may_modify_and_train_on(name):
    runner = TreeRunner(tiny_model(name), max_tokens=64, block_size=4, attention_backend="torch")
    _, logits, hidden = runner.extend([None], [[1, 2, 3]], hidden="all")
    assert not logits.requires_grad and not hidden[0].requires_grad
    logits /= 0.7                       # in place, as samplers do: an inference tensor refuses this
    logits[:, 0] = -float("inf")
    head = torch.nn.Linear(hidden[0].shape[-1], 1)
    head(hidden[0]).sum().backward()    # a value head trained on the hidden states
    assert head.weight.grad is not None


def test_the_runner_counts_the_tokens_it_runs_again_for_evicted_spans():
    """`last_restored` names the spans whose rows the last extend (or pin) ran again, with their tokens;
    `recomputed_tokens` sums them over the runner's life."""
    model = tiny_model("llama-gqa-untied")
    runner = TreeRunner(model, max_tokens=256, block_size=4, attention_backend="torch")
    root = runner.prefill(list(range(6)))
    (a,), _ = runner.extend([root], [[7, 8, 9]])
    (b, c), _ = runner.extend([a, a], [[10], [11, 12]])
    assert runner.last_restored == {} and runner.recomputed_tokens == 0
    for span in (b, c, a):
        runner.tree.evict(span.id)
    runner.extend([b, c], [[13], [14]])
    # a restore row may recompute a chain (a and b in one row, named by its last span)
    assert set(runner.last_restored) <= {a.id, b.id, c.id} and c.id in runner.last_restored
    assert sum(runner.last_restored.values()) == runner.recomputed_tokens == 6
    runner.extend([b], [[15]])
    assert runner.last_restored == {} and runner.recomputed_tokens == 6
    # a call refused before it runs restored nothing: its caller read the restores of the call before it (the RAIN
    # engine charged them twice when a merged call did not fit and its prompts ran again one by one)
    refused = [(ValueError, lambda: runner.extend([c], [[runner.vocab_size]])),
               (PoolExhaustedError, lambda: runner.extend([c] * 5, [list(range(60))] * 5)),
               (ValueError, lambda: runner.pin(root))]
    runner.release(root)
    for recomputed, (error, call) in zip((8, 10, 12), refused):     # c: 2 tokens again each time
        runner.tree.evict(c.id)
        runner.extend([c], [[16]])
        assert runner.last_restored and runner.recomputed_tokens == recomputed
        with pytest.raises(error):
            call()
        assert runner.last_restored == {}


def test_a_peft_lora_model_runs_on_the_paged_path_with_its_adapter():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_model("llama-gqa-untied"), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)).eval()
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    assert type(runner.model_runner).__name__ == "PagedLlama"   # the wrapped model's family, not PagedHF's probe
    (span,), logits = runner.extend([None], [[5, 17, 3, 99, 42, 8]])
    expected = model(torch.tensor([span.tokens])).logits[0, -1]
    with model.disable_adapter():
        without_adapter = model(torch.tensor([span.tokens])).logits[0, -1]
    assert (expected - without_adapter).abs().max() > 1e-2, "the adapter changes nothing: the test cannot fail"
    assert (logits[0] - expected).abs().max() <= 1e-4


def test_a_peft_lora_model_in_training_mode_runs_without_its_dropout():
    """LoRA's dropout sits in the layers the paged path runs: a model training with lora_dropout cached random K/V
    and gave logits off by ~4. Both are those of the model in eval mode, and every module keeps its mode."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_model("llama-gqa-untied"), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.5, init_lora_weights=False))
    model.train()
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    assert runner.paged
    (span,), logits = runner.extend([runner.prefill([5, 17, 3, 99])], [[42, 8]])
    assert all(module.training for module in model.modules())
    with torch.no_grad():
        expected = model.eval()(torch.tensor([span.tokens])).logits[0, -1]
    assert (logits[0] - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gpt2-learned-positions"])
def test_a_token_added_by_resizing_the_embeddings_after_the_runner_is_made_is_taken(name):
    """The runner read the vocabulary when made: after model.resize_token_embeddings it computed the new vocabulary's
    logits, yet refused the new token ids as "outside the vocabulary [0, 101)"."""
    model = tiny_model(name)
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    model.resize_token_embeddings(VOCAB + 4, mean_resizing=False)
    (span,), logits = runner.extend([None], [[1, VOCAB + 2, 4]], logits="all")
    torch.testing.assert_close(logits[0], reference(model, span)[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=rf"token_lists\[0\]: token id {VOCAB + 4} is outside the vocabulary "
                                         rf"\[0, {VOCAB + 4}\)"):
        runner.extend([span], [[VOCAB + 4]])


@pytest.mark.parametrize("name", ["bloom-alibi-fallback", "llama-gqa-untied", "gpt2-learned-positions",
                                  "mamba2-states", "reformer-padded-recompute"])
def test_a_model_whose_vocabulary_is_not_known_runs_as_the_model(name):
    """Embeddings wrapped in a module without a weight (input_vocabulary: None), on each model runner: the probes of
    PagedHF, HFStateCacheModel and HFRecomputeModel took their token ids `% None` (a TypeError, or a refusal that
    blamed the model), and every extend compared the token ids `>= None`. The upper bound is not checked then."""
    model = tiny_model(name)
    wrapped = copy.deepcopy(model)
    wrapped.set_input_embeddings(WrappedEmbedding(wrapped.get_input_embeddings()))
    tokens = torch.randint(VOCAB, (9,)).tolist()
    outputs = []
    for each in (model, wrapped):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the fallbacks' warning of how they run (test_tree_runner_errors.py)
            runner = TreeRunner(each, max_tokens=64, block_size=4, attention_backend="torch")
        assert type(runner.model_runner).__name__ == runner_kind(name)
        root = runner.prefill(tokens[:5])
        outputs.append(runner.extend([root, root], [tokens[5:7], tokens[7:]], logits="all")[1])
    assert runner.vocab_size is None
    torch.testing.assert_close(outputs[1], outputs[0])
    with pytest.raises(ValueError, match=r"token_lists\[0\]: token id -1 is outside the vocabulary \[0, \.\.\.\) "
                                         r"\(its size is not known\)"):
        runner.extend([root], [[-1]])


@pytest.mark.parametrize("name, targets", [("llama-gqa-untied", ["embed_tokens", "lm_head", "q_proj"]),
                                           ("gpt2-learned-positions", ["wte", "c_attn"]),
                                           ("bloom-alibi-fallback", ["word_embeddings", "query_key_value"])])
def test_a_peft_lora_on_the_input_embeddings_runs_with_its_adapter(name, targets):
    """PEFT's LoRA embedding layer has no num_embeddings: making a runner for such a model failed with an
    AttributeError. The vocabulary is that of the embedding layer it wraps."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_model(name), peft.LoraConfig(r=4, target_modules=targets,
                                                                    init_lora_weights=False)).eval()
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    assert runner.paged == (runner_kind(name) not in ("HFCacheModel", "HFStateCacheModel", "HFRecomputeModel"))
    assert runner.vocab_size == VOCAB
    (span,), logits = runner.extend([runner.prefill([5, 17, 3, 99])], [[42, 8]])
    with torch.no_grad():
        expected = model(torch.tensor([span.tokens])).logits[0, -1]
        with model.disable_adapter():
            without_adapter = model(torch.tensor([span.tokens])).logits[0, -1]
    assert (expected - without_adapter).abs().max() > 1e-2, "the adapter changes nothing: the test cannot fail"
    assert (logits[0] - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gpt2-learned-positions", "bloom-alibi-fallback"])
@pytest.mark.parametrize("adapter", ["PromptTuningConfig", "PromptEncoderConfig", "PrefixTuningConfig"])
def test_a_peft_prompt_learning_model_is_refused(name, adapter):
    """A prompt-learning adapter puts virtual tokens (or their K/V) before every sequence in its wrapper's forward:
    the paged path ran the model under it without them (logits off by ~4), and prefix tuning on the fallback gave
    wrong logits too. Neither path can hold them in a span, so such a model is refused."""
    peft = pytest.importorskip("peft")
    extra = {"encoder_hidden_size": 16} if adapter == "PromptEncoderConfig" else {}
    model = peft.get_peft_model(tiny_model(name), getattr(peft, adapter)(
        task_type="CAUSAL_LM", num_virtual_tokens=3, **extra)).eval()
    with pytest.raises(ValueError, match="model: its PEFT adapter .* is a prompt-learning adapter"):
        TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gpt2-learned-positions", "gemma4-wide-full-layers-shared-kv"])
def test_the_attention_ops_check_their_arguments_once_per_forward_not_once_per_layer(monkeypatch, name):
    """The checks cost ~20 us of host time per call: a 32-layer decode step would pay them 32 times. They check the
    arguments of the first layer of each pool shape (one shape but in Gemma 4, whose full layers are wider), before
    its K/V is written."""
    import fastalign.runtime.pool_attention as pool_attention
    model = tiny_model(name)
    assert model.config.num_hidden_layers > 1
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    caches = {"check_paged_attention": [], "check_write_kv": []}   # the k_cache each check was given
    for check, at in (("check_paged_attention", 1), ("check_write_kv", 2)):
        def counted(*args, _check=getattr(pool_attention, check), _name=check, _at=at, **kwargs):
            caches[_name].append(args[_at].data_ptr())
            return _check(*args, **kwargs)
        monkeypatch.setattr(pool_attention, check, counted)
    root = runner.prefill([1, 2, 3, 4, 5])
    runner.extend([root, root], [[6], [7, 8]])
    assert runner.pool.first_of_shape == ({0, 1} if name.startswith("gemma4") else {0})
    checked = [runner.pool.k(i).data_ptr() for i in sorted(runner.pool.first_of_shape)]
    assert caches == {"check_paged_attention": checked * 2, "check_write_kv": checked * 2}


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gpt2-learned-positions"])
def test_auto_attention_is_resolved_to_the_backend_of_the_models_device(monkeypatch, name):
    """The paged runners resolve attention_backend="auto" once (Triton on CUDA, torch elsewhere), and every layer's
    attention gets that backend: one that took "auto" unresolved ran the torch path on CUDA too."""
    import fastalign.runtime.pool_attention as pool_attention
    backends, real = [], pool_attention.paged_attention_unchecked

    def spy(*args, backend, **kwargs):
        backends.append(backend)
        return real(*args, backend=backend, **kwargs)

    model = tiny_model(name)
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="auto")
    monkeypatch.setattr(pool_attention, "paged_attention_unchecked", spy)
    runner.prefill([1, 2, 3])
    assert backends == ["torch"] * model.config.num_hidden_layers


def test_extend_on_the_triton_path_never_waits_to_read_the_device():
    """A forward is planned on the host and its plan copied to the device: no extend reads a device value back
    (counted by tests/sync_counter.py), whatever outputs it returns; its caller reads them when it needs them."""
    from tests.sync_counter import SyncCounter
    model = tiny_model("llama-gqa-untied")
    runner = TreeRunner(model, max_tokens=96, block_size=4, attention_backend="triton")
    with SyncCounter(model) as counter:
        counter.mark(*runner.pool.tensors)
        (root,), _ = runner.extend([None], [[1, 2, 3, 4, 5, 6]])
        children, _, _ = runner.extend([root, root, 0], [[7, 8], [9], [10, 11, 12]], logits="all", hidden="last")
        chains, _ = runner.extend([children[0], None], [[13, 14, 15], [16, 17, 18, 19, 20]], cuts=[[1], [2, 4]],
                                  logits="last")
    assert counter.total == 0, counter.syncs
    runner.release([root, *children, *(span for chain in chains for span in chain)])


def test_token_lists_are_checked_for_bools_without_a_python_step_per_token():
    """extend refuses a bool among a list's int ids (numpy reads True as token 1): it looked at each token in a
    Python generator (a step per token fed, 12,719 in a RAIN run at concurrency 8); the list's types are now
    gathered in C. No generator step of tree_runner.py runs while checking 2,000 tokens, and the bool is refused."""
    import cProfile
    import pstats
    import types
    lists = [torch.randint(0, VOCAB, (n,)).tolist() for n in (500, 1500)]
    checker = types.SimpleNamespace(vocab_size=VOCAB)
    profile = cProfile.Profile()
    profile.enable()
    tokens, cu_lens = TreeRunner._pack_tokens(checker, lists, 2, "token_lists[{}]")
    profile.disable()
    steps = sum(calls for (path, _, name), (_, calls, *_) in pstats.Stats(profile).stats.items()
                if path.endswith("tree_runner.py") and name == "<genexpr>")
    assert steps == 0 and tokens.tolist() == lists[0] + lists[1] and cu_lens.tolist() == [0, 500, 2000]
    with pytest.raises(ValueError, match="token_lists\\[1\\]: expected int token ids, got a bool among them"):
        TreeRunner._pack_tokens(checker, [lists[0], lists[1][:-1] + [True]], 2, "token_lists[{}]")


@pytest.mark.parametrize("hidden", [None, "last", "all"])
@pytest.mark.parametrize("name", ["llama-gqa-untied", "gpt2-learned-positions", "bloom-alibi-fallback"])
def test_logits_of_some_returned_spans_run_the_lm_head_at_those_alone(name, hidden):
    """logits_of picks the returned spans (cuts included) whose logits a call computes: the rows, in the order asked,
    of its logits at every span, with the hidden states of every span still returned; the head runs on those alone."""
    model = tiny_model(name)
    runner = TreeRunner(model, max_tokens=256, block_size=4, attention_backend="torch")
    torch.manual_seed(0)
    rows = [torch.randint(0, VOCAB, (n,)).tolist() for n in (9, 3, 6)]
    cuts = [[4], [], [2, 5]]   # 6 returned spans: 4, 9 | 3 | 2, 5, 6
    head_rows = []
    model.lm_head.register_forward_hook(lambda module, args, out: head_rows.append(args[0][..., 0].numel()))
    _, every, *every_hidden = runner.extend([None] * 3, rows, cuts=cuts, hidden=hidden)
    head_rows.clear()
    _, some, *some_hidden = runner.extend([None] * 3, rows, cuts=cuts, hidden=hidden, logits_of=[4, 1, 2])
    assert sum(head_rows) == 3 and some.shape == (3, every.shape[1])
    torch.testing.assert_close(some, every[[4, 1, 2]], rtol=1e-5, atol=1e-5)
    if hidden is not None:
        for got, expected in zip(some_hidden[0], every_hidden[0]):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("logits, logits_of, match", [
    ("all", [0], r'logits_of: .* takes logits="last", got logits=\'all\''),
    (None, [0], r'logits_of: .* takes logits="last", got logits=None'),
    ("last", [], r"logits_of: expected a non-empty 1-D sequence of int indices .*logits=None for no logits"),
    ("last", [True], r"logits_of: expected a non-empty 1-D sequence of int indices"),
    ("last", [True, 0], r"logits_of: expected int indices of returned spans .*, got a bool among them"),   # was 1
    ("last", [0, 2], r"logits_of: expected indices in \[0, 2\) \(this call returns 2 spans\), got \[0, 2\]"),
    ("last", [-1], r"logits_of: expected indices in \[0, 2\) \(this call returns 2 spans\), got \[-1\]"),
    ("last", 3, r"logits_of: expected a sequence of indices of returned spans, got int"),
])
def test_logits_of_is_checked(logits, logits_of, match):
    runner = TreeRunner(tiny_model("llama-gqa-untied"), max_tokens=64, block_size=4, attention_backend="torch")
    with pytest.raises(ValueError, match=match):
        runner.extend([None, None], [[1, 2], [3]], logits=logits, logits_of=logits_of)
    assert runner.num_free_blocks == runner.num_blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name, bias", [("llama-gqa-untied", False), ("llama-gqa-untied", True),
                                        ("gemma2-sliding-softcaps", False)])
def test_head_at_columns_gives_the_logits_columns_from_hidden_states(name, bias, dtype):
    """The logits at a few columns from the final hidden states equal those columns of the full logits, to the
    rounding of the model's dtype: a head with a bias, and Gemma 2's soft-capped logits."""
    model = tiny_model(name, dtype=dtype)
    if bias:
        head = model.lm_head
        model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True, dtype=dtype)
        torch.nn.init.normal_(model.lm_head.bias)
    if name.startswith("gemma2"):
        assert model.config.final_logit_softcapping
    runner = TreeRunner(model, max_tokens=128, block_size=4, attention_backend="torch")
    torch.manual_seed(1)
    columns = torch.randperm(VOCAB)[:4].tolist()
    _, logits, hidden = runner.extend([None] * 3, [torch.randint(0, VOCAB, (n,)).tolist() for n in (5, 2, 7)],
                                      hidden="last")
    got = runner.head_at_columns(columns)(hidden)
    assert got.dtype == torch.float32 and got.shape == (3, 4)
    # hidden="all" gives a list by span: refused by name (it failed on list.to), its concatenation taken
    _, _, every = runner.extend([None, None], [[1, 2, 3], [4, 5]], hidden="all")
    with pytest.raises(ValueError, match=r"hidden: expected final hidden states \[N, \d+\] .*torch.cat those of "
                                         r"hidden=\"all\", a list by span\), got list"):
        runner.head_at_columns(columns)(every)
    assert runner.head_at_columns(columns)(torch.cat(every)).shape == (5, 4)
    close = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(got, logits[:, columns], **close)


def test_id_arguments_given_as_tensors_or_arrays_are_read_whole(monkeypatch):
    """head_at_columns, logits_of and cuts given as a tensor (or array) were first made a list of its 0-d elements, one
    Python object and one numpy conversion each (1.1 s for 200,000 columns, 8 ms as a list): they are read whole, with
    the results of lists."""
    import fastalign.runtime.tree_runner as tree_runner_module
    runner = TreeRunner(tiny_model("llama-gqa-untied"), max_tokens=128, block_size=4, attention_backend="torch")
    listed = []
    as_list = tree_runner_module._as_list
    monkeypatch.setattr(tree_runner_module, "_as_list", lambda value, *args: listed.append(type(value)) or as_list(
        value, *args))
    columns = [3, 1, 4]
    _, logits, hidden = runner.extend([None, None], [[1, 2, 3, 4], [5, 6]], cuts=[torch.tensor([2]), np.array([1])],
                                      logits="last", logits_of=torch.tensor([1]), hidden="last")
    got = runner.head_at_columns(torch.tensor(columns))(hidden)
    assert not {torch.Tensor, np.ndarray} & set(listed), listed
    torch.testing.assert_close(got, runner.head_at_columns(columns)(hidden))
    assert logits.shape[0] == 1


def test_head_at_columns_asked_again_copies_its_index_to_the_device_once(monkeypatch):
    """The tree engine asks for the judge's label columns at every judge call: each call checked the ids twice (the
    runner, then PagedLlama) and copied their index to the device. The ids are checked once a call, their index copied
    once for the same ids, vocabulary size and device; the head is looked at at each call, so a head changed since
    (its weights, another head, a vocabulary the ids fall outside, a hook) gives its own logits, an error or None."""
    import fastalign.runtime.llama as llama_module
    import fastalign.runtime.tree_runner as tree_runner_module
    from fastalign.ops.checks import int_ids
    from fastalign.transfers import index_on
    copies, checks = [], []
    for module, made, name, counted in ((llama_module, copies, "index_on", index_on),
                                        (llama_module, checks, "int_ids", int_ids),
                                        (tree_runner_module, checks, "int_ids", int_ids)):
        monkeypatch.setattr(module, name, functools.partial(lambda f, made, *a, **k: made.append(1) or f(*a, **k),
                                                            counted, made), raising=False)
    model = tiny_model("llama-gqa-untied")
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    _, _, hidden = runner.extend([None, None], [[1, 2, 3], [4, 5]], logits=None, hidden="last")
    columns, checks[:] = [3, 1, 4], []
    given = np.array(columns)
    runner.head_at_columns(given)
    given[:] = 0   # (the caller's array, changed after: the index kept is a copy)
    with torch.no_grad():
        for step in range(5):
            model.lm_head.weight.mul_(1.5)   # (in place, as an optimizer step: read at each call)
            torch.testing.assert_close(runner.head_at_columns(columns)(hidden), model.lm_head(hidden)[:, columns])
        assert (len(copies), len(checks)) == (1, 6)
        model.lm_head = torch.nn.Linear(hidden.shape[1], VOCAB, bias=True)
        torch.testing.assert_close(runner.head_at_columns(columns)(hidden), model.lm_head(hidden)[:, columns])
        model.lm_head = torch.nn.Linear(hidden.shape[1], 4, bias=False)
        with pytest.raises(ValueError, match=r"columns: expected vocabulary ids in \[0, 4\), got \[3, 1, 4\]"):
            runner.head_at_columns(columns)
        torch.testing.assert_close(runner.head_at_columns([3, 1])(hidden), model.lm_head(hidden)[:, [3, 1]])
        model.lm_head.register_forward_hook(lambda module, args, out: out * 2)
        assert runner.head_at_columns([3, 1]) is None
    assert len(copies) == 2


def test_head_at_columns_is_none_where_the_head_is_not_computed_from_its_rows_alone():
    """A head with a hook, or another module than a plain Linear, and the runners whose model's forward computes the
    logits: None (the caller asks for those rows' logits); columns outside the head are refused."""
    model = tiny_model("llama-gqa-untied")
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    assert runner.head_at_columns([1, 2]) is not None
    with pytest.raises(ValueError, match=rf"columns: expected vocabulary ids in \[0, {VOCAB}\), got \[1, {VOCAB}\]"):
        runner.head_at_columns([1, VOCAB])
    with pytest.raises(ValueError, match="columns: expected int vocabulary ids, got a bool among them"):
        runner.head_at_columns([True, 0])
    hook = model.lm_head.register_forward_hook(lambda module, args, out: out)
    assert runner.head_at_columns([1, 2]) is None
    hook.remove()
    model.lm_head = torch.nn.Sequential(model.lm_head)
    assert runner.head_at_columns([1, 2]) is None
    gpt2 = TreeRunner(tiny_model("gpt2-learned-positions"), max_tokens=64, block_size=4, attention_backend="torch")
    assert gpt2.head_at_columns([1, 2]) is None
