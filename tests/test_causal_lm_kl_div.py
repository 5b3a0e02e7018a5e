"""CausalLMKLDiv against the KL computed from both models' materialised logits (float64), value and gradients."""
import copy

import pytest
import torch

from fastalign import CausalLMKLDiv, linear_kl_div
from fastalign.unlearn import models
from tests.conftest import TRITON_DEVICE, requires_cuda
from tests.runtime.tiny_models import drawn_weights
from tests.test_causal_lm_loss import VOCAB, batch, grads_of, meta_llama, project, tiny_git
from tests.unlearn.test_objective import tiny_cohere, tiny_gemma2, tiny_model
from tests.unlearn.tiny import tiny_llama, tiny_phi


def logits_token_kls(model, reference, inputs, temperature=1.0, adapter=False, ignore_index=-100):
    """KL(P || Q) of each position that predicts [B, T - 1] from the models' own logits, in float64, 0 where its
    label is ignore_index."""
    labels = inputs["labels"]
    forward = {name: t for name, t in inputs.items() if name != "labels"}
    q_logits = model(**forward).logits[:, :-1].double() / temperature
    with torch.no_grad():
        if adapter:
            with model.disable_adapter():
                p_logits = model(**forward).logits[:, :-1].double() / temperature
        else:
            p_logits = reference(**forward).logits[:, :-1].double() / temperature
    log_p, log_q = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    return per_token.masked_fill(labels[:, 1:] == ignore_index, 0)


def logits_kl(model, reference, inputs, temperature=1.0, adapter=False, ignore_index=-100):
    """The token mean over labelled positions of KL(P || Q) from the models' own logits, in float64."""
    kls = logits_token_kls(model, reference, inputs, temperature, adapter, ignore_index)
    return kls.sum() / (inputs["labels"][:, 1:] != ignore_index).sum()


def assert_same_kl_and_gradients(model, fused, expected, rtol=1e-5):
    torch.testing.assert_close(fused.double(), expected, rtol=rtol, atol=1e-7)
    for mine, theirs in zip(grads_of(model, fused), grads_of(model, expected)):
        if theirs is None:
            assert mine is None or not mine.any()
        else:
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-7)


CASES = {   # (student, reference): a wider teacher, lm_head biases, soft-capped and multiplied logits
    "llama-wider-teacher": (lambda: tiny_llama(VOCAB), lambda: tiny_llama(VOCAB, hidden_size=48, seed=1)),
    "phi-biased-heads": (lambda: tiny_phi(VOCAB), lambda: tiny_phi(VOCAB, seed=1)),
    "gemma2-softcap": (lambda: tiny_gemma2(VOCAB, softcap=0.5), lambda: tiny_gemma2(VOCAB, softcap=0.5)),
    "cohere-logit-scale": (lambda: tiny_cohere(VOCAB, logit_scale=0.3), lambda: tiny_llama(VOCAB, seed=2)),
    # a biased reference head with a logit factor (1) other than the model's (0.3): the bias takes the reference's
    "cohere-student-phi-teacher": (lambda: tiny_cohere(VOCAB, logit_scale=0.3), lambda: tiny_phi(VOCAB, seed=1)),
}


@pytest.mark.parametrize("case", CASES)
def test_kl_and_gradients_are_those_of_the_models_logits(case):
    make_model, make_reference = CASES[case]
    model, reference = make_model(), make_reference()
    if case == "gemma2-softcap":   # the same architecture and seed: other weights, so that the KL is no zero
        with torch.no_grad():
            for p in reference.parameters():
                p.add_(0.05 * torch.randn_like(p))
    inputs = batch(seed=10)
    fused = CausalLMKLDiv(model, reference, backend="torch")(**inputs)
    expected = logits_kl(model, reference, inputs)
    assert expected > 1e-3
    assert_same_kl_and_gradients(model, fused, expected)
    assert all(not p.requires_grad and p.grad is None for p in reference.parameters())   # frozen, untouched


@pytest.mark.parametrize("case", [case for case in CASES if case != "gemma2-softcap"])   # (its models alike: below)
def test_temperature_compares_the_softened_distributions(case):
    """The logits divided by the temperature: the head's bias and a model's logit multiplier too."""
    make_model, make_reference = CASES[case]
    model, teacher = make_model(), make_reference()
    inputs = batch(seed=11)
    fused = CausalLMKLDiv(model, teacher, temperature=2.0, backend="torch")(**inputs)
    assert_same_kl_and_gradients(model, fused, logits_kl(model, teacher, inputs, temperature=2.0))


def test_an_ignore_index_masks_its_positions():
    """Labels that use another ignore_index (5, where the batch had -100): the positions it marks are not counted."""
    model, teacher = tiny_llama(VOCAB), tiny_llama(VOCAB, seed=1)
    inputs = batch(seed=12)
    relabelled = {**inputs, "labels": inputs["labels"].masked_fill(inputs["labels"] == -100, 5)}
    fused = CausalLMKLDiv(model, teacher, backend="torch")(**relabelled, ignore_index=5)
    assert_same_kl_and_gradients(model, fused, logits_kl(model, teacher, relabelled, ignore_index=5))


