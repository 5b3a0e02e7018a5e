"""UnlearningObjective against SPEC §1 computed per sequence from full logits, for each reference mode."""
import copy
import re
import warnings

import pytest
import torch
from transformers import LlamaForCausalLM

from fastalign.unlearn import models, objective
from fastalign.unlearn.objective import LossWeights, UnlearningObjective
from fastalign.unlearn.reference import (AdapterDisabledReference, CachedReference, FrozenCopyReference,
                                         weight_fingerprint)
from fastalign.prompt_templates import TextTemplate
from fastalign.reference.unlearning_loss import spec_unlearning_terms
from fastalign.unlearn.batching import collate
from fastalign.unlearn.encoding import EncodedExample, encode_pairs
from fastalign.unlearn.models import at_answer_targets, final_hidden_states
from fastalign.unlearn.records import QAPair
from fastalign.unlearn.streams import UnlearningStreams
from tests.conftest import requires_cuda
from tests.unlearn.tiny import byte_bpe_tokenizer, tiny_llama, tiny_phi, tiny_streams

WEIGHTS = LossWeights(forget=0.5, mismatch=1.0, normal=1.0)


def perturb(model, skip_lm_head=False):
    """Moves the policy away from its reference so that the KL term and its gradient are not zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and not (skip_lm_head and "lm_head" in name):
                p.add_(0.05 * torch.randn_like(p))


def setup(mode, make_model=tiny_llama, streams=None):
    """(policy, streams, reference, logits function of the reference) for a reference mode, with a model of
    make_model(vocab_size), over `streams` (default: tiny_streams's)."""
    tokenizer = byte_bpe_tokenizer()
    model = make_model(len(tokenizer))
    streams = streams or tiny_streams(tokenizer)
    if mode == "copy":
        reference = FrozenCopyReference(model)
        perturb(model)
        return model, streams, reference, lambda ids: reference.model(ids).logits
    if mode == "adapter":
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        perturb(model)  # LoRA B starts at zero: make the adapter actually change the model

        def reference_logits(ids):
            with model.disable_adapter():
                return model(ids).logits
        return model, streams, AdapterDisabledReference(model), reference_logits
    model.lm_head.requires_grad_(False)  # weight and bias, as the trainer freezes them
    original = copy.deepcopy(model)
    reference = CachedReference(model, streams.normal, batch_size=2)
    perturb(model, skip_lm_head=True)
    return model, streams, reference, lambda ids: original(ids).logits


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_cached_reference_holds_each_examples_own_hidden_states(batch_size):
    """Example i's rows are the reference hidden states at its answer targets, as a forward of it alone gives them,
    whatever batches built the cache (the last one short); a call returns the rows of its indices in their order."""
    model = tiny_llama(64).requires_grad_(False)
    ids = torch.Generator().manual_seed(batch_size)
    normal = [EncodedExample(tuple(torch.randint(64, (length,), generator=ids).tolist()), start, length, f"row {i}")
              for i, (start, length) in enumerate([(3, 9), (1, 4), (5, 6), (2, 12), (0, 3), (6, 7), (4, 11)])]
    reference = CachedReference(model, normal, batch_size=batch_size, storage="host")
    alone = [at_answer_targets(final_hidden_states(model.model, collate([e], 0)), collate([e], 0)) for e in normal]
    assert reference.hidden.shape == (sum(map(len, alone)), model.config.hidden_size)
    assert reference.num_bytes == reference.hidden.numel() * 4
    index = torch.tensor([4, 0, 6, 4])
    hidden, weight, bias = reference(None, index, model.lm_head.weight, model.lm_head.bias)
    assert weight is model.lm_head.weight and bias is None
    torch.testing.assert_close(hidden, torch.cat([alone[i] for i in index.tolist()]), rtol=1e-5, atol=1e-6)
    assert reference(None, index[:0], model.lm_head.weight)[0].shape == (0, model.config.hidden_size)


def test_cached_reference_of_no_normal_examples_holds_nothing():
    """A run without normal rows: the cache is empty (no forward), and a call without normal rows gets none."""
    model = tiny_llama(64).requires_grad_(False)
    reference = CachedReference(model, [], storage="host")
    assert reference.num_bytes == 0 and reference.offsets == [0] and reference.forward_masks == []
    hidden, weight, _ = reference(None, torch.zeros(0, dtype=torch.long), model.lm_head.weight)
    assert hidden.shape == (0, model.config.hidden_size) and weight is model.lm_head.weight


def test_cached_reference_counts_the_bytes_of_its_dtype():
    """A bfloat16 decoder's cache holds bfloat16 rows: 2 bytes each, which num_bytes reports."""
    model = tiny_llama(64).to(torch.bfloat16).requires_grad_(False)
    reference = CachedReference(model, [EncodedExample((1, 2, 3, 4, 5, 6), 2, 6, "row 0")])
    assert reference.hidden.dtype == torch.bfloat16 and reference.hidden.shape[0] == 4
    assert reference.num_bytes == 4 * model.config.hidden_size * 2


def test_cached_reference_storage_is_named():
    tokenizer = byte_bpe_tokenizer()
    with pytest.raises(ValueError, match=r"storage must be one of \('device', 'host'\), got 'disk'"):
        CachedReference(tiny_llama(len(tokenizer)), tiny_streams(tokenizer).normal, storage="disk")


def test_cached_reference_refuses_an_index_past_its_examples():
    tokenizer = byte_bpe_tokenizer()
    model = tiny_llama(len(tokenizer)).requires_grad_(False)
    normal = tiny_streams(tokenizer).normal
    cache = CachedReference(model, normal)
    for bad in (len(normal), -1):
        with pytest.raises(IndexError, match=rf"normal_index: expected values in \[0, {len(normal)}\) "
                                             rf"\(the cached normal examples\), got {bad}"):
            cache(None, torch.tensor([0, bad]), model.lm_head.weight)


@requires_cuda
def test_cached_reference_in_host_memory_gives_the_device_caches_rows(monkeypatch):
    """storage='host' beside a CUDA model: the cache stays in pageable host memory (page-locked, the pinned allocator
    rounded it up to a power of two: an 8.8 GB cache locked 16 GiB), each call's rows are gathered into a page-locked
    buffer, and they reach the device bit for bit as the device cache gives them."""
    tokenizer = byte_bpe_tokenizer()
    model = tiny_llama(len(tokenizer)).requires_grad_(False).cuda()
    normal = list(tiny_streams(tokenizer).normal) * 4   # over several of the cache's batches of 3
    on_device, on_host = (CachedReference(model, normal, batch_size=3, storage=s) for s in ("device", "host"))
    assert on_device.hidden.is_cuda and not on_host.hidden.is_cuda and not on_host.hidden.is_pinned()
    assert on_host.num_bytes == on_device.num_bytes   # what it holds: no rounding up
    index = torch.tensor([2, 0, len(normal) - 1])
    expected = on_device(None, index, model.lm_head.weight)[0]
    staged, cat = [], torch.cat

    def cat_recording_out(tensors, *args, out=None, **kwargs):
        if out is not None:
            staged.append(out)
        return cat(tensors, *args, out=out, **kwargs)
    monkeypatch.setattr(torch, "cat", cat_recording_out)
    got = on_host(None, index, model.lm_head.weight)[0]
    assert [buffer.is_pinned() for buffer in staged] == [True]
    assert got.is_cuda and torch.equal(got, expected)


@pytest.mark.parametrize("packing,grads_in_forward", [("on", False), ("off", False), ("on", True)])
@pytest.mark.parametrize("make_model", [tiny_llama, tiny_phi], ids=["llama", "phi"])  # Phi: an lm_head bias
@pytest.mark.parametrize("mode", ["copy", "adapter", "cached"])
def test_terms_and_gradients_match_per_sequence_spec(mode, make_model, packing, grads_in_forward):
    """With Phi's biased lm_head the bias trains in the copy mode (its gradient is checked with the others) and is
    the reference's too, frozen, in the adapter and cached modes. The policy's forward runs on the rows packed into
    prefix trees (each forget prompt once for its mismatch rows too) or on the padded rows; the fused losses take
    their gradients in the backward, or in the forward (grads_in_forward)."""
    assert_terms_match_spec(*setup(mode, make_model), packing=packing, grads_in_forward=grads_in_forward)


@pytest.mark.parametrize("mismatch_per_prompt, normal_batch_size", [(1, 3), (3, 1)])
def test_terms_match_the_spec_whatever_the_batchs_composition(mismatch_per_prompt, normal_batch_size):
    """Forget, mismatch and normal rows in other proportions: as many mismatch rows as forget rows, or three times
    as many beside one normal row (the default streams, 2 + 4 + 2 rows, would not see the forget and mismatch rows'
    count subtracted where it is added: 2 - 4 rows from the end are the normal rows there)."""
    streams = tiny_streams(byte_bpe_tokenizer(), mismatch_per_prompt=mismatch_per_prompt,
                           normal_batch_size=normal_batch_size)
    assert_terms_match_spec(*setup("copy", streams=streams))


@pytest.mark.parametrize("packing", ["on", "off"])
def test_terms_match_the_spec_when_a_normal_row_is_the_widest(packing):
    """A normal answer longer than every forget and mismatch row: its last answer target sits in the batch's last
    target column, which the KL term reads like any other (the default streams' normal rows are all narrower)."""
    tokenizer = byte_bpe_tokenizer()
    streams = tiny_streams(tokenizer)
    long, = encode_pairs(tokenizer, TextTemplate(), [QAPair("What is the capital?", "Paris is the capital. " * 6,
                                                            "normal:row 9")], 128)
    streams.normal = [long, long]
    batch = streams.batch(0)
    assert batch.tokens.attention_mask[-1].sum() == batch.tokens.width and batch.tokens.target_mask[-1, -2]
    assert_terms_match_spec(*setup("copy", streams=streams), packing=packing)


def assert_terms_match_spec(model, streams, reference, reference_logits, packing="auto", grads_in_forward=False):
    """The objective's three terms, its total and its gradients on two batches equal SPEC §1 per sequence."""
    objective = UnlearningObjective(model, WEIGHTS, reference, packing=packing, grads_in_forward=grads_in_forward)
    params = [p for p in model.parameters() if p.requires_grad]
    for index in (0, 1):
        batch = streams.batch(index)
        assert batch.num_forget and batch.num_mismatch and batch.num_normal
        terms = objective(batch)
        fast_grads = torch.autograd.grad(terms.total, params)

        f, m = batch.num_forget, batch.num_mismatch
        rows = batch.examples
        spec = spec_unlearning_terms(lambda ids: model(ids).logits, reference_logits, rows[:f], rows[f:f + m],
                                     rows[f + m:])
        assert spec["normal"] > 1e-4  # the KL term is not trivially zero
        for name in ("forget", "mismatch", "normal"):
            torch.testing.assert_close(getattr(terms, name).double(), spec[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(terms.forget_nll.double(), -spec["forget"], rtol=1e-5, atol=1e-6)
        spec_total = WEIGHTS.forget * spec["forget"] + WEIGHTS.mismatch * spec["mismatch"] + \
            WEIGHTS.normal * spec["normal"]
        torch.testing.assert_close(terms.total.double(), spec_total, rtol=1e-5, atol=1e-6)
        spec_grads = torch.autograd.grad(spec_total, params)
        for fast, slow in zip(fast_grads, spec_grads):
            torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-6)


def tiny_model(architecture, vocab_size, **settings):
    """A random fp32 model of a transformers architecture ("Gemma2": Gemma2Config, Gemma2ForCausalLM): 2 layers of
    width 32, 4 heads over 2 KV heads, unless `settings` say otherwise."""
    import transformers
    torch.manual_seed(0)
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)
    config = getattr(transformers, f"{architecture}Config")(vocab_size=vocab_size, **{**sizes, **settings})
    return getattr(transformers, f"{architecture}ForCausalLM")(config).eval()


def tiny_gemma2(vocab_size, softcap):
    """Gemma 2 caps its logits, softcap * tanh(z / softcap)."""
    return tiny_model("Gemma2", vocab_size, head_dim=8, final_logit_softcapping=softcap)


def tiny_cohere(vocab_size, logit_scale):
    """Cohere (Command-R) multiplies its logits by logit_scale after its tied lm_head."""
    return tiny_model("Cohere", vocab_size, logit_scale=logit_scale)


def tiny_granite(vocab_size, logits_scaling):
    """Granite divides its logits by logits_scaling after the lm_head."""
    return tiny_model("Granite", vocab_size, logits_scaling=logits_scaling, tie_word_embeddings=False)


def tiny_falcon_h1(vocab_size, lm_head_multiplier):
    """Falcon-H1 multiplies its logits by lm_head_multiplier after the lm_head (real checkpoints: 1/16 to 1/32)."""
    return tiny_model("FalconH1", vocab_size, num_hidden_layers=1, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                      mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=16, lm_head_multiplier=lm_head_multiplier)


def llama_with_unread_settings(vocab_size):
    """A Llama whose config carries logit transforms of other architectures, which its forward ignores."""
    model = tiny_llama(vocab_size)
    model.config.update({"final_logit_softcapping": 0.5, "logit_scale": 0.3, "logits_scaling": 3.0,
                         "lm_head_multiplier": 0.25})
    return model


def cohere_with_biased_head(vocab_size):
    """Cohere's logit_scale multiplies the bias too: an lm_head with a bias (untied) checks that it does."""
    model = tiny_cohere(vocab_size, logit_scale=0.3)
    head = torch.nn.Linear(32, vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.normal_()
    model.lm_head = head
    return model


class LlamaScaledTwice(LlamaForCausalLM):
    """A forward that applies two of the known multipliers (as a fork of Cohere and Granite might)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * self.config.logit_scale / self.config.logits_scaling
        return out


def llama_scaled_twice(vocab_size):
    """Their product scales the logits: 0.3 z / 3."""
    model = tiny_llama(vocab_size)
    model.config.update({"logit_scale": 0.3, "logits_scaling": 3.0})
    twice = LlamaScaledTwice(model.config).eval()
    twice.load_state_dict(model.state_dict())
    return twice


TRANSFORMED_LOGITS = {  # how each model's logits come from F.linear(hidden, W, b) = z, with a bound on |logits|
    "gemma2-softcap": (lambda vocab: tiny_gemma2(vocab, softcap=0.5), 0.5),  # 0.5 tanh(z / 0.5)
    "cohere-logit-scale": (lambda vocab: tiny_cohere(vocab, logit_scale=0.3), None),  # 0.3 z
    "cohere-biased-head": (cohere_with_biased_head, None),  # 0.3 (h W^T + b)
    "granite-logits-scaling": (lambda vocab: tiny_granite(vocab, logits_scaling=3.0), None),  # z / 3
    "falcon-h1-lm-head-multiplier": (lambda vocab: tiny_falcon_h1(vocab, lm_head_multiplier=0.25), None),  # z / 4
    "llama-unread-settings": (llama_with_unread_settings, None),  # z
    "two-multipliers": (llama_scaled_twice, None),  # 0.3 z / 3
}


@pytest.mark.parametrize("case", TRANSFORMED_LOGITS)
def test_transformed_logits_are_the_models_own(case):
    """Models whose forward soft-caps its logits (Gemma 2 and 3) or multiplies them by a constant of its config
    (Cohere, Granite, Falcon-H1) are trained on their own logits: the terms and gradients follow the SPEC computed
    from the model's logits (such models were refused). A Llama whose config carries these settings ignores them,
    and so do the terms."""
    make_model, bound = TRANSFORMED_LOGITS[case]
    tokenizer = byte_bpe_tokenizer()
    model = make_model(len(tokenizer))
    streams = tiny_streams(tokenizer)
    reference = FrozenCopyReference(model)
    perturb(model)
    objective = UnlearningObjective(model, WEIGHTS, reference)
    batch = streams.batch(0)
    terms = objective(batch)
    f, m, rows = batch.num_forget, batch.num_mismatch, batch.examples
    spec = spec_unlearning_terms(lambda ids: model(ids).logits, lambda ids: reference.model(ids).logits, rows[:f],
                                 rows[f:f + m], rows[f + m:])
    if bound is not None:
        assert model(batch.tokens.input_ids[:1]).logits.abs().max() < bound  # capped: what the terms must follow
    for name in ("forget", "mismatch", "normal"):
        torch.testing.assert_close(getattr(terms, name).double(), spec[name], rtol=1e-5, atol=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    spec_total = WEIGHTS.forget * spec["forget"] + WEIGHTS.mismatch * spec["mismatch"] + WEIGHTS.normal * spec["normal"]
    for fast, slow in zip(torch.autograd.grad(terms.total, params), torch.autograd.grad(spec_total, params)):
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("value", [0.0, float("inf"), pytest.param(10 ** 400, id="10**400"), float("nan"), True, "4"])
def test_a_logit_multiplier_that_is_not_a_finite_nonzero_number_is_refused(value):
    model = tiny_granite(len(byte_bpe_tokenizer()), logits_scaling=1.0)
    model.config.__dict__["logits_scaling"] = value  # past the config's own type check, as a remote-code config
    with pytest.raises(ValueError, match="GraniteForCausalLM: its config's logits_scaling must be a finite nonzero "
                                         "number, got"):
        UnlearningObjective(model)


def dropout_llama_in_training():
    """The tiny Llama with attention dropout 0.5, in training mode (as the trainer's policy is)."""
    model = tiny_llama(len(byte_bpe_tokenizer()))
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    return model.train()


def test_frozen_copy_and_cached_references_of_a_training_policy_run_without_dropout():
    """Both are built from the policy while it trains: P must be the eval-mode model's at every call."""
    model = dropout_llama_in_training()
    streams = tiny_streams(byte_bpe_tokenizer())
    batch = streams.batch(0)
    first = batch.num_forget + batch.num_mismatch
    normal = batch.tokens.rows(first, first + batch.num_normal)
    expected = FrozenCopyReference(copy.deepcopy(model).eval())(normal, batch.normal_index, None)[0]
    reference = FrozenCopyReference(model)
    for _ in range(2):
        torch.testing.assert_close(reference(normal, batch.normal_index, None)[0], expected, rtol=0, atol=0)
    model.lm_head.requires_grad_(False)
    cached = [CachedReference(m, streams.normal).hidden for m in (model, copy.deepcopy(model).eval())]
    assert model.training and torch.equal(*cached)


def test_adapter_reference_is_the_original_model_without_dropout():
    """The policy trains in train mode; its adapter-off reference must still be the deterministic original model."""
    peft = pytest.importorskip("peft")
    tokenizer = byte_bpe_tokenizer()
    model = dropout_llama_in_training()
    original = FrozenCopyReference(model)
    policy = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    policy.train()
    batch = tiny_streams(tokenizer).batch(0)
    first = batch.num_forget + batch.num_mismatch
    normal = batch.tokens.rows(first, first + batch.num_normal)
    expected, _, _ = original(normal, batch.normal_index, None)
    reference = AdapterDisabledReference(policy)
    for _ in range(2):
        hidden, _, _ = reference(normal, batch.normal_index, None)
        torch.testing.assert_close(hidden, expected)
    assert all(module.training for module in policy.modules())


def test_bf16_frozen_copy_is_the_model_loaded_in_bf16(tmp_path):
    """A copy cast to bf16 is the original model as from_pretrained(dtype=bfloat16) loads it: bf16 weights, but
    RoPE's inv_freq (computed at construction) left in fp32, as the policy's is."""
    from transformers import LlamaForCausalLM

    model = tiny_llama(len(byte_bpe_tokenizer()))
    model.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    reference = FrozenCopyReference(model, dtype=torch.bfloat16)
    batch = tiny_streams(byte_bpe_tokenizer()).batch(0)
    with torch.no_grad():
        torch.testing.assert_close(reference.model(batch.tokens.input_ids).logits,
                                   loaded(batch.tokens.input_ids).logits, rtol=0, atol=0)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # the policy is left as it was


def test_a_frozen_copy_made_under_inference_mode_trains_the_policy():
    """A frozen copy made under torch.inference_mode() held inference tensors, and the first training step was refused
    by linear_kl_div naming ref_weight, an argument the user never passed: its terms and gradients are now those of a
    copy made normally."""
    model = tiny_llama(len(byte_bpe_tokenizer()))
    with torch.inference_mode():
        made_so = FrozenCopyReference(model)
    references = [made_so, FrozenCopyReference(model)]
    perturb(model)
    batch = tiny_streams(byte_bpe_tokenizer()).batch(0)
    params = [p for p in model.parameters() if p.requires_grad]
    got, want = (UnlearningObjective(model, WEIGHTS, reference, backend="torch")(batch) for reference in references)
    torch.testing.assert_close(got, want)
    for got_grad, want_grad in zip(torch.autograd.grad(got.total, params), torch.autograd.grad(want.total, params)):
        torch.testing.assert_close(got_grad, want_grad)


def test_cast_weights_casts_stored_buffers_and_keeps_computed_ones():
    """from_pretrained(dtype=...) loads the persistent buffers in that dtype too (a model's saved float buffers); only
    the buffers computed at construction (non-persistent, e.g. inv_freq) keep their dtype, and stay unsaved."""
    module = torch.nn.Linear(2, 2)
    module.register_buffer("stored", torch.ones(2))
    module.register_buffer("computed", torch.ones(2), persistent=False)
    assert models.cast_weights(module, torch.bfloat16) is module
    assert module.weight.dtype == module.stored.dtype == torch.bfloat16 and module.computed.dtype == torch.float32
    assert set(module.state_dict()) == {"weight", "bias", "stored"}


def test_one_policy_forward_per_step():
    model, streams, reference, _ = setup("copy")
    objective = UnlearningObjective(model, WEIGHTS, reference)  # its construction probes the model once
    calls = []
    model.model.register_forward_hook(lambda *_: calls.append(1))
    objective(streams.batch(0))
    assert len(calls) == 1


def test_weights_scale_terms_and_absent_streams():
    model, streams, reference, _ = setup("copy")
    batch = streams.batch(0)
    base = UnlearningObjective(model, LossWeights(1.0, 1.0, 1.0), reference)(batch)
    scaled = UnlearningObjective(model, LossWeights(0.0, 2.0, 3.0), reference)(batch)
    torch.testing.assert_close(scaled.forget, base.forget)  # still measured with weight 0
    torch.testing.assert_close(scaled.total, 2 * base.mismatch + 3 * base.normal)
    forget_only = tiny_streams(byte_bpe_tokenizer(), mismatch_per_prompt=0)
    forget_only.normal = []
    forget_only.normal_batch_size, forget_only._normal_stream = 0, None
    terms = UnlearningObjective(model, WEIGHTS)(forget_only.batch(0))
    assert terms.mismatch == 0 and terms.normal == 0 and terms.forget < 0


def test_bad_inputs():
    model, streams, reference, _ = setup("copy")
    for bad in [float("nan"), float("inf"), 10 ** 400, -1.0, "1", True]:  # True: a YAML `yes`, not the weight 1
        with pytest.raises(ValueError, match="loss weight normal must be a finite number"):
            LossWeights(normal=bad)
    with pytest.raises(TypeError, match="LlamaModel has no lm_head"):
        UnlearningObjective(model.model)
    with pytest.raises(ValueError, match="has no reference for the KL term"):
        UnlearningObjective(model, WEIGHTS)(streams.batch(0))
    with pytest.raises(TypeError, match="reference='adapter' needs a PEFT model"):
        AdapterDisabledReference(model)


def test_a_bad_backend_or_grads_in_forward_is_refused_when_the_objective_is_made():
    """backend='gpu' was accepted and refused by the op only at the first step, after the policy's decoder ran, and
    grads_in_forward='no' was taken as true: each is refused when made, as CausalLMLoss refuses them."""
    model = tiny_llama(16)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\), got 'gpu'"):
        UnlearningObjective(model, WEIGHTS, backend="gpu")
    with pytest.raises(TypeError, match="UnlearningObjective: grads_in_forward must be True or False, got 'no'"):
        UnlearningObjective(model, WEIGHTS, grads_in_forward="no")


def test_normal_denominator_divides_the_kl_sum():
    model, streams, reference, _ = setup("copy")
    objective = UnlearningObjective(model, LossWeights(0.0, 0.0, 1.0), reference)
    batch = streams.batch(0)
    count = int(batch.tokens.target_mask[batch.num_forget + batch.num_mismatch:].sum())
    params = [p for p in model.parameters() if p.requires_grad]
    mean, scaled = objective(batch), objective(batch, normal_denominator=2.5)
    torch.testing.assert_close(scaled.normal, mean.normal * count / 2.5)
    for a, b in zip(torch.autograd.grad(mean.total, params), torch.autograd.grad(scaled.total, params)):
        torch.testing.assert_close(b, a * count / 2.5)
    # a step's average of normal tokens per micro-batch may be under 1 (one token over two micro-batches)
    torch.testing.assert_close(objective(batch, normal_denominator=0.5).normal, mean.normal * count / 0.5)
    for bad in (0, float("inf"), 10 ** 400, True):   # inf made the normal term 0, True was taken as 1
        with pytest.raises(ValueError, match=f"normal_denominator must be a finite number > 0, got {bad}"):
            objective(batch, normal_denominator=bad)


def test_weight_fingerprint_sees_values_not_layout():
    weight = torch.randn(37, 11)
    fingerprint = weight_fingerprint(weight)
    assert weight_fingerprint(weight.t().contiguous().t()) == fingerprint  # same values, other layout
    nudged = weight.clone()
    nudged[36, 10] = torch.nextafter(nudged[36, 10], torch.tensor(float("inf")))
    assert weight_fingerprint(nudged) != fingerprint  # one ulp of one element
    assert weight_fingerprint(weight, torch.bfloat16) == weight_fingerprint(weight.to(torch.bfloat16))


def test_weight_fingerprint_reads_every_slice_of_a_large_weight():
    """A weight of more elements than one slice sums (2**24): a change in its last row changes the fingerprint."""
    weight = torch.zeros(2, (1 << 23) + 1, dtype=torch.float16)   # one row per slice
    changed = weight.clone()
    changed[1, -1] = 1.0
    assert weight_fingerprint(changed) != weight_fingerprint(weight)


def test_cached_reference_refuses_a_trainable_or_changed_lm_head():
    model, streams, _, _ = setup("copy")
    with pytest.raises(ValueError, match="reference='cached' needs a frozen lm_head"):
        CachedReference(model, streams.normal)
    model.lm_head.weight.requires_grad_(False)
    reference = CachedReference(model, streams.normal)
    objective = UnlearningObjective(model, WEIGHTS, reference)
    objective(streams.batch(0))
    batch = streams.batch(0)
    normal_rows = batch.tokens.rows(batch.num_forget + batch.num_mismatch, batch.tokens.input_ids.shape[0])
    # FSDP with a bf16 compute dtype hands over a gathered bf16 copy: accepted while its values are unchanged.
    reference(normal_rows, batch.normal_index, model.lm_head.weight.detach().clone().to(torch.bfloat16))
    model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="needs a frozen lm_head"):
        objective(streams.batch(0))
    model.lm_head.weight.requires_grad_(False)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.01)
    with pytest.raises(RuntimeError, match="modified after the reference was cached"):
        objective(streams.batch(0))
    with pytest.raises(RuntimeError, match="modified after the reference was cached"):
        reference(normal_rows, batch.normal_index, model.lm_head.weight.to(torch.bfloat16))
    with pytest.raises(TypeError, match="the lm_head weight arrived as torch.float64"):
        reference(normal_rows, batch.normal_index, model.lm_head.weight.double())


