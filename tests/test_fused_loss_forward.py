"""fuse_causal_lm_loss: a model's own forward with labels gives its loss from the fused op, as its unfused forward
gives it, and runs unfused where it must; under a Trainer, a PEFT model, DDP and FSDP2 (tests/test_causal_lm_loss.py
runs the two-process cases)."""
import contextlib
import copy
import inspect
import pickle
import warnings

import pytest
import torch

import fastalign
from fastalign import causal_lm_loss, fuse_causal_lm_loss
from fastalign.fused_loss_forward import FusedLossForward
from fastalign.unlearn import fused_layers, layer_stand_ins
from tests.conftest import TRITON_DEVICE
from tests.test_causal_lm_loss import MODELS, VOCAB, batch, grads_of, meta_llama
from tests.unlearn.test_objective import tiny_gemma2, tiny_model
from tests.unlearn.tiny import tiny_llama, tiny_phi


def fused_and_own(make_model, **fuse_settings):
    """(a model with the fused forward, the same model unchanged)."""
    model = make_model()
    return fuse_causal_lm_loss(copy.deepcopy(model), **{"backend": "torch", **fuse_settings}), model


def assert_same_as_own(fused_model, own_model, **inputs):
    """The fused model's loss (and no logits) against the unchanged model's, and every gradient."""
    fused = fused_model(**inputs)
    assert fused.logits is None
    expected = own_model(**inputs).loss
    torch.testing.assert_close(fused.loss, expected, rtol=1e-5, atol=1e-6)
    own_params = [p for p in own_model.parameters() if p.requires_grad]
    for mine, theirs in zip(grads_of(fused_model, fused.loss), torch.autograd.grad(expected, own_params)):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", MODELS)
def test_the_models_forward_gives_its_own_loss_without_logits(family):
    """Every family CausalLMLoss serves (a biased head, soft caps, logit multipliers): the loss and gradients of the
    model's own forward, and no logits."""
    assert_same_as_own(*fused_and_own(lambda: MODELS[family](VOCAB)), **batch())


@pytest.mark.parametrize("loss_arguments", [
    {"num_items_in_batch": 11}, {"num_items_in_batch": torch.tensor(11)}, {"ignore_index": 5}, {"shift_labels": 1},
], ids=["num-items-int", "num-items-tensor", "ignore-index", "shift-labels"])
def test_the_loss_arguments_transformers_passes_on_act_as_in_its_loss(loss_arguments):
    """num_items_in_batch (a Trainer's, under accumulation), ignore_index, and shift_labels (with labels, which then
    only ask for the loss: the shifted targets count, the last position's too)."""
    inputs = batch(seed=1)
    if "ignore_index" in loss_arguments:   # labels 5 ignored instead of -100 (and those -100 now 5)
        inputs["labels"] = inputs["labels"].masked_fill(inputs["labels"] == -100, 5)
    if "shift_labels" in loss_arguments:
        loss_arguments = {"shift_labels": torch.nn.functional.pad(inputs["labels"][:, 2:], (0, 2), value=7)}
    assert_same_as_own(*fused_and_own(lambda: tiny_llama(VOCAB)), **inputs, **loss_arguments)


def test_positional_inputs_and_a_tuple_output_are_the_forwards():
    """input_ids given by position, and return_dict=False: a tuple led by the loss (its logits left out, as
    to_tuple leaves out what is None)."""
    fused, own = fused_and_own(lambda: tiny_llama(VOCAB))
    inputs = batch(seed=2)
    input_ids = inputs.pop("input_ids")
    output = fused(input_ids, **inputs, return_dict=False)
    assert isinstance(output, tuple) and len(output) == 1
    torch.testing.assert_close(output[0], own(input_ids, **inputs).loss)


def test_hidden_states_and_attentions_are_given_when_asked_for():
    def eager_llama():   # (sdpa gives no attention weights)
        model = tiny_llama(VOCAB)
        model.set_attn_implementation("eager")
        return model
    fused, own = fused_and_own(eager_llama)
    inputs = {**batch(seed=3), "output_hidden_states": True, "output_attentions": True}
    mine, theirs = fused(**inputs), own(**inputs)
    assert len(mine.hidden_states) == len(theirs.hidden_states) == 3
    assert len(mine.attentions) == len(theirs.attentions) == 2
    for a, b in zip(mine.hidden_states + mine.attentions, theirs.hidden_states + theirs.attentions):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("case", ["no-grad", "no-labels", "logits-to-keep"])