def test_shift_labels_given_with_labels_say_which_positions_count():
    """labels and shift_labels both, as a Trainer under context parallelism passes them: shift_labels' positions
    count, as the model's own loss takes shift_labels as its targets (the batch was refused, "got both")."""
    model, teacher = tiny_llama(VOCAB), tiny_llama(VOCAB, seed=1)
    inputs = batch(seed=12)
    counted = inputs["labels"].clone()
    counted[:, 3:6] = -100   # other positions than labels' count
    shift_labels = torch.nn.functional.pad(counted[:, 1:], (0, 1), value=-100)
    fused = CausalLMKLDiv(model, teacher, backend="torch")(**inputs, shift_labels=shift_labels)
    assert_same_kl_and_gradients(model, fused, logits_kl(model, teacher, {**inputs, "labels": counted}))


def test_a_reference_in_training_mode_runs_without_dropout_and_keeps_its_mode():
    """A frozen copy made while the model trained (what a Trainer leaves) with attention dropout: its P is the
    eval-mode one at every call, and it is in training mode again after."""
    model = tiny_model("Llama", VOCAB, attention_dropout=0.5, tie_word_embeddings=False).eval()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    inputs = batch(seed=10)
    expected = logits_kl(model, reference.eval(), inputs)
    kl = CausalLMKLDiv(model, reference.train(), backend="torch")
    first, second = kl(**inputs), kl(**inputs)
    assert reference.training
    assert torch.equal(first, second)
    assert_same_kl_and_gradients(model, first, expected)


def test_num_items_in_batch_divides_the_sum():
    model, teacher = tiny_llama(VOCAB), tiny_llama(VOCAB, seed=1)
    inputs = batch(seed=12)
    counted = int((inputs["labels"][:, 1:] != -100).sum())
    fused = CausalLMKLDiv(model, teacher, backend="torch")(**inputs, num_items_in_batch=torch.tensor(7))
    assert_same_kl_and_gradients(model, fused, logits_kl(model, teacher, inputs) * counted / 7)


@pytest.mark.parametrize("targets", ["labels", "shift_labels"])
@pytest.mark.parametrize("case", ["llama-wider-teacher", "cohere-student-phi-teacher"])
def test_per_token_kls_and_their_sum_are_those_of_the_models_logits(case, targets):
    """reduction= went on to the decoders, whose **kwargs dropped it: "none" and "sum" both gave the mean, a scalar
    (0.006447 on a tiny Llama). "none" is the per-token KLs ([B, T - 1] against labels, [B, T] against shift_labels;
    0 at the positions not counted) and "sum" their sum, from forward and from of_hidden_states: the values and every
    gradient of the models' float64 logits."""
    from fastalign.causal_lm_loss import hidden_and_targets
    make_model, make_reference = CASES[case]
    model, teacher = make_model(), make_reference()
    inputs = batch(seed=20)
    labels = inputs.pop("labels")
    given = {"labels": labels} if targets == "labels" else \
        {"shift_labels": torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)}
    kl = CausalLMKLDiv(model, teacher, backend="torch")
    ignored = (labels[:, 1:] if targets == "labels" else given["shift_labels"]) == -100
    for reduction in ("none", "sum"):
        for method in ("forward", "of_hidden_states"):
            expected = logits_token_kls(model, teacher, {**inputs, "labels": labels})
            if targets == "shift_labels":   # (the last position, which predicts nothing, counts for nothing)
                expected = torch.nn.functional.pad(expected, (0, 1))
            expected = expected if reduction == "none" else expected.sum()
            if method == "forward":
                fused = kl(**inputs, **given, reduction=reduction)
            else:
                hidden, target = hidden_and_targets(model, given.get("labels"), given.get("shift_labels"), inputs)
                fused = kl.of_hidden_states(hidden, target, reduction=reduction, **inputs)
            assert fused.shape == expected.shape
            if reduction == "none":
                assert not fused[ignored].any()
            torch.testing.assert_close(fused.double(), expected, rtol=1e-5, atol=1e-7)
            cotangent = torch.randn(ignored.shape, dtype=torch.float64)
            mine_and_theirs = zip(grads_of(model, project(fused, cotangent)),
                                  grads_of(model, project(expected, cotangent)))
            for mine, theirs in mine_and_theirs:
                # (atol scales with the gradient: float32 rounding of the tokens' terms, of its magnitude)
                torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max().item())