@pytest.mark.parametrize("mode", ["copy", "cached"])
def test_bf16_autocast_stays_close_to_fp32_spec(mode):
    model, streams, reference, reference_logits = setup(mode)
    batch = streams.batch(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = UnlearningObjective(model, WEIGHTS, reference)(batch)
    f, m = batch.num_forget, batch.num_mismatch
    spec = spec_unlearning_terms(lambda ids: model(ids).logits, reference_logits, batch.examples[:f],
                                 batch.examples[f:f + m], batch.examples[f + m:])
    for name in ("forget", "mismatch"):
        torch.testing.assert_close(getattr(terms, name).double(), spec[name], rtol=2e-2, atol=0)
    # The KL between two nearby models is small, but the bf16 roundings of the two models' hidden states are the
    # same where they agree: 1e-4 and 4e-4 of it measured (copy, cached); a mean over one position more per row is
    # off by more than 2e-3 of it, as is the KL the other way round in copy mode (fp32 tests pin the direction)
    torch.testing.assert_close(terms.normal.double(), spec["normal"], rtol=2e-3, atol=0)


def test_fused_ops_take_the_autocast_dtype(monkeypatch):
    """Under bf16 autocast the head's matmuls run in bf16, as an unfused lm_head would (the memory and speed
    the user asked for), not in the fp32 of the stored weights."""
    model, streams, reference, _ = setup("copy")
    seen = []
    for name in ("linear_cross_entropy", "linear_kl_div"):
        def spy(hidden, weight, *args, _op=getattr(objective, name), _name=name, **kwargs):
            seen.append((_name, hidden.dtype, weight.dtype))
            return _op(hidden, weight, *args, **kwargs)
        monkeypatch.setattr(objective, name, spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        UnlearningObjective(model, WEIGHTS, reference)(streams.batch(0))
    assert seen == [("linear_cross_entropy", torch.bfloat16, torch.bfloat16),
                    ("linear_kl_div", torch.bfloat16, torch.bfloat16)]


class ScaledInputHead(torch.nn.Linear):
    """An lm_head whose forward is not the plain linear map of its weight (it reads twice its input)."""

    def forward(self, hidden):
        return super().forward(2 * hidden)


@pytest.mark.parametrize("case", ["unknown_multiplier", "head_forward"])
def test_logits_the_fused_losses_do_not_reproduce_are_refused(case, monkeypatch):
    """A model whose logits are not F.linear(final hidden states, lm_head.weight) (a multiplier no known config
    name reveals, an lm_head whose forward is more than its weight) is refused by name, not trained on another
    objective."""
    vocab_size = len(byte_bpe_tokenizer())
    if case == "unknown_multiplier":  # Falcon-H1's, were its config name not known
        monkeypatch.delitem(models._LOGIT_MULTIPLIERS, "lm_head_multiplier")
        model = tiny_falcon_h1(vocab_size, lm_head_multiplier=0.25)
        UnlearningObjective(tiny_falcon_h1(vocab_size, lm_head_multiplier=1.0))  # plain logits: served
    else:
        model = tiny_llama(vocab_size)
        head = ScaledInputHead(32, vocab_size, bias=False)
        head.weight = model.lm_head.weight
        model.lm_head = head
    name = type(model).__name__
    with pytest.raises(NotImplementedError, match=f"{name}: its logits are not its lm_head's weight applied to "
                                                  "the final hidden states"):
        UnlearningObjective(model)


@pytest.mark.parametrize("dtype, multiplier", [(torch.float32, 1.0001), (torch.bfloat16, 0.9)])
def test_an_unknown_multiplier_is_refused_beyond_a_few_roundings_of_the_dtype(dtype, multiplier, monkeypatch):
    """The probe allows a few roundings of the model's dtype, no more: a hidden multiplier of 0.9 in bf16 (eps 2**-7),
    or of 1.0001 in fp32, is refused; a looser bound would let a bf16 model train another objective unseen."""
    monkeypatch.delitem(models._LOGIT_MULTIPLIERS, "lm_head_multiplier")
    model = tiny_falcon_h1(len(byte_bpe_tokenizer()), lm_head_multiplier=multiplier).to(dtype)
    with pytest.raises(NotImplementedError, match="its logits are not its lm_head's weight applied to"):
        UnlearningObjective(model)


def test_an_lm_head_with_more_rows_than_the_input_embeddings_is_probed_on_ids_they_embed():
    """The probe of the logits drew its input ids over the lm_head's rows: a model whose lm_head has more rows than its
    input embeddings (a checkpoint's unembedding padded past the words it embeds) failed with an IndexError inside
    the embedding."""
    model = tiny_llama(len(byte_bpe_tokenizer()))
    model.lm_head = torch.nn.Linear(32, model.config.vocab_size + 7, bias=False)
    UnlearningObjective(model)


def test_a_compiled_model_is_warned_of():
    """torch.compile(model) compiles the model's forward, which the objective never calls (it runs the decoder and
    the lm_head): training ran uncompiled, silently. The decoder compiled in place is what serves."""
    model = tiny_llama(len(byte_bpe_tokenizer()))
    with pytest.warns(UserWarning, match=r"compiles nothing it runs: compile the decoder instead"):
        UnlearningObjective(torch.compile(model, backend="eager"))
    model.model = torch.compile(model.model, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        UnlearningObjective(model)


def test_a_model_without_loaded_weights_is_not_probed():
    """Weights on the meta device (FSDP's low-memory loading leaves them so on all but one process): the probe of the
    logits has nothing to run on and must not fail the run."""
    with torch.device("meta"):
        model = tiny_llama(len(byte_bpe_tokenizer()))
    UnlearningObjective(model)


def test_an_lm_head_bias_enters_both_heads_of_the_kl_term():
    """The KL term takes the lm_head bias (it refused a biased lm_head): a Llama given a biased head matches the
    per-sequence spec, the bias's gradient included, and so does a batch without normal rows and no reference."""
    model = tiny_llama(len(byte_bpe_tokenizer()))
    biased = torch.nn.Linear(32, model.config.vocab_size, bias=True)
    biased.weight, model.lm_head = model.lm_head.weight, biased
    reference = FrozenCopyReference(model)
    perturb(model)
    batch = tiny_streams(byte_bpe_tokenizer()).batch(0)
    terms = UnlearningObjective(model, WEIGHTS, reference)(batch)
    f, m, rows = batch.num_forget, batch.num_mismatch, batch.examples
    spec = spec_unlearning_terms(lambda ids: model(ids).logits, lambda ids: reference.model(ids).logits, rows[:f],
                                 rows[f:f + m], rows[f + m:])
    for name in ("forget", "mismatch", "normal"):
        torch.testing.assert_close(getattr(terms, name).double(), spec[name], rtol=1e-5, atol=1e-6)
    spec_total = WEIGHTS.forget * spec["forget"] + WEIGHTS.mismatch * spec["mismatch"] + WEIGHTS.normal * spec["normal"]
    (fast,), (slow,) = (torch.autograd.grad(total, [model.lm_head.bias]) for total in (terms.total, spec_total))
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-6)
    streams = tiny_streams(byte_bpe_tokenizer())
    batch = UnlearningStreams(streams.forget, mismatch_pool=streams.pool, mismatch_per_prompt=2,
                              filler_id=streams.filler_id).batch(0)
    assert batch.num_normal == 0 and torch.isfinite(UnlearningObjective(model, WEIGHTS)(batch).total)


def test_cached_reference_refuses_a_trainable_or_changed_lm_head_bias():
    """The cache is paired with the lm_head's bias as with its weight: a bias that trains or changes is refused."""
    model, streams, _, _ = setup("copy", tiny_phi)
    model.lm_head.weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"reference='cached' needs a frozen lm_head \(its bias requires grad\)"):
        CachedReference(model, streams.normal)
    model.lm_head.bias.requires_grad_(False)
    reference = CachedReference(model, streams.normal)
    perturb(model)  # the decoder, not the frozen lm_head
    objective = UnlearningObjective(model, WEIGHTS, reference)
    assert objective(streams.batch(0)).normal > 1e-4
    batch = streams.batch(0)
    normal_rows = batch.tokens.rows(batch.num_forget + batch.num_mismatch, batch.tokens.input_ids.shape[0])
    weight, bias = model.lm_head.weight, model.lm_head.bias
    # FSDP with a bf16 compute dtype hands over gathered bf16 copies: accepted while their values are unchanged
    _, _, got = reference(normal_rows, batch.normal_index, weight.to(torch.bfloat16), bias.detach().to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="the lm_head lost its bias after the reference was cached"):
        reference(normal_rows, batch.normal_index, weight, None)
    model.lm_head.bias.requires_grad_(True)
    with pytest.raises(ValueError, match=r"needs a frozen lm_head \(its bias requires grad\)"):
        objective(streams.batch(0))
    model.lm_head.bias.requires_grad_(False)
    with torch.no_grad():
        model.lm_head.bias[3] += 1.0
    with pytest.raises(RuntimeError, match="the lm_head bias was modified after the reference was cached"):
        objective(streams.batch(0))
    with pytest.raises(TypeError, match="the lm_head bias arrived as torch.float64"):
        reference(normal_rows, batch.normal_index, weight, bias.double())


@pytest.mark.parametrize("width", [6, 4, 1])
def test_answer_rows_are_gathered_at_positions_the_host_finds(width):
    """at_answer_targets gives the rows (and the gradient) that a boolean mask on the device selects, row-major,
    without reading the device: the positions come from the batch's host copy."""
    from tests.sync_counter import SyncCounter
    from tests.unlearn.test_batching import a_batch
    host = a_batch()
    hidden = torch.randn(3, width, 8, requires_grad=True)
    want = hidden[:, :width - 1][host.target_mask[:, :width - 1]]
    with SyncCounter() as counter:
        got = at_answer_targets(counter.mark(hidden), host.to(torch.device("cpu")))
    assert counter.total == 0, counter.syncs
    grad = torch.randn_like(want)
    assert torch.equal(got, want)
    assert torch.equal(torch.autograd.grad(got, hidden, grad)[0], torch.autograd.grad(want, hidden, grad)[0])


def test_default_weights_are_the_spec_recipe():
    """SPEC §1's defaults w_fgt, w_rdn, w_nor = 0.5, 1.0, 1.0, also for an objective made without weights (the
    command's defaults are UnlearnConfig's, tests/unlearn/test_config.py)."""
    assert LossWeights() == LossWeights(forget=0.5, mismatch=1.0, normal=1.0)
    model = tiny_llama(len(byte_bpe_tokenizer()))
    assert UnlearningObjective(model).weights == LossWeights(0.5, 1.0, 1.0)


@pytest.mark.parametrize("grads_in_forward", [False, True])
def test_the_three_terms_are_detached_and_the_total_is_not(grads_in_forward):
    """LossTerms's terms are logged and watched by early stopping: a term still holding the graph kept the step's
    activations alive as long as the caller kept the value."""
    model, streams, reference, _ = setup("copy")
    terms = UnlearningObjective(model, WEIGHTS, reference, grads_in_forward=grads_in_forward)(streams.batch(0))
    assert terms.total.requires_grad
    assert not any(t.requires_grad for t in (terms.forget, terms.mismatch, terms.normal))


def test_cast_weights_keeps_a_computed_buffer_that_two_modules_share():
    """A computed buffer registered in two modules (one rotary inv_freq held by several layers) keeps its dtype in
    each: only its first name kept it, the other module's copy was rounded."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    shared = torch.linspace(0.1, 1.0, 7)
    for layer in model:
        layer.register_buffer("inv_freq", shared, persistent=False)
    models.cast_weights(model, torch.bfloat16)
    assert model[0].inv_freq.dtype == model[1].inv_freq.dtype == torch.float32
    assert torch.equal(model[1].inv_freq, shared)


def test_activation_checkpoints_are_non_reentrant():
    """Non-reentrant checkpoints: reentrant ones refuse torch.autograd.grad (optimizer-in-backward, gradient
    checks) and lose the gradients of layers whose inputs need none unless the input embeddings are patched."""
    model = tiny_llama(len(byte_bpe_tokenizer()))
    model.model.embed_tokens.requires_grad_(False)
    models.enable_activation_checkpointing(model)
    model.train()
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    (grad,) = torch.autograd.grad(model(ids, labels=ids).loss, [q_proj])
    assert grad.abs().sum() > 0


def test_a_forward_whose_source_cannot_be_read_is_taken_to_read_every_name():
    """forward_reads answers True where the source is unreadable, so that a config's logit multiplier or soft cap is
    applied (and the probe of the logits checks it), not silently dropped."""
    namespace = {}
    exec("def forward(self, input_ids):\n    return input_ids", namespace)   # no file: inspect.getsource fails

    class NoSource(torch.nn.Module):
        forward = namespace["forward"]

    assert models.forward_reads(NoSource(), "final_logit_softcapping")


def test_an_lm_head_of_integer_weights_is_refused_naming_its_dtype():
    """A quantized lm_head (int8 weight, dequantized in its forward): the fused losses cannot read its weight, which
    the refusal names; the probe cast the hidden states to int8 and failed inside the matmul, or compared nonsense."""
    class Int8Head(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            scale = linear.weight.abs().amax() / 127
            self.weight = torch.nn.Parameter((linear.weight / scale).round().to(torch.int8), requires_grad=False)
            self.register_buffer("scale", scale)
            self.bias = None

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight.float() * self.scale)

    model = tiny_llama(len(byte_bpe_tokenizer()))
    model.lm_head = Int8Head(model.lm_head)
    with pytest.raises(NotImplementedError, match=r"lm_head weight \(\d+, 32\) torch.int8"):
        UnlearningObjective(model)


@pytest.mark.parametrize("head_trains", [False, True])
def test_an_lm_head_weight_seen_as_a_plain_tensor_trains_as_its_parameter_did(head_trains):
    """FSDP version 1 (use_orig_params) shows the lm_head's weight as a plain view of the unit's flat parameter, which
    requires grad because the unit's other weights train: a frozen lm_head took gradients and trained all the same.
    What the head's parameter said when the objective was built decides."""
    model, streams, reference, _ = setup("copy")
    model.lm_head.requires_grad_(head_trains)
    objective = UnlearningObjective(model, WEIGHTS, reference)
    flat = model.lm_head.weight.detach().clone().flatten().requires_grad_(True)   # the unit's flat parameter
    del model.lm_head.weight
    model.lm_head.weight = flat.view(model.config.vocab_size, -1)
    (grad,) = torch.autograd.grad(objective(streams.batch(0)).total, [flat], allow_unused=True)
    assert (grad is not None and grad.abs().sum() > 0) if head_trains else grad is None


@pytest.mark.parametrize("grads_in_forward", [False, True])
def test_grads_in_forward_reaches_every_fused_op(grads_in_forward, monkeypatch):
    """grads_in_forward=True saves one product with the lm_head per term: each fused call, the KL term's included,
    must take it (the KL term computing its gradients in the backward gives the same values, at the cost saved)."""
    model, streams, reference, _ = setup("copy")
    seen = []
    for name in ("linear_cross_entropy", "linear_kl_div"):
        def spy(*args, _op=getattr(objective, name), _name=name, **kwargs):
            seen.append((_name, kwargs.get("grads_in_forward", False)))
            return _op(*args, **kwargs)
        monkeypatch.setattr(objective, name, spy)
    UnlearningObjective(model, WEIGHTS, reference, grads_in_forward=grads_in_forward)(streams.batch(0))
    assert {name for name, _ in seen} == {"linear_cross_entropy", "linear_kl_div"}
    assert all(flag == grads_in_forward for _, flag in seen)


@pytest.mark.parametrize("make_model, read", [(lambda v: tiny_gemma2(v, softcap=3.0), models.logit_softcap),
                                              (lambda v: tiny_cohere(v, logit_scale=0.25), models.logit_multiplier)],
                         ids=["gemma2-softcap", "cohere-logit-scale"])
def test_a_peft_model_keeps_the_logit_transforms_of_the_model_it_wraps(make_model, read):
    """The soft cap and logit multiplier are read from the wrapped model's forward: PEFT's own forward names neither,
    and a LoRA-trained Gemma 2 or Cohere lost them (the probe of the logits then refused the model)."""
    peft = pytest.importorskip("peft")
    model = make_model(len(byte_bpe_tokenizer()))
    expected = read(model)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert expected is not None and read(wrapped) == expected
    UnlearningObjective(wrapped)


def test_a_token_id_past_the_models_embeddings_is_named_by_its_example():
    """UnlearningObjective used directly (README: `UnlearningObjective` / `UnlearningTrainer` directly) on a batch whose
    largest id has no embedding row failed inside the embedding with an IndexError (on CUDA a device assert): the
    example holding it is named, as the trainer's streams.check_vocabulary names it; a batch moved to the device is
    read on its host copy."""
    streams = tiny_streams(byte_bpe_tokenizer())
    batch = streams.batch(0)
    largest = int(batch.tokens.input_ids.max())
    model = tiny_llama(largest)   # one row short
    holder = next(e.source for e in batch.examples if largest in e.input_ids)
    terms = UnlearningObjective(model, LossWeights(), FrozenCopyReference(model))
    for moved in (batch, batch.to("meta")):   # (the meta device holds no values to read)
        with pytest.raises(ValueError, match=rf"^{re.escape(holder)}: token id {largest} is past the model's "
                                             rf"{largest} input embeddings"):
            terms(moved)