def test_where_no_gradient_is_taken_through_the_loss_the_models_own_forward_runs(case):
    """Under no_grad (generation, a Trainer's evaluation), without labels, or asking for a slice of the logits: the
    model's own output, logits and all."""
    fused, own = fused_and_own(lambda: tiny_llama(VOCAB))
    inputs = batch(seed=4)
    if case == "no-labels":
        inputs.pop("labels")
    if case == "logits-to-keep":
        inputs.update(labels=None, logits_to_keep=1)
    with torch.set_grad_enabled(case != "no-grad"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mine, theirs = fused(**inputs), own(**inputs)
        fused(**inputs)
    # with a gradient and no labels the logits' memory is spent: said once (a Trainer that took the labels out)
    said = [w for w in caught if "called with grad enabled and no labels" in str(w.message)]
    assert len(said) == (case == "no-labels"), [str(w.message) for w in caught]
    torch.testing.assert_close(mine.logits, theirs.logits)
    assert (mine.loss is None) == (theirs.loss is None)
    if theirs.loss is not None:
        torch.testing.assert_close(mine.loss, theirs.loss)


def test_generation_runs_the_models_own_forward_with_its_cache():
    fused, own = fused_and_own(lambda: tiny_llama(VOCAB))
    prompt = batch(seed=5)["input_ids"][:1, :4]
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(fused.generate(prompt, **settings), own.generate(prompt, **settings))


def test_the_signature_is_the_models_forwards_which_a_trainer_reads():
    """A Trainer keeps the dataset columns the forward names, and passes num_items_in_batch to a forward that takes
    **kwargs."""
    model = tiny_llama(VOCAB)
    own = inspect.signature(model.forward)
    fuse_causal_lm_loss(model)
    assert inspect.signature(model.forward) == own
    assert {"input_ids", "attention_mask", "labels", "kwargs"} <= set(own.parameters)


def test_fusing_again_replaces_the_settings_and_wraps_the_forward_once():
    model = tiny_llama(VOCAB)
    fuse_causal_lm_loss(model, backend="torch")
    fuse_causal_lm_loss(model, backend="triton")
    assert model.forward.loss.backend == "triton"
    assert not isinstance(model.forward.unfused, FusedLossForward)


@pytest.mark.parametrize("duplicate", [copy.deepcopy, lambda model: pickle.loads(pickle.dumps(model))],
                         ids=["deepcopy", "pickle"])
def test_a_copy_of_a_fused_model_computes_on_its_own_weights(duplicate):
    """copy.deepcopy (a frozen reference, an EMA), pickle (torch.save): the copy's fused forward reads the copy, not
    the original."""
    fused, _ = fused_and_own(lambda: tiny_llama(VOCAB))
    copied = duplicate(fused)
    with torch.no_grad():
        copied.lm_head.weight.mul_(2)
    inputs = batch(seed=6)
    assert copied.forward.loss.model is copied and copied.forward.unfused.__self__ is copied
    with torch.no_grad():   # the copy's own forward, unfused
        expected = copied(**inputs).loss
    torch.testing.assert_close(copied(**inputs).loss, expected)
    assert not torch.allclose(fused(**inputs).loss, expected)


@pytest.mark.parametrize("prepare", ["accelerate", "trainer"])
def test_a_copy_of_a_model_prepared_in_mixed_precision_computes_on_its_own_weights(prepare, tmp_path):
    """accelerate's prepare (bf16, a Trainer's too) binds the function of a forward that has one (__func__) to the
    model again in autocast, and wrapped the fused forward (which had none) as it was: a copy of the prepared model (a
    frozen reference, an EMA) computed its loss, and took its gradients, on the original's weights."""
    transformers, accelerate = pytest.importorskip("transformers"), pytest.importorskip("accelerate")
    model = fuse_causal_lm_loss(tiny_llama(VOCAB), backend="torch")
    own_signature = inspect.signature(model.forward)
    if prepare == "accelerate":
        accelerate.Accelerator(mixed_precision="bf16", cpu=True).prepare(model)
    else:
        rows = batch(seed=5, rows=2)
        args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1,
                                              use_cpu=True, bf16=True, report_to=[], save_strategy="no")
        transformers.Trainer(model=model, args=args,
                             train_dataset=[{name: t[i] for name, t in rows.items()} for i in range(2)]).train()
    assert "forward" in model.__dict__ and inspect.signature(model.forward) == own_signature
    model.zero_grad(set_to_none=True)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        copied.lm_head.weight.normal_(generator=torch.Generator().manual_seed(0))
    inputs = batch(seed=6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):   # the copy's own forward, unfused
        expected = type(copied).forward(copied, **inputs).loss
    loss = copied(**inputs).loss
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=1e-2)
    assert not torch.allclose(model(**inputs).loss, expected, rtol=0.1)
    loss.backward()
    assert copied.lm_head.weight.grad is not None and model.lm_head.weight.grad is None