@pytest.mark.parametrize("method", ["forward", "of_hidden_states"])
@pytest.mark.parametrize("keyword, value, message", [
    ("token_weight", torch.zeros(3, 8), r"token_weight: multiply the per-token KLs of reduction='none' by it"),
    ("temperature", 4.0, r"temperature: it is set when the loss is made, CausalLMKLDiv\(model, reference, \.\.\.\)'s "
                         "temperature="),
    ("grads_in_forward", True, r"grads_in_forward: it is set when the loss is made, CausalLMKLDiv\("),
    ("softcap", 30.0, r"softcap: the model's own logit soft cap \(its config's final_logit_softcapping or "
                      r"logits_soft_cap\)"),
    ("mask", torch.ones(3, 8, dtype=torch.bool), "mask: a position counts where its label is not ignore_index"),
])
def test_a_losss_keyword_among_the_inputs_is_refused_by_name_before_the_decoders_run(method, keyword, value, message):
    """A token_weight, a temperature at the call, ... went on to the decoders, whose **kwargs dropped them: the loss
    was silently the plain one (zero token weights gave the mean KL, 0.006447 on a tiny Llama; temperature=4.0 at the
    call too, where CausalLMKLDiv(..., temperature=4.0) gives 0.000405). Each is refused naming it and what to do,
    before either decoder runs."""
    model, teacher = tiny_llama(VOCAB), tiny_llama(VOCAB, seed=1)
    inputs = batch(seed=21)
    labels = inputs.pop("labels")
    kl = CausalLMKLDiv(model, teacher, backend="torch")
    calls = []
    for decoder in (model.model, teacher.model):
        decoder.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=rf"^CausalLMKLDiv\.{method} takes no {message}"):
        if method == "forward":
            kl(labels, **inputs, **{keyword: value})
        else:
            hidden = torch.randn(*labels[:, 1:].shape, model.config.hidden_size)
            kl.of_hidden_states(hidden, labels[:, 1:], **inputs, **{keyword: value})
    assert not calls


@pytest.mark.parametrize("method", ["forward", "of_hidden_states"])
@pytest.mark.parametrize("options, arguments, message", [
    ({}, {"reduction": "none", "num_items_in_batch": 11},
     r"num_items_in_batch divides a summed loss: it cannot go with reduction='none'"),
    ({}, {"reduction": "avg"}, r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"),
    ({"grads_in_forward": True}, {"reduction": "none"},
     r"^CausalLMKLDiv\(grads_in_forward=True\) takes the gradient of a scalar loss"),
])
def test_bad_reductions_are_refused_naming_them_before_the_decoders_run(method, options, arguments, message):
    """reduction="none" gives per-token KLs, which num_items_in_batch (a divisor of a sum) cannot go with, nor
    grads_in_forward in grad mode (a scalar's gradient); a reduction not of the op's is named."""
    model, teacher = tiny_llama(VOCAB), tiny_llama(VOCAB, seed=1)
    inputs = batch(seed=22)
    labels = inputs.pop("labels")
    kl = CausalLMKLDiv(model, teacher, backend="torch", **options)
    calls = []
    for decoder in (model.model, teacher.model):
        decoder.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=message):
        if method == "forward":
            kl(labels, **inputs, **arguments)
        else:
            hidden = torch.randn(*labels[:, 1:].shape, model.config.hidden_size)
            kl.of_hidden_states(hidden, labels[:, 1:], **inputs, **arguments)
    assert not calls


@pytest.mark.parametrize("method", ["forward", "of_hidden_states"])
def test_a_call_checks_its_arguments_once(method, monkeypatch):
    """forward checked its call (the loss's keywords among the inputs, the reduction) before the decoders ran, then
    of_hidden_states checked it again under its own name: each method checks once, naming itself."""
    from fastalign import causal_lm_kl_div
    model, teacher = tiny_llama(VOCAB), tiny_llama(VOCAB, seed=1)
    inputs = batch(seed=27)
    labels = inputs.pop("labels")
    kl = CausalLMKLDiv(model, teacher, backend="torch")
    checked = []

    def counted(name):
        check = getattr(causal_lm_kl_div, name)
        return lambda *args, **options: checked.append(name) or check(*args, **options)
    for name in ("refuse_loss_keywords", "check_loss_reduction"):
        monkeypatch.setattr(causal_lm_kl_div, name, counted(name))
    if method == "forward":
        kl(labels, **inputs)
    else:
        kl.of_hidden_states(model.model(**inputs).last_hidden_state[:, :-1], labels[:, 1:], **inputs)
    assert checked == ["refuse_loss_keywords", "check_loss_reduction"]   # (naming the method: tests above)


def test_per_token_kls_with_grads_in_forward_under_no_grad():
    """grads_in_forward takes no gradient under torch.no_grad(): "none" gives the per-token KLs there."""
    model, teacher = tiny_llama(VOCAB), tiny_llama(VOCAB, seed=1)
    inputs = batch(seed=23)
    with torch.no_grad():
        kls = CausalLMKLDiv(model, teacher, backend="torch", grads_in_forward=True)(**inputs, reduction="none")
        assert kls.shape == inputs["labels"][:, 1:].shape
        torch.testing.assert_close(kls, CausalLMKLDiv(model, teacher, backend="torch")(**inputs, reduction="none"))