def test_unwrapping_a_prepared_fused_model_gives_its_fused_forward_back():
    """accelerate's unwrap_model(keep_fp32_wrapper=False) follows the wrapper's __wrapped__ down to the forward it
    prepared: the function the fused forward gave it led nowhere, so the model was left with that function bound,
    fusing it again was refused as a forward replaced by something else, and a pickled copy came back unfused."""
    accelerate = pytest.importorskip("accelerate")
    model = fuse_causal_lm_loss(tiny_llama(VOCAB), backend="torch")
    fused = model.forward
    accelerator = accelerate.Accelerator(mixed_precision="bf16", cpu=True)
    unwrapped = accelerator.unwrap_model(accelerator.prepare(model), keep_fp32_wrapper=False)
    assert unwrapped.forward is fused
    fuse_causal_lm_loss(unwrapped, backend="torch")
    assert isinstance(pickle.loads(pickle.dumps(unwrapped)).forward, FusedLossForward)


@pytest.mark.parametrize("prepare", ["accelerate", "trainer", "copy"])
def test_fusing_again_after_a_mixed_precision_prepare_replaces_the_settings_under_its_autocast(prepare, tmp_path):
    """fuse_causal_lm_loss again on a fused model that a bf16 Trainer (or accelerate's prepare) trained, to change its
    settings, was refused with "call fuse_causal_lm_loss first", which the user did. The settings are replaced in the
    fused forward that accelerate's wrapper calls: the loss is the newly fused one under the wrapper's autocast (a
    prepared model's copy too), and unwrapping the model gives that forward back."""
    transformers, accelerate = pytest.importorskip("transformers"), pytest.importorskip("accelerate")
    model = fuse_causal_lm_loss(tiny_llama(VOCAB), backend="torch")
    if prepare == "trainer":
        rows = batch(seed=5, rows=2)
        args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1,
                                              use_cpu=True, bf16=True, report_to=[], save_strategy="no")
        transformers.Trainer(model=model, args=args,
                             train_dataset=[{name: t[i] for name, t in rows.items()} for i in range(2)]).train()
    else:
        accelerate.Accelerator(mixed_precision="bf16", cpu=True).prepare(model)
    model = copy.deepcopy(model) if prepare == "copy" else model
    inputs = batch(seed=16)
    fuse_causal_lm_loss(model, backend="torch", label_smoothing=0.3)
    assert model.fused_loss_forward.loss.label_smoothing == 0.3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model.fused_loss_forward(**inputs).loss
    loss = model(**inputs).loss
    assert loss.item() == expected.item()
    with torch.no_grad():
        assert abs(loss.item() - model(**inputs).loss.item()) < 1e-2   # (the own forward's bf16 logits, smoothed)
    if prepare != "copy":   # (a copy's wrapper leads down to the original's fused forward: unwrapped, it is not)
        unwrapped = accelerate.utils.extract_model_from_parallel(model, keep_fp32_wrapper=False)
        assert unwrapped.forward.loss.label_smoothing == 0.3 and unwrapped.forward.loss.model is model


def test_fusing_again_a_fused_model_whose_forward_something_else_replaced_says_so():
    """A fused model whose forward a wrapper of the user's replaced: refused saying it was fused and then replaced,
    not "call fuse_causal_lm_loss first"."""
    model = fuse_causal_lm_loss(tiny_llama(VOCAB), backend="torch")
    fused = model.forward
    model.forward = lambda **inputs: fused(**inputs)
    with pytest.raises(ValueError, match="LlamaForCausalLM: this model was fused and then its forward was replaced .* "
                                         "fuse a fresh model, or reload this one"):
        fuse_causal_lm_loss(model, label_smoothing=0.1)


def test_the_triton_kernels_run_in_the_fused_forward():
    """backend="triton" (on a GPU, else in the interpreter), an lm_head with a bias."""
    model = tiny_phi(VOCAB).to(TRITON_DEVICE)
    fused = fuse_causal_lm_loss(copy.deepcopy(model), backend="triton")
    inputs = {name: t.to(TRITON_DEVICE) for name, t in batch(seed=7).items()}
    assert_same_as_own(fused, model, **inputs)