def test_a_lora_model_against_itself_with_its_adapter_off():
    """reference='adapter': P is the base model (the adapter disabled), Q the model with it; one lm_head for both."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(VOCAB), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                   init_lora_weights=False)).train()
    inputs = batch(seed=13)
    fused = CausalLMKLDiv(model, "adapter", backend="torch")(**inputs)
    assert model.training   # the reference forward ran in eval mode, and gave the modules their mode back
    expected = logits_kl(model.eval(), None, inputs, adapter=True)
    assert expected > 1e-4
    assert_same_kl_and_gradients(model, fused, expected)


@pytest.mark.parametrize("config", [dict(), dict(bias="lora_only"), dict(modules_to_save=["lm_head"])],
                         ids=["lora", "lora-bias", "modules-to-save"])
def test_the_adapter_reference_toggles_the_lora_layers_without_walking_the_model(config, monkeypatch):
    """reference='adapter' called PEFT's disable_adapter at every forward, which walks every module of the model twice
    (133,523 Python calls a forward of a 16-layer tiny Llama with LoRA on q, k, v and o, 61,474 with the toggle): for
    plain LoRA it toggles the LoRA layers found at the first call, as unlearning's adapter reference does, the same KL
    to the bit; a LoRA with bias terms or modules_to_save keeps PEFT's, which switches the head's trained copy too."""
    from fastalign import peft_adapters
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(VOCAB), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                   init_lora_weights=False, **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name or "lora_" in name:   # a trained adapter, head copy included
                p.add_(torch.randn_like(p))
    inputs = batch(seed=26)
    found, lora_layers = [], peft_adapters.lora_layers
    with monkeypatch.context() as patched:   # PEFT's disable_adapter at every call
        patched.setattr(peft_adapters, "lora_layers", lambda model: None)
        expected = CausalLMKLDiv(model, "adapter", backend="torch")(**inputs)
    monkeypatch.setattr(peft_adapters, "lora_layers", lambda model: found.append(1) or lora_layers(model))
    kl = CausalLMKLDiv(model, "adapter", backend="torch")
    walks, disable_adapter = [], type(model).disable_adapter
    monkeypatch.setattr(type(model), "disable_adapter", lambda model: walks.append(1) or disable_adapter(model))
    for _ in range(2):
        torch.testing.assert_close(kl(**inputs), expected, rtol=0, atol=0)
    assert len(walks) == (0 if not config else 2)
    assert len(found) == 1   # the layers are found at the first call only
    torch.testing.assert_close(expected.double(), logits_kl(model, None, inputs, adapter=True), rtol=1e-5, atol=1e-7)


def test_a_frozen_copy_of_the_model_is_at_kl_zero_with_zero_gradients():
    model = tiny_llama(VOCAB)
    loss = CausalLMKLDiv(model, copy.deepcopy(model), backend="torch")(**batch(seed=14))
    assert abs(loss.item()) < 1e-6
    assert all(g is None or g.abs().max() < 1e-6 for g in grads_of(model, loss))


def heads_kl(model, reference, inputs):
    """The token mean over labelled positions of KL(P || Q) in float64 from both models' final hidden states and
    lm_heads (the logits of a bf16 model are rounded to bf16; this KL of its hidden states is not)."""
    forward = {name: t for name, t in inputs.items() if name != "labels"}
    with torch.no_grad():
        logits = [(m.model(**forward).last_hidden_state[:, :-1].double() @ m.lm_head.weight.double().T)
                  for m in (model, reference)]
    log_q, log_p = (z.log_softmax(-1) for z in logits)
    counted = inputs["labels"][:, 1:] != -100
    return (log_p.exp() * (log_p - log_q)).sum(-1)[counted].mean()


@pytest.mark.parametrize("dtype, reference_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_a_teacher_in_another_dtype_than_the_student_computes_in_its_own(dtype, reference_dtype):
    """The teacher's hidden states and lm_head were cast to the student's dtype: an fp32 teacher of a bf16 student
    rounded to bf16 (a KL of 0.94641 where its own dtype gives 0.94609)."""
    model = drawn_weights(tiny_llama(VOCAB)).to(dtype)
    teacher = drawn_weights(tiny_llama(VOCAB, hidden_size=48, seed=1)).to(reference_dtype)
    inputs = batch(seed=10)
    fused = CausalLMKLDiv(model, teacher, backend="torch")(**inputs)
    torch.testing.assert_close(fused.detach().double(), heads_kl(model, teacher, inputs), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype, reference_dtype, autocast", [(torch.float32, torch.bfloat16, False),
                                                               (torch.bfloat16, torch.float32, False),
                                                               (torch.float32, torch.bfloat16, True)])
def test_each_head_is_passed_in_its_own_dtype_or_the_autocast_one_uncopied(monkeypatch, dtype, reference_dtype,
                                                                          autocast):
    """A bf16 teacher's [V, H_ref] lm_head was copied to fp32 at every call for an fp32 student (2 GiB for an 8B
    teacher). Each head goes to linear_kl_div in its own dtype, under autocast in the autocast dtype, as its matmul
    would: a head already in it is the model's very tensor."""
    from fastalign import causal_lm_kl_div
    model = tiny_llama(VOCAB).to(dtype)
    teacher = tiny_llama(VOCAB, hidden_size=48, seed=1).to(reference_dtype)
    passed = {}

    def spy(hidden, weight, ref_hidden, ref_weight, **options):
        passed.update(weight=weight, ref_weight=ref_weight)
        return linear_kl_div(hidden, weight, ref_hidden, ref_weight, **options)

    monkeypatch.setattr(causal_lm_kl_div, "linear_kl_div", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        CausalLMKLDiv(model, teacher, backend="torch")(**batch(seed=10))
    for head, tensor in ((model.lm_head, passed["weight"]), (teacher.lm_head, passed["ref_weight"])):
        assert tensor.dtype == (torch.bfloat16 if autocast else head.weight.dtype)
        if tensor.dtype == head.weight.dtype:
            assert tensor is head.weight


def test_inputs_embeds_go_to_a_reference_sharing_the_models_embeddings():
    """inputs_embeds in place of input_ids: both decoders take them, where the reference's input embeddings are the
    model's, here a frozen embedding module both hold (so the KL is that of the ids)."""
    model = tiny_llama(VOCAB)
    model.model.embed_tokens.requires_grad_(False)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference.model.layers.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference.model.embed_tokens = model.model.embed_tokens
    inputs = batch(seed=10)
    embedded = {**inputs, "inputs_embeds": model.get_input_embeddings()(inputs["input_ids"]).detach()}
    del embedded["input_ids"]
    kl = CausalLMKLDiv(model, reference, backend="torch")
    torch.testing.assert_close(kl(**embedded), kl(**inputs))


@pytest.mark.parametrize("width", [32, 48], ids=["same-width", "other-width"])
def test_inputs_embeds_with_a_reference_of_its_own_embeddings_are_refused_naming_them(width):
    """The model's embeddings went to the reference as they were: a teacher of the model's width (the usual
    distillation), or a frozen copy once the model's embeddings trained, silently got the model's embeddings for its
    own (a KL of 0.0124 for the ids' 0.0126); a wider teacher failed deep in transformers' first norm ("The size of
    tensor a (48) must match the size of tensor b (32)"), naming no argument."""
    model, teacher = tiny_llama(VOCAB), tiny_llama(VOCAB, hidden_size=width, seed=1)
    inputs = batch(seed=1)
    embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
    with pytest.raises(ValueError, match=r"^inputs_embeds go to the reference too, whose input embeddings are not the "
                                         r"model's \(the same weight tensor\): pass input_ids"):
        CausalLMKLDiv(model, teacher, backend="torch")(inputs_embeds=embeds, **inputs)


def test_the_triton_kernels_give_the_same_kl():
    model, teacher = tiny_phi(VOCAB).to(TRITON_DEVICE), tiny_phi(VOCAB, seed=1).to(TRITON_DEVICE)
    inputs = {name: t.to(TRITON_DEVICE) for name, t in batch(seed=15).items()}
    fused = CausalLMKLDiv(model, teacher, backend="triton")(**inputs)
    assert_same_kl_and_gradients(model, fused, logits_kl(model, teacher, inputs))


@pytest.mark.parametrize("make_reference, options, error, message", [
    (lambda: tiny_llama(VOCAB + 1), {}, ValueError, "reference must have the vocabulary of model \\(53 words\\)"),
    (lambda: "adapter", {}, ValueError, "'adapter' for a PEFT model .* got 'adapter' for a LlamaForCausalLM"),
    (lambda: "copy", {}, ValueError, "reference must be a causal LM, or 'adapter'"),
    (lambda: 3, {}, TypeError, "reference must be a causal LM or 'adapter', got int"),
    (lambda: tiny_llama(VOCAB), {"temperature": 0.0}, ValueError, "temperature must be a positive finite number"),
    # (1.0 / T raised OverflowError at the first call)
    (lambda: tiny_llama(VOCAB), {"temperature": 10 ** 400}, ValueError, "temperature must be a positive finite "),
    (lambda: tiny_gemma2(VOCAB, softcap=0.5), {}, NotImplementedError, "cap their logits differently"),
])
def test_bad_references_are_refused_naming_the_argument(make_reference, options, error, message):
    reference = make_reference()
    with pytest.raises(error, match=message):
        CausalLMKLDiv(tiny_llama(VOCAB), reference, **options)
    if isinstance(reference, torch.nn.Module):   # left as it was (a model passed by mistake was frozen, untrainable)
        assert all(p.requires_grad for p in reference.parameters())


@pytest.mark.parametrize("settings, error, message", [
    ({"backend": "bogus"}, ValueError, "backend must be one of .* got 'bogus'"),
    ({"grads_in_forward": "yes"}, TypeError, "CausalLMKLDiv: grads_in_forward must be True or False, got 'yes'")])
def test_bad_settings_are_refused_when_given_with_the_reference_left_as_it_was(settings, error, message):
    """A bad backend or grads_in_forward was taken, and raised only at the first training forward, after the reference
    was frozen (a model passed by mistake, untrainable then)."""
    reference = tiny_llama(VOCAB, seed=1)
    with pytest.raises(error, match=message):
        CausalLMKLDiv(tiny_llama(VOCAB), reference, **settings)
    assert all(p.requires_grad for p in reference.parameters())


def test_a_reference_that_shares_the_models_trainable_parameters_is_refused():
    """Freezing it froze the model being trained, silently: a KL of 0 without a gradient, and a training loop that
    failed later far from the cause. A PEFT model's base model holds its adapter, so it is the model too."""
    peft = pytest.importorskip("peft")
    model = tiny_llama(VOCAB)
    lora = peft.get_peft_model(tiny_llama(VOCAB), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    for trained, reference in ((model, model), (lora, lora.get_base_model())):
        before = [p.requires_grad for p in trained.parameters()]
        with pytest.raises(ValueError, match="reference shares trainable parameters with model"):
            CausalLMKLDiv(trained, reference)
        assert [p.requires_grad for p in trained.parameters()] == before


def test_soft_caps_set_after_construction_are_the_ones_applied():
    """The configs are read at every call, as the models' forwards read them: a soft cap changed on both models since
    is the one the KL applies, and one changed on one model alone is refused then."""
    model, reference = (make() for make in CASES["gemma2-softcap"])
    kl = CausalLMKLDiv(model, reference, backend="torch")
    for m in (model, reference):
        m.config.final_logit_softcapping = 30.0
    inputs = batch(seed=12)
    assert_same_kl_and_gradients(model, kl(**inputs), logits_kl(model, reference, inputs))
    reference.config.final_logit_softcapping = 20.0
    with pytest.raises(NotImplementedError, match=r"cap their logits differently \(30.0 and 20.0\)"):
        kl(**inputs)


def test_the_forwards_sources_are_read_when_made_and_the_soft_caps_at_every_call(monkeypatch):
    """Every call read the models' forwards' sources (where they read their soft caps and logit multipliers) by
    inspect, which dynamo cannot trace: a graph break a call in a compiled caller. They are read once, when the KL is
    made; the values still at every call."""
    model, reference = (make() for make in CASES["gemma2-softcap"])
    kl = CausalLMKLDiv(model, reference, backend="torch")
    monkeypatch.setattr(models, "function_source", lambda function: pytest.fail(f"read {function} again"))
    for m in (model, reference):
        m.config.final_logit_softcapping = 30.0
    inputs = batch(seed=13)
    assert_same_kl_and_gradients(model, kl(**inputs), logits_kl(model, reference, inputs))


def test_a_temperature_softens_soft_capped_logits():
    """A temperature with soft-capped logits (Gemma 2's final_logit_softcapping) was refused: c tanh(z / c) / T is
    the cap c / T of the logits z / T, which the fused KL computes (here logits of O(1) that a cap of 0.5 bends)."""
    model = drawn_weights(tiny_gemma2(VOCAB, softcap=0.5))
    teacher = drawn_weights(tiny_gemma2(VOCAB, softcap=0.5))
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.3 * torch.randn_like(p))
    inputs = batch(seed=11)
    fused = CausalLMKLDiv(model, teacher, temperature=2.0, backend="torch")(**inputs)
    expected = logits_kl(model, teacher, inputs, temperature=2.0)
    assert expected > 1e-3
    assert_same_kl_and_gradients(model, fused, expected)


@requires_cuda
def test_bf16_on_the_gpu_gives_the_logits_kl_to_bf16_rounding():
    """The Triton kernels on bf16 models of a larger vocabulary, a wider teacher: the KL and every gradient within
    bf16's rounding of the float64 KL of their logits."""
    model = tiny_llama(4099, hidden_size=64).to("cuda", torch.bfloat16)
    teacher = tiny_llama(4099, hidden_size=96, seed=1).to("cuda", torch.bfloat16)
    inputs = {name: t.to("cuda") for name, t in batch(seed=17, rows=4, width=33).items()}
    fused = CausalLMKLDiv(model, teacher, backend="triton")(**inputs)
    expected = logits_kl(model, teacher, inputs)
    torch.testing.assert_close(fused.double(), expected, rtol=3e-2, atol=1e-4)
    for mine, theirs in zip(grads_of(model, fused), grads_of(model, expected)):
        assert (mine.float() - theirs.float()).norm() <= 5e-2 * theirs.float().norm()


def test_models_on_the_meta_device_are_refused_naming_it():
    """A model and a reference on the meta device: the KL failed with torch's "unknown device type for autocast"
    (compute_dtype asked autocast about the meta device) before fastalign's own checks."""
    kl_div = CausalLMKLDiv(meta_llama(), meta_llama(seed=1))
    with pytest.raises(ValueError, match="meta device"):
        kl_div(**batch())


def test_a_reference_with_a_part_not_loaded_is_refused_naming_it():
    """A part of the reference on the meta device that no accelerate hook loads: the probe of its logits was skipped
    and the KL computed on uninitialised memory (F.linear of a CPU input and a meta weight), silently."""
    reference = tiny_llama(VOCAB, seed=1)
    reference.model.layers[1].mlp.to("meta")
    with pytest.raises(ValueError, match=r"^reference: its weights are not loaded \(model.layers.1.mlp.gate_proj "):
        CausalLMKLDiv(tiny_llama(VOCAB), reference)


def test_an_offloaded_reference_lm_head_is_refused_naming_it():
    """A frozen reference offloaded by accelerate to save memory (its lm_head's weight on the meta device, loaded by
    its hook when the lm_head runs, which the fused KL never runs): the KL failed with "ref_weight must be on cpu like
    the hidden states", naming an argument the caller never passed, not the offloading."""
    accelerate = pytest.importorskip("accelerate")
    reference = tiny_llama(VOCAB, seed=1)
    accelerate.cpu_offload(reference.lm_head, execution_device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"the reference's lm_head weight is on the meta device \(offloaded by"):
        CausalLMKLDiv(tiny_llama(VOCAB), reference)(**batch())


def test_a_reference_lm_head_offloaded_after_the_kl_was_made_is_refused_naming_the_reference():
    """A reference whose lm_head accelerate offloads after the KL was made is refused at the call, naming the
    reference's lm_head, not the model's: the call checks it again, the check when the KL is made having passed."""
    accelerate = pytest.importorskip("accelerate")
    reference = tiny_llama(VOCAB, seed=1)
    kl = CausalLMKLDiv(tiny_llama(VOCAB), reference, backend="torch")
    accelerate.cpu_offload(reference.lm_head, execution_device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"^the reference's lm_head weight is on the meta device \(offloaded by"):
        kl(**batch())


def test_a_prompt_learning_adapter_is_refused_by_name():
    """reference='adapter' of a PEFT prompt-tuning model: both decoders ran on the inputs alone, without the virtual
    tokens that PEFT's forward puts before them, the adapter on and off alike: a KL of exactly 0. Refused by name."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(VOCAB), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                           num_virtual_tokens=3))
    with pytest.raises(NotImplementedError, match=r"its PEFT adapter \(PromptTuningConfig\) is a prompt-learning"):
        CausalLMKLDiv(model, "adapter")


def test_a_model_resized_after_the_loss_was_made_is_refused_naming_both_vocabularies():
    """model.resize_token_embeddings after CausalLMKLDiv(model, reference) was made: the call's error named
    linear_kl_div's arguments ("ref_weight must have the vocabulary size of weight (60 rows)"), not the models."""
    model = tiny_llama(VOCAB)
    loss = CausalLMKLDiv(model, copy.deepcopy(model), backend="torch")
    model.resize_token_embeddings(VOCAB + 7, mean_resizing=False)
    with pytest.raises(ValueError, match=rf"^reference must have the vocabulary of model \({VOCAB + 7} words\), "
                                         rf"got {VOCAB}$"):
        loss(**batch(seed=16))


def test_a_reference_whose_lm_head_is_stored_in_float8_is_refused_naming_it():
    """A reference whose lm_head stores float8 weights it rescales in its forward: the fused KL read the raw weight,
    without its scale, and the probe let it through: a KL of 0.721 where the models' logits give 0.996."""
    from tests.test_causal_lm_loss import FP8Linear
    reference = tiny_llama(VOCAB, seed=1)
    reference.lm_head = FP8Linear(reference.lm_head)
    with pytest.raises(NotImplementedError, match=r"the reference's lm_head weight \(53, 32\) torch.float8_e4m3fn"):
        CausalLMKLDiv(tiny_llama(VOCAB), reference)


def adapter_case():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(VOCAB), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                   init_lora_weights=False))
    return model, "adapter"