def test_a_lora_model_calls_the_fused_forward_of_its_base_model():
    """PEFT's forward calls the transformers model's: fusing the PEFT model fuses that one, and the adapters get the
    model's gradients."""
    peft = pytest.importorskip("peft")

    def make_model():
        return peft.get_peft_model(tiny_llama(VOCAB), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                      init_lora_weights=False))
    fused, own = fused_and_own(make_model)
    assert isinstance(fused.get_base_model().forward, FusedLossForward)
    assert_same_as_own(fused, own, **batch(seed=8))


def test_a_mixture_of_experts_trains_its_own_loss_unless_its_config_adds_the_router_loss():
    """Mixtral without the router's auxiliary loss: the model's loss. With output_router_logits in its config the
    loss holds that auxiliary loss, which the fused forward would leave out: refused."""
    def mixtral(**settings):
        return tiny_model("Mixtral", VOCAB, num_local_experts=4, num_experts_per_tok=2, **settings)
    assert_same_as_own(*fused_and_own(mixtral), **batch(seed=9))
    with pytest.raises(NotImplementedError, match="MixtralForCausalLM: its config's output_router_logits adds the "
                                                  "router's auxiliary loss"):
        fuse_causal_lm_loss(mixtral(output_router_logits=True))


def test_a_state_space_model_whose_outputs_have_no_attentions():
    """Mamba's decoder output has no attentions field: the fused forward read it and failed at every training call."""
    import transformers

    def mamba():
        torch.manual_seed(0)
        return transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32,
                                                                      num_hidden_layers=2, state_size=4))
    inputs = batch(seed=12)
    assert_same_as_own(*fused_and_own(mamba), input_ids=inputs["input_ids"], labels=inputs["labels"])


def test_a_router_loss_asked_for_after_fusing_runs_the_models_own_forward():
    """output_router_logits set on the config of a model fused without it, or passed to its call: the model's own
    forward, whose loss holds the router's auxiliary loss (the fused forward read the config once, when fused, and
    left that loss out)."""
    model = tiny_model("Mixtral", VOCAB, num_local_experts=4, num_experts_per_tok=2)
    fused = fuse_causal_lm_loss(copy.deepcopy(model), backend="torch")
    inputs = batch(seed=10)
    expected = model(**inputs, output_router_logits=True).loss
    assert abs(float(expected - model(**inputs).loss)) > 1e-6
    torch.testing.assert_close(fused(**inputs, output_router_logits=True).loss, expected, rtol=1e-5, atol=1e-6)
    for m in (model, fused):
        m.config.output_router_logits = True
    inputs = batch(seed=10)
    expected = model(**inputs).loss
    assert abs(float(expected - model(**inputs, output_router_logits=False).loss)) > 1e-6
    torch.testing.assert_close(fused(**inputs).loss, expected, rtol=1e-5, atol=1e-6)


def test_a_router_loss_a_composite_models_text_config_adds_is_refused():
    """Qwen3-VL-MoE reads output_router_logits on its text config (transformers 5.25; 5.17's adds no router loss,
    and then the fused loss is its own)."""
    import transformers
    from fastalign.unlearn.models import forward_reads
    torch.manual_seed(0)
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=256, num_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=16, decoder_sparse_step=1, output_router_logits=True, router_aux_loss_coef=0.5,
                rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0,
                                 "mrope_interleaved": True})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=2, spatial_merge_size=1,
                  temporal_patch_size=1, out_hidden_size=32, deepstack_visual_indexes=[])
    model = transformers.Qwen3VLMoeForConditionalGeneration(transformers.Qwen3VLMoeConfig(
        text_config=text, vision_config=vision, image_token_id=VOCAB - 1, video_token_id=VOCAB - 2,
        vision_start_token_id=VOCAB - 3, vision_end_token_id=VOCAB - 4)).eval()
    assert not getattr(model.config, "output_router_logits", False)
    if forward_reads(model, "aux_loss"):
        with pytest.raises(NotImplementedError, match="Qwen3VLMoeForConditionalGeneration: its config's "
                                                      "output_router_logits adds the router's auxiliary loss"):
            fuse_causal_lm_loss(model)
    else:
        assert_same_as_own(*fused_and_own(lambda: model), **batch(seed=11))


def test_a_soft_cap_set_on_the_config_after_fusing_is_the_one_applied():
    """The fused loss reads the config at every call, as the model's own forward does (it kept the cap it was fused
    with, so training and evaluation capped the logits differently)."""
    fused, own = fused_and_own(lambda: tiny_gemma2(VOCAB, softcap=0.5))
    for model in (fused, own):
        model.config.final_logit_softcapping = 30.0
    assert_same_as_own(fused, own, **batch(seed=12))


@pytest.mark.parametrize("family, setting, value", [
    ("cohere-logit-scale", "logit_scale", 2.0), ("falcon-h1-lm-head-multiplier", "lm_head_multiplier", 3.0),
    ("granite-logits-scaling", "logits_scaling", 0.5)])
def test_a_multiplier_is_read_where_the_models_forward_reads_it(family, setting, value):
    """Cohere's forward multiplies by self.logit_scale, Falcon-H1's by self.model.lm_head_multiplier, copied from the
    config when the model was built; Granite's divides by its config's logits_scaling as it stands. The fused loss
    read the config at every call: a config changed after fusing gave Cohere and Falcon-H1 another loss."""
    fused, own = fused_and_own(lambda: MODELS[family](VOCAB))
    for model in (fused, own):
        setattr(model.config, setting, value)
    assert_same_as_own(fused, own, **batch(seed=13))


@pytest.mark.parametrize("settings, error, message", [
    ({"backend": "bogus"}, ValueError, "backend must be one of .* got 'bogus'"),
    ({"grads_in_forward": "yes"}, TypeError, "grads_in_forward must be True or False, got 'yes'"),
    ({"label_smoothing": -0.5}, ValueError, r"label_smoothing must lie in \[0, 1\], got -0.5")])
def test_bad_settings_are_refused_when_fusing_with_the_forward_left_as_it_was(settings, error, message):
    """A bad backend, grads_in_forward or label_smoothing was taken, the model's forward replaced, and raised only at
    the first training forward."""
    model = tiny_llama(VOCAB)
    with pytest.raises(error, match=message):
        fuse_causal_lm_loss(model, **settings)
    assert "forward" not in vars(model)


def test_bool_labels_are_refused_naming_them():
    """A mask passed where the label ids belong is refused, as the model's own loss refuses it, not trained on as
    the classes 0 and 1."""
    model = fuse_causal_lm_loss(tiny_llama(VOCAB), backend="torch")
    inputs = batch()
    with pytest.raises(ValueError, match=r"labels must be an integer tensor .* torch.bool"):
        model(**{**inputs, "labels": inputs["labels"] > 20})


def test_a_model_on_the_meta_device_is_refused_naming_it():
    """A fused model moved to the meta device: its forward with labels failed with torch's "unknown device type for
    autocast" (compute_dtype asked autocast about the meta device) before fastalign's own checks."""
    model = fuse_causal_lm_loss(meta_llama())
    with pytest.raises(ValueError, match="meta device"):
        model(**batch())


def test_a_model_with_a_loss_function_of_its_own_is_refused():
    model = tiny_llama(VOCAB)
    model.loss_function = lambda logits, labels, **kwargs: logits.sum()
    with pytest.raises(NotImplementedError, match="LlamaForCausalLM: its forward's loss is not transformers' "
                                                  "ForCausalLMLoss"):
        fuse_causal_lm_loss(model)


@pytest.mark.parametrize("wrap", [torch.compile, torch.nn.DataParallel], ids=["compiled", "data-parallel"])
def test_a_wrapped_model_is_refused_naming_the_wrapper(wrap):
    """Fusing goes on the model before a wrapper takes it: torch.compile's module was refused as a model whose
    "forward computes its loss itself", which is false and says nothing of what to do."""
    model = tiny_llama(VOCAB)
    wrapped = wrap(model)
    with pytest.raises(TypeError, match=f"got a {type(wrapped).__name__} around a LlamaForCausalLM: fuse the model "
                                        "itself, then wrap it"):
        fuse_causal_lm_loss(wrapped, backend="torch")
    assert "forward" not in vars(model)


def test_an_encoder_decoder_model_is_refused_naming_what_it_is():
    """T5 computes its loss itself, from a decoder that reads decoder_input_ids: the fused forward says so, and the
    loss modules name it an encoder-decoder model (their probe of its logits failed inside transformers, asking for
    input_ids or inputs_embeds)."""
    import transformers
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, decoder_start_token_id=0))
    with pytest.raises(NotImplementedError, match="T5ForConditionalGeneration: its forward computes its loss itself, "
                                                  "not through transformers' ForCausalLMLoss"):
        fuse_causal_lm_loss(t5)
    for make in (lambda: causal_lm_loss.CausalLMLoss(t5), lambda: fastalign.CausalLMKLDiv(t5, copy.deepcopy(t5))):
        with pytest.raises(TypeError, match="T5ForConditionalGeneration is an encoder-decoder model; the fused losses "
                                            "take a decoder-only causal LM"):
            make()


@pytest.mark.parametrize("precision, layers", [("fp32", False), ("bf16-mixed", False), ("fp32", True)],
                         ids=["fp32", "bf16-mixed", "fp32-fused-layers"])