HIDDEN_STATES_CASES = {"llama-wider-teacher": lambda: tuple(make() for make in CASES["llama-wider-teacher"]),
                       "gemma2-softcap": lambda: tuple(make() for make in CASES["gemma2-softcap"]),
                       "lora-adapter-off": adapter_case}


@pytest.mark.parametrize("targets", ["labels", "shift_labels"])
@pytest.mark.parametrize("case", HIDDEN_STATES_CASES)
def test_of_hidden_states_gives_forwards_kl_and_gradients(case, targets):
    """CausalLMKLDiv had no of_hidden_states, as CausalLMLoss has: SFT with a KL to a reference ran the student's
    decoder twice, once for each loss. The KL of the decoder's hidden states and their targets is forward's."""
    model, reference = HIDDEN_STATES_CASES[case]()
    if case == "gemma2-softcap":   # the same architecture and seed: other weights, so that the KL is no zero
        with torch.no_grad():
            for p in reference.parameters():
                p.add_(0.05 * torch.randn_like(p))
    inputs = batch(seed=18)
    labels = inputs.pop("labels")
    kl = CausalLMKLDiv(model, reference, backend="torch")
    decoder = model.get_base_model().model if case == "lora-adapter-off" else model.model
    hidden = decoder(**inputs).last_hidden_state
    if targets == "labels":
        expected, fused = kl(labels, **inputs), kl.of_hidden_states(hidden[:, :-1], labels[:, 1:], **inputs)
    else:
        shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        expected, fused = kl(shift_labels=shift_labels, **inputs), kl.of_hidden_states(hidden, shift_labels, **inputs)
    assert expected > 1e-4
    torch.testing.assert_close(fused, expected, rtol=1e-6, atol=1e-8)
    for mine, theirs in zip(grads_of(model, fused), grads_of(model, expected)):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-8)


def test_cross_entropy_and_kl_from_one_decoder_run_are_the_two_calls_sum():
    """SFT plus a KL to a teacher from one run of the student's decoder (the README's example): the sum, and its
    gradients, of CausalLMLoss's and CausalLMKLDiv's forwards, each of which runs the decoder."""
    from fastalign import CausalLMLoss
    model, teacher = tiny_llama(VOCAB), tiny_llama(VOCAB, hidden_size=48, seed=1)
    loss_fn, kl_fn = CausalLMLoss(model, backend="torch"), CausalLMKLDiv(model, teacher, backend="torch")
    inputs = batch(seed=19)
    ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    ce = loss_fn.of_hidden_states(hidden[:, :-1], labels[:, 1:])
    kl = kl_fn.of_hidden_states(hidden[:, :-1], labels[:, 1:], input_ids=ids, attention_mask=mask)
    expected = loss_fn(**inputs) + kl_fn(**inputs)
    torch.testing.assert_close(ce + kl, expected, rtol=1e-6, atol=1e-8)
    for mine, theirs in zip(grads_of(model, ce + kl), grads_of(model, expected)):   # (summed in another order)
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("given", ["labels", "shift_labels"])
def test_a_reference_that_puts_image_tokens_before_the_text_is_refused_naming_why(given):
    """A reference such as GIT puts tokens of its own before the text's hidden states, so its first positions, which
    of_hidden_states takes, are not the text's: forward's predicting_positions refused it naming the model and why,
    of_hidden_states's length check only said hidden was misplaced (and would pass one token before the text against
    shift_labels). It is refused naming the reference and why again."""
    model, git = tiny_llama(VOCAB), tiny_git()
    ids = torch.randint(0, VOCAB, (2, 4))
    hidden = model.model(input_ids=ids).last_hidden_state
    hidden, target = (hidden[:, :-1], ids[:, 1:]) if given == "labels" else (hidden, ids)
    with pytest.raises(NotImplementedError, match=r"reference GitForCausalLM: its hidden states \(6 positions\) are "
                                                  r"longer than the inputs' 4 tokens"):
        CausalLMKLDiv(model, git, backend="torch").of_hidden_states(hidden, target, input_ids=ids,
                                                                    pixel_values=torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("positions, target_positions, message", [
    (slice(None, -2), slice(1, -1), r"^hidden must be the model's final hidden states at the first positions of the "
                                    r"inputs \(all but the last against labels\[:, 1:\]\): the reference's are 9 "
                                    r"positions, hidden's 7$"),
    (slice(None, -1), slice(None), r"^hidden must be \[B, T', H\] and target a tensor of its \[B, T'\], got hidden "
                                   r"\(3, 8, 32\) and target \(3, 9\)$")])
def test_hidden_states_not_at_the_inputs_positions_are_refused_naming_them(positions, target_positions, message):
    """Hidden states the reference's cannot be aligned with, or targets not of their positions, are refused naming
    hidden and target, not linear_kl_div's arguments."""
    model, teacher = tiny_llama(VOCAB), tiny_llama(VOCAB, seed=1)
    inputs = batch(seed=20)
    labels = inputs.pop("labels")
    hidden = model.model(**inputs).last_hidden_state
    with pytest.raises(ValueError, match=message):
        CausalLMKLDiv(model, teacher, backend="torch").of_hidden_states(hidden[:, positions],
                                                                        labels[:, target_positions], **inputs)


def test_hidden_states_of_another_rank_are_refused_naming_hidden():
    """Hidden [B * T', H] with target [B * T'] is refused by of_hidden_states' own check, not an IndexError."""
    model, teacher = tiny_llama(VOCAB), tiny_llama(VOCAB, seed=1)
    inputs = batch(seed=22)
    labels = inputs.pop("labels")
    hidden = model.model(**inputs).last_hidden_state[:, :-1]
    with pytest.raises(ValueError, match=r"^hidden must be \[B, T', H\] and target a tensor of its \[B, T'\], got "
                                         r"hidden \(24, 32\) and target \(24,\)$"):
        CausalLMKLDiv(model, teacher, backend="torch").of_hidden_states(hidden.flatten(0, 1),
                                                                        labels[:, 1:].flatten(), **inputs)


def test_hidden_states_longer_than_the_inputs_are_refused_naming_hidden():
    """Hidden of more positions than the reference's (the inputs cut after the decoder ran) is refused naming hidden,
    not by linear_kl_div's shape check."""
    model, teacher = tiny_llama(VOCAB), tiny_llama(VOCAB, seed=1)
    inputs = batch(seed=23)
    labels = inputs.pop("labels")
    hidden = model.model(**inputs).last_hidden_state            # all 9 positions, against shift_labels
    shorter = {name: t[:, :-1] for name, t in inputs.items()}  # the reference sees 8
    with pytest.raises(ValueError, match=r"the reference's are 8 positions, hidden's 9$"):
        CausalLMKLDiv(model, teacher, backend="torch").of_hidden_states(hidden, labels, **shorter)