def test_a_plain_trainer_on_a_fused_model_takes_the_models_own_steps(tmp_path, monkeypatch, precision, layers):
    """transformers' Trainer, unchanged, on a fused model under gradient accumulation (micro-batches of unequal token
    counts): two optimizer steps end at the weights it reaches on the model as it is, and evaluation (under no_grad,
    the model's own forward) gives the same loss. In bf16 mixed precision accelerate wraps the fused forward in
    autocast, and the fused loss takes bf16 as the model's lm_head would: the same steps to bf16's rounding. Inside
    fused_layers(model) the decoder's MLPs train through fastalign's gated_linear too."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    head_inputs = record_calls(monkeypatch, causal_lm_loss, "linear_cross_entropy")   # the fused op's hidden states
    mlp_calls = record_calls(monkeypatch, layer_stand_ins, "gated_linear")
    rows = batch(seed=10, rows=8)
    data = [{name: t[i] for name, t in rows.items()} for i in range(8)]
    data[2]["labels"] = data[2]["labels"].masked_fill(torch.arange(9) < 6, -100)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                                          gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2, optim="sgd",
                                          use_cpu=True, bf16=precision == "bf16-mixed", report_to=[],
                                          save_strategy="no", logging_strategy="no", seed=0)
    start = tiny_llama(VOCAB).state_dict()
    ends, evaluated, head_calls = [], [], []
    for fused in (True, False):
        model = tiny_llama(VOCAB).train()
        if fused:
            fuse_causal_lm_loss(model, backend="torch")
        calls = []   # the lm_head module runs only where logits are made
        model.lm_head.register_forward_hook(lambda *_: calls.append(1))
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        with fused_layers(model, backend="torch") if fused and layers else contextlib.nullcontext():
            trainer.train()
        head_calls.append(len(calls))
        ends.append(model.state_dict())
        evaluated.append(trainer.evaluate(eval_dataset=data[:4])["eval_loss"])
    assert head_calls == [0, 4]   # the fused model trained without logits
    assert [h.dtype for h in head_inputs] == [torch.float32 if precision == "fp32" else torch.bfloat16] * 4
    assert len(mlp_calls) == (8 if layers else 0)   # 2 layers, 4 micro-batches
    assert all(not torch.equal(ends[1][name], start[name]) for name in start if "layers" in name)
    tolerance = dict(rtol=1e-4, atol=1e-6) if precision == "fp32" else dict(rtol=0, atol=1e-4)
    for name in start:
        torch.testing.assert_close(ends[0][name], ends[1][name], **tolerance, msg=name)
    assert evaluated[0] == pytest.approx(evaluated[1], rel=1e-6 if precision == "fp32" else 1e-3)


def test_label_smoothing_given_when_fusing_smooths_the_models_loss():
    """fuse_causal_lm_loss(label_smoothing=0.1): the forward's loss is torch's cross_entropy(label_smoothing=0.1) of
    the model's own shifted logits, with its gradients (where a Trainer's label_smoothing_factor makes the logits)."""
    fused, own = fused_and_own(lambda: tiny_llama(VOCAB), label_smoothing=0.1)
    inputs = batch(seed=6)
    loss = fused(**inputs).loss
    logits = own(**{name: t for name, t in inputs.items() if name != "labels"}).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), inputs["labels"][:, 1:].flatten(),
                                                 label_smoothing=0.1)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    own_params = [p for p in own.parameters() if p.requires_grad]
    for mine, theirs in zip(grads_of(fused, loss), torch.autograd.grad(expected, own_params)):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("call", [{}, {"num_items_in_batch": 7}, {"shift_labels": True}, {"ignore_index": 5},
                                  {"return_dict": False}], ids=["mean", "num-items", "shift-labels", "ignore-index",
                                                                "tuple"])
def test_label_smoothing_given_when_fusing_smooths_the_loss_of_the_models_own_forward_under_no_grad(
        call, monkeypatch):
    """Under no_grad (a Trainer's evaluation) the fused model runs its own forward for the logits: its loss was then
    the unsmoothed one. It is the smoothed loss the fused forward gives in training, whatever the call's targets,
    ignore_index, num_items_in_batch or return_dict, and the only cross-entropy computed: the own forward got the
    labels too, and computed the unsmoothed loss over the [tokens x vocab] logits that the smoothed one replaced."""
    model = fuse_causal_lm_loss(tiny_llama(VOCAB), backend="torch", label_smoothing=0.2)
    with torch.no_grad():
        model.lm_head.weight *= 20   # (peaked logits, where smoothing moves the loss)
    inputs = batch(seed=13)
    if call.get("shift_labels"):   # (targets two tokens on; labels then only ask for the loss)
        inputs["shift_labels"] = torch.nn.functional.pad(inputs["labels"][:, 2:], (0, 2), value=-100)
    if "ignore_index" in call:
        inputs["labels"] = inputs["labels"].masked_fill(inputs["labels"] == -100, call["ignore_index"])
    call = {name: value for name, value in call.items() if name != "shift_labels"}
    expected = model(**inputs, **{name: value for name, value in call.items() if name != "return_dict"}).loss
    cross_entropy, computed = torch.nn.functional.cross_entropy, []
    monkeypatch.setattr(torch.nn.functional, "cross_entropy",
                        lambda *args, **kwargs: computed.append(kwargs.get("label_smoothing", 0.0)) or cross_entropy(
                            *args, **kwargs))
    with torch.no_grad():
        outputs = model(**inputs, **call)
    assert computed == [0.2]
    loss, logits = outputs[:2] if call.get("return_dict") is False else (outputs.loss, outputs.logits)
    assert logits is not None   # (the model's own forward ran)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)


def test_a_trainers_evaluation_of_a_model_fused_with_label_smoothing_is_its_label_smoothing_factors(tmp_path):
    """A Trainer evaluating a model fused with label_smoothing=0.1 reports the loss it reports for the model as it is
    with label_smoothing_factor=0.1 (its evaluation smooths the logits): it reported the unsmoothed loss."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    rows = batch(seed=14, rows=4)
    data = [{name: t[i] for name, t in rows.items()} for i in range(4)]
    evaluated = {}
    for setting in ("fused", "label_smoothing_factor", "none"):
        model = tiny_llama(VOCAB)
        with torch.no_grad():
            model.lm_head.weight *= 20   # (peaked logits, where smoothing moves the loss)
        if setting == "fused":
            fuse_causal_lm_loss(model, backend="torch", label_smoothing=0.1)
        args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, use_cpu=True,
                                              report_to=[], label_smoothing_factor=0.1 if setting[0] == "l" else 0)
        evaluated[setting] = transformers.Trainer(model=model, args=args).evaluate(eval_dataset=data)["eval_loss"]
    assert evaluated["fused"] == pytest.approx(evaluated["label_smoothing_factor"], rel=1e-5)
    assert evaluated["fused"] != pytest.approx(evaluated["none"], rel=1e-3)


def test_a_trainer_that_takes_the_labels_out_is_told_the_logits_are_made(tmp_path):
    """A Trainer with label_smoothing_factor pops the labels and smooths the model's logits: the fused model runs its
    own forward (the lm_head runs at each micro-batch), trains as the model would, and says so once."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    rows = batch(seed=11, rows=4)
    data = [{name: t[i] for name, t in rows.items()} for i in range(4)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2,
                                          learning_rate=1e-2, optim="sgd", use_cpu=True, label_smoothing_factor=0.1,
                                          report_to=[], save_strategy="no", logging_strategy="no", seed=0)
    model = fuse_causal_lm_loss(tiny_llama(VOCAB).train(), backend="torch")
    own = tiny_llama(VOCAB).train()
    calls = []
    model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        transformers.Trainer(model=model, args=args, train_dataset=data).train()
    transformers.Trainer(model=own, args=args, train_dataset=data).train()
    said = [w for w in caught if "called with grad enabled and no labels" in str(w.message)]
    assert len(said) == 1 and "label_smoothing_factor" in str(said[0].message), [str(w.message) for w in caught]
    assert "fuse_causal_lm_loss(model, label_smoothing=...)" in str(said[0].message)
    assert len(calls) == 2
    for (name, mine), theirs in zip(model.state_dict().items(), own.state_dict().values()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7, msg=name)


def record_calls(monkeypatch, module, name):
    """The list to which each call of module.name then appends its first argument."""
    calls, function = [], getattr(module, name)

    def recorded(first, *args, **kwargs):
        calls.append(first)
        return function(first, *args, **kwargs)
    monkeypatch.setattr(module, name, recorded)
    return calls


def test_a_forward_wrapped_before_is_refused():
    """accelerate's prepare (mixed precision) replaces the model's forward by one in autocast: fused after that, the
    fused loss would run outside the autocast (and the check of its logits against the autocast forward's fails)."""
    model = tiny_llama(VOCAB)
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    with pytest.raises(ValueError, match="LlamaForCausalLM: this model's forward was already replaced .* call "
                                         "fuse_causal_lm_loss first"):
        fuse_causal_lm_loss(model)


def test_a_model_whose_accelerate_hooks_were_removed_is_fused_as_any_model():
    """accelerate's remove_hook_from_module sets each module's `forward` back as the bound method of its class's
    forward, an instance attribute: read as a replaced forward, the model was refused ("already replaced (by
    LlamaForCausalLM.forward)")."""
    accelerate = pytest.importorskip("accelerate")

    def offloaded_then_restored():
        model = tiny_llama(VOCAB)
        accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
        accelerate.hooks.remove_hook_from_module(model, recurse=True)
        assert "forward" in vars(model) and not any(p.is_meta for p in model.parameters())
        return model
    fused, own = fuse_causal_lm_loss(offloaded_then_restored(), backend="torch"), tiny_llama(VOCAB)
    assert_same_as_own(fused, own, **batch(seed=14))


def test_a_model_dispatched_with_hooks_is_refused_naming_the_hook_and_fused_before_dispatching():
    """accelerate's hook replaces the forward by its own, which copies the forward's name: the refusal blamed
    autocast and accelerate's prepare, naming LlamaForCausalLM.forward. It names the hook and says to fuse before
    dispatching, which works: the hook wraps the fused forward."""
    accelerate = pytest.importorskip("accelerate")
    model = accelerate.dispatch_model(tiny_llama(VOCAB), device_map={"": "cpu"}, force_hooks=True)
    with pytest.raises(ValueError, match=r"^LlamaForCausalLM: this model's forward was already replaced by "
                                         r"accelerate's hook AlignDevicesHook \(dispatch_model, .*\); call "
                                         "fuse_causal_lm_loss first, before dispatching the model"):
        fuse_causal_lm_loss(model)
    fused, own = fused_and_own(lambda: tiny_llama(VOCAB))
    accelerate.dispatch_model(fused, device_map={"": "cpu"}, force_hooks=True)
    assert_same_as_own(fused, own, **batch(seed=15))


def test_torch_compile_around_a_fused_model_gives_its_loss():
    """torch.compile(model) traces the fused forward (the fused op a graph break of its own): the model's loss and
    gradients, no logits."""
    fused, own = fused_and_own(lambda: tiny_llama(VOCAB))
    assert_same_as_own(torch.compile(fused, backend="eager"), own, **batch(seed=13))


def test_the_fused_forward_is_bound_to_its_model_and_a_copys_to_the_copy():
    """The fused forward is a method of its model (`__self__`) as accelerate sees one (FusedLossForward's docstring),
    a copy's bound to the copy. Nothing tested __self__: one of None passed."""
    fused, _ = fused_and_own(lambda: tiny_llama(VOCAB))
    copied = copy.deepcopy(fused)
    assert fused.forward.__self__ is fused and copied.forward.__self__ is copied


def test_a_model_whose_lm_head_has_a_forward_of_its_own_is_refused_when_fused():
    """A hand-written LoRA lm_head (B zero at first) passed the probe, and the fused forward then read its weight
    alone: once B trained, the model's loss was another model's and the adapter got no gradient."""
    from tests.test_causal_lm_loss import LoRAHead
    model = tiny_llama(VOCAB)
    model.lm_head = LoRAHead(model.lm_head)
    with pytest.raises(NotImplementedError, match="LlamaForCausalLM: .* the model's lm_head is a LoRAHead"):
        fuse_causal_lm_loss(model)


def test_a_prefix_that_does_not_reach_the_models_forward_is_refused(monkeypatch):
    """A prefix-tuned PEFT model's forward passes the prefix's K/V as past_key_values through the fused forward to the
    model's own, which takes them because transformers maps them to `cache` until 5.40; a forward whose **kwargs
    swallow them instead would train the model without the prefix, silently. The removal is stood in for: a
    ValueError naming the model; the check runs on the first such call alone."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM
    from tests.runtime.test_hf_cache_argument import drop_past_key_values

    def tuned():
        config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
        return peft.get_peft_model(fuse_causal_lm_loss(tiny_llama(VOCAB), backend="torch"), config)
    inputs = batch(seed=11)
    with monkeypatch.context() as patch:
        drop_past_key_values(patch, LlamaForCausalLM)
        with pytest.raises(ValueError, match=r"LlamaForCausalLM: the K/V passed as past_key_values did not reach the "
                                             r"model's forward \(the cache it left holds 3 positions, not the \d+ "):
            tuned()(**inputs)
    model = tuned()
    model(**inputs).loss.backward()
    assert model.get_base_model().forward.past_key_values_taken   # checked: later calls skip the check
