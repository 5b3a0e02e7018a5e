"""CausalLMLoss against the model's own loss: model(..., labels=labels).loss, from its materialised logits; and
wrapped by DDP and FSDP2 in two gloo processes on the CPU."""
import copy
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch

from fastalign import CausalLMKLDiv, CausalLMLoss, fuse_causal_lm_loss
from fastalign.unlearn.models import enable_activation_checkpointing
from tests.conftest import TRITON_DEVICE, device_for, requires_cuda
from tests.unlearn.test_objective import TRANSFORMED_LOGITS
from tests.unlearn.tiny import tiny_llama, tiny_phi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 53   # a vocabulary of no block's multiple
# (the fork that scales its logits twice does so after its forward took the loss: its loss is not its logits')
MODELS = {"llama": tiny_llama, "phi-biased-head": tiny_phi,
          **{case: make_model for case, (make_model, _) in TRANSFORMED_LOGITS.items() if case != "two-multipliers"}}


def batch(seed=0, rows=3, width=9):
    """input_ids, attention_mask (the second row left-padded by 3), labels: the ids, -100 on the padding and on each
    row's first two tokens (a prompt)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (rows, width), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :2] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def grads_of(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def assert_same_loss_and_gradients(model, fused, expected):
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(grads_of(model, fused), grads_of(model, expected)):
        if theirs is None:
            assert mine is None or not mine.any()
        else:
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", MODELS)
def test_loss_and_gradients_are_the_models_own(family):
    """Every family whose logits the fused op reproduces (an lm_head bias, a soft cap, logit multipliers): the token
    mean of the shifted labels, and every parameter's gradient, as the model's forward with labels gives them."""
    model = MODELS[family](VOCAB)
    inputs = batch()
    assert_same_loss_and_gradients(model, CausalLMLoss(model, backend="torch")(**inputs), model(**inputs).loss)


def test_a_vision_language_model_sees_its_images():
    """Gemma 3's image-text model, a batch with an image per row: the loss, the KL to a perturbed copy, the fused
    forward's loss and every gradient (the vision tower's too) are the model's own. Its text decoder alone took
    pixel_values into its **kwargs and dropped them: the loss of a model that saw no image."""
    import copy
    from tests.runtime.tiny_models import VOCAB as GEMMA3_VOCAB, tiny_model
    model = tiny_model("gemma3-image-text").train()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, GEMMA3_VOCAB - 4, (2, 12), generator=generator)
    input_ids[:, 2:6] = model.config.image_token_index   # mm_tokens_per_image of them
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "token_type_ids": (input_ids == model.config.image_token_index).long(),
              "pixel_values": torch.randn(2, 3, 28, 28, generator=generator),
              "labels": input_ids.masked_fill(input_ids == model.config.image_token_index, -100)}
    expected = model(**inputs).loss
    without_images = model(**{k: v for k, v in inputs.items() if k != "pixel_values"}).loss
    assert abs(float(expected - without_images)) > 1e-4   # the images matter to this loss
    assert_same_loss_and_gradients(model, CausalLMLoss(model, backend="torch")(**inputs), expected)
    fused = fuse_causal_lm_loss(copy.deepcopy(model), backend="torch")
    torch.testing.assert_close(fused(**inputs).loss, expected, rtol=1e-5, atol=1e-6)
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
        labels = inputs["labels"][:, 1:]
        log_q, log_p = (torch.log_softmax(m(**inputs).logits[:, :-1].double(), -1) for m in (model, reference))
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)[labels != -100].mean()
    torch.testing.assert_close(CausalLMKLDiv(model, reference, backend="torch")(**inputs).double(), kl,
                               rtol=1e-4, atol=1e-7)


SMALL_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
SMALL_VISION = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, image_size=16, patch_size=8)
TEXT_CONFIG_TRANSFORMS = {   # model class, config class, config settings (skipped where transformers has no class)
    "paligemma-gemma2-softcap": ("PaliGemmaForConditionalGeneration", "PaliGemmaConfig", dict(
        text_config=dict(model_type="gemma2", **SMALL_TEXT, final_logit_softcapping=2.0), vision_config=SMALL_VISION,
        image_token_index=VOCAB - 1, projection_dim=32)),
    "aya-vision-logit-scale": ("AyaVisionForConditionalGeneration", "AyaVisionConfig", dict(
        text_config=dict(model_type="cohere2", **SMALL_TEXT, logit_scale=0.3), vision_config=SMALL_VISION,
        image_token_index=VOCAB - 1)),
    "hyperclovax-logits-scaling": ("HyperCLOVAXForCausalLM", "HyperCLOVAXConfig",
                                   dict(**SMALL_TEXT, logits_scaling=4.0)),
}


def tiny_git():
    """A tiny random GIT, which puts its image's tokens (16-pixel images in one patch, and a class token) before its
    text's."""
    import transformers
    torch.manual_seed(0)
    return transformers.GitForCausalLM(transformers.GitConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=16),
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32))


def test_a_model_that_puts_image_tokens_before_the_text_is_refused_naming_why():
    """GIT puts its image tokens before the text's hidden states and takes its loss on the text's positions alone
    (logits[:, num_image_tokens:-1]): CausalLMLoss, the KL and the fused forward gave it with pixel_values 'labels
    must be an integer tensor of the inputs' shape (2, 6), got (2, 4)', although the labels have the input_ids'
    shape. They refuse it naming the model and why."""
    import copy
    git = tiny_git()
    ids = torch.randint(0, VOCAB, (2, 4))
    images = {"input_ids": ids, "pixel_values": torch.randn(2, 3, 16, 16), "labels": ids}
    fused = copy.deepcopy(git)
    fuse_causal_lm_loss(fused)
    for loss in (CausalLMLoss(git), CausalLMKLDiv(git, copy.deepcopy(git)), fused):
        with pytest.raises(NotImplementedError, match=r"GitForCausalLM: its hidden states \(6 positions\) are longer "
                                                      r"than the labels \(4\): it puts other tokens \(images\)"):
            loss(**images)


@pytest.mark.parametrize("case", TEXT_CONFIG_TRANSFORMS)
def test_a_soft_cap_or_multiplier_of_the_text_config_or_a_multiplying_logits_scaling_is_the_models_own(case):
    """A vision-language model's forward reads the soft cap or logit multiplier of its text config (PaliGemma 2's,
    Aya Vision's): read from the top-level config only, the model was refused as one whose logits the fused op
    cannot reproduce. HyperCLOVAX's logits_scaling multiplies its logits where Granite's divides them: taken for
    Granite's, it was refused so too."""
    import transformers
    model_class, config_class, settings = TEXT_CONFIG_TRANSFORMS[case]
    if not hasattr(transformers, model_class):
        pytest.skip(f"transformers {transformers.__version__} has no {model_class}")
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**settings))
    inputs = batch()
    inputs["input_ids"] = inputs["input_ids"].clamp(max=VOCAB - 2)   # no image token
    assert_same_loss_and_gradients(model, CausalLMLoss(model, backend="torch")(**inputs), model(**inputs).loss)


@pytest.mark.parametrize("settings, error, message", [
    ({"backend": "bogus"}, ValueError, "backend must be one of .* got 'bogus'"),
    ({"grads_in_forward": "yes"}, TypeError, "CausalLMLoss: grads_in_forward must be True or False, got 'yes'"),
    ({"label_smoothing": 1.5}, ValueError, r"label_smoothing must lie in \[0, 1\], got 1.5"),
    ({"label_smoothing": "0.1"}, TypeError, r"label_smoothing must be a real number in \[0, 1\], got '0.1'")])
def test_bad_settings_are_refused_when_given(settings, error, message):
    """A bad backend, grads_in_forward or label_smoothing was taken, and raised only at the first training forward,
    after the decoder ran."""
    with pytest.raises(error, match=message):
        CausalLMLoss(tiny_llama(VOCAB), **settings)


def test_a_router_loss_the_model_adds_is_refused():
    """A mixture of experts whose config adds the router's auxiliary loss to its loss (output_router_logits), when the
    module is made, when the config is set after, or when a call asks for it: refused, naming it. CausalLMLoss took
    the cross-entropy alone, another loss than the model's, and its router another gradient."""
    from tests.unlearn.test_objective import tiny_model
    def mixtral(**settings):
        return tiny_model("Mixtral", VOCAB, num_local_experts=4, num_experts_per_tok=2, **settings)
    message = "MixtralForCausalLM: its config's output_router_logits adds the router's auxiliary loss"
    with pytest.raises(NotImplementedError, match=message):
        CausalLMLoss(mixtral(output_router_logits=True))
    model = mixtral()
    loss = CausalLMLoss(model, backend="torch")
    inputs = batch()
    assert_same_loss_and_gradients(model, loss(**inputs), model(**inputs).loss)
    with pytest.raises(NotImplementedError, match="output_router_logits=True asks for the router's auxiliary loss"):
        loss(**inputs, output_router_logits=True)
    model.config.output_router_logits = True
    with pytest.raises(NotImplementedError, match=message):
        loss(**inputs)


def test_a_model_that_computes_its_loss_itself_is_refused_as_the_fused_forward_refuses_it():
    """BartForCausalLM (as the other seq2seq decoders' causal LMs) takes its loss on labels it does not shift: the
    fused forward refused it, but CausalLMLoss took it and silently gave the shifted cross-entropy, another loss."""
    import transformers
    bart = transformers.BartForCausalLM(transformers.BartConfig(
        vocab_size=VOCAB, d_model=32, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
        encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=64, max_position_embeddings=64))
    for fuse, computed_by in ((CausalLMLoss, "CausalLMLoss"), (fuse_causal_lm_loss, "the fused forward")):
        with pytest.raises(NotImplementedError, match="BartForCausalLM: its forward computes its loss itself, not "
                                                      f"through transformers' ForCausalLMLoss, which {computed_by}"):
            fuse(bart)


def test_a_router_setting_a_dense_models_forward_ignores_is_no_router_loss():
    """output_router_logits on the config of a model without a router (a Llama, whose forward adds no auxiliary loss)
    changes nothing: the model is served, not refused for a loss it never adds."""
    model = tiny_llama(VOCAB)
    model.config.output_router_logits = True
    inputs = batch()
    assert_same_loss_and_gradients(model, CausalLMLoss(model, backend="torch")(**inputs), model(**inputs).loss)


@pytest.mark.parametrize("num_items", [11, torch.tensor(11)], ids=["int", "tensor"])
def test_num_items_in_batch_divides_the_sum_as_the_model_does(num_items):
    """Under gradient accumulation a Trainer passes the step's number of counted tokens: the loss is then the sum
    over this batch's tokens divided by it (for one of several micro-batches, not this batch's count)."""
    model = tiny_llama(VOCAB)
    inputs = batch(seed=1)
    fused = CausalLMLoss(model, backend="torch")(**inputs, num_items_in_batch=num_items)
    assert_same_loss_and_gradients(model, fused, model(**inputs, num_items_in_batch=num_items).loss)
    per_token_mean = CausalLMLoss(model, backend="torch")(**inputs)
    counted = int((inputs["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(fused, per_token_mean * counted / 11)


PER_TOKEN_MODELS = ["llama", "cohere-logit-scale", "gemma2-softcap"]   # plain, multiplied and soft-capped logits


def own_token_losses(model, inputs, target):
    """-log p(target) of each position that predicts, from the model's own logits in float64; 0 at ignored ones."""
    log_p = model(**inputs).logits[:, :-1].double().log_softmax(-1)
    return -log_p.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1).masked_fill(target == -100, 0)


def project(loss, cotangent):
    """A scalar of the loss to take gradients of: a "none" loss weighted by the cotangent, as a caller's sum would."""
    return loss if loss.dim() == 0 else (loss * cotangent.to(loss.dtype)).sum()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", PER_TOKEN_MODELS)
def test_weighted_per_token_losses_are_the_models_own_log_probs(family, backend):
    """of_hidden_states gave only a mean, or a sum over num_items_in_batch, so DPO-style losses took the op alone,
    which leaves out the model's logit multiplier and soft cap (a Cohere's sequence log-probs -29.96 for its own
    -27.65). token_weight of both signs and reduction "none" / "sum" / "mean": the values and every gradient are
    those of the model's own float64 log-probs, 0 at ignored targets."""
    from fastalign.causal_lm_loss import hidden_and_targets
    device = device_for(backend)
    model = MODELS[family](VOCAB).to(device)
    inputs = {name: t.to(device) for name, t in batch(seed=1).items()}
    labels = inputs.pop("labels")
    loss_fn = CausalLMLoss(model, backend=backend)
    target = labels[:, 1:]
    token_weight = torch.linspace(-1.5, 2.0, target.numel(), device=device).reshape(target.shape)
    cotangent = torch.randn(target.shape, generator=torch.Generator().manual_seed(0)).to(device)
    counted = (target != -100).sum()
    for reduction in ("none", "sum", "mean"):
        weighted = own_token_losses(model, inputs, target) * token_weight.double()
        expected = {"none": weighted, "sum": weighted.sum(), "mean": weighted.sum() / counted}[reduction]
        hidden, shifted = hidden_and_targets(model, labels, None, inputs)
        fused = loss_fn.of_hidden_states(hidden, shifted, token_weight=token_weight, reduction=reduction)
        assert fused.shape == expected.shape
        if reduction == "none":
            assert not fused[target == -100].any()
        torch.testing.assert_close(fused.double(), expected, rtol=1e-5, atol=1e-6)
        mine_and_theirs = zip(grads_of(model, project(fused, cotangent)), grads_of(model, project(expected, cotangent)))
        for mine, theirs in mine_and_theirs:
            # atol scales with the gradient: an element where the tokens' terms cancel is float32 rounding of terms of
            # its magnitude (an embed_tokens element off by 1.6e-6 on transformers 5.17, whatever the backend)
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max().item())


def test_sequence_log_probs_of_the_forward_are_the_models_own():
    """The README's DPO-style use: forward(..., reduction="none") against labels with -100 on the prompt, negated and
    summed over each row, is each sequence's answer log-probability from the model's own logits (a Cohere's, whose
    multiplier the op alone leaves out); "sum" is their sum, and with num_items_in_batch either reduction is the sum
    divided by it."""
    model = MODELS["cohere-logit-scale"](VOCAB)
    inputs = batch(seed=1)
    loss_fn = CausalLMLoss(model, backend="torch")
    target = inputs["labels"][:, 1:]
    expected = -own_token_losses(model, {k: v for k, v in inputs.items() if k != "labels"}, target).sum(-1)
    sequence_log_probs = -loss_fn(**inputs, reduction="none").sum(-1)
    torch.testing.assert_close(sequence_log_probs.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_fn(**inputs, reduction="sum").double(), -expected.sum(), rtol=1e-5, atol=1e-5)
    for reduction in ("sum", "mean"):
        torch.testing.assert_close(loss_fn(**inputs, reduction=reduction, num_items_in_batch=11).double(),
                                   -expected.sum() / 11, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arguments, message", [
    ({"reduction": "none", "num_items_in_batch": 11},
     r"num_items_in_batch divides a summed loss: it cannot go with reduction='none'"),
    ({"reduction": "avg"}, r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"),
    ({"reduction": "avg", "num_items_in_batch": 11}, r"reduction must be one of .* got 'avg'"),
    ({"token_weight": torch.ones(3, 7)}, r"token_weight must have shape \[3, 8\]"),
    ({"token_weight": torch.ones(3, 8, requires_grad=True)}, "token_weight requires grad"),
])
def test_bad_reductions_and_token_weights_are_refused_naming_them(arguments, message):
    """reduction="none" gives per-token losses, which num_items_in_batch (a divisor of a sum) cannot go with; a
    reduction not of the op's, also beside num_items_in_batch (where the op was asked for a sum and took it silently);
    a token_weight not of the targets' shape, or one that requires grad."""
    from fastalign.causal_lm_loss import hidden_and_targets
    model = tiny_llama(VOCAB)
    inputs = batch()
    labels = inputs.pop("labels")
    loss_fn = CausalLMLoss(model, backend="torch")
    hidden, target = hidden_and_targets(model, labels, None, inputs)
    with pytest.raises(ValueError, match=message):
        loss_fn.of_hidden_states(hidden, target, **arguments)
    if "token_weight" not in arguments:
        with pytest.raises(ValueError, match=message):
            loss_fn(**inputs, labels=labels, **arguments)


@pytest.mark.parametrize("method", ["forward", "of_hidden_states"])
def test_a_call_checks_its_reduction_once(method, monkeypatch):
    """forward checked the reduction before the decoder ran, then of_hidden_states checked it again: once a call."""
    from fastalign import causal_lm_loss
    model = tiny_llama(VOCAB)
    inputs = batch(seed=3)
    labels = inputs.pop("labels")
    loss_fn = CausalLMLoss(model, backend="torch")
    checked, check = [], causal_lm_loss.check_loss_reduction
    monkeypatch.setattr(causal_lm_loss, "check_loss_reduction", lambda *args: checked.append(1) or check(*args))
    if method == "forward":
        loss_fn(labels, **inputs)
    else:
        loss_fn.of_hidden_states(model.model(**inputs).last_hidden_state[:, :-1], labels[:, 1:])
    assert len(checked) == 1


def test_a_token_weight_given_to_forward_is_refused_before_the_decoder_runs():
    """forward's **inputs took a token_weight on to the decoder, whose **kwargs dropped it: the loss was silently the
    unweighted one (zero weights gave the full loss). It is refused naming where it goes, before the decoder runs."""
    model = tiny_llama(VOCAB)
    inputs = batch(seed=1)
    loss_fn = CausalLMLoss(model, backend="torch")
    calls = []
    model.model.register_forward_hook(lambda *args: calls.append(1))
    rows, width = inputs["labels"].shape
    with pytest.raises(ValueError, match="CausalLMLoss.forward takes no token_weight: pass it to of_hidden_states"):
        loss_fn(**inputs, reduction="sum", token_weight=torch.zeros(rows, width - 1))
    assert not calls


@pytest.mark.parametrize("keyword, value, message", [
    ("temperature", 2.0, "temperature: the loss is the model's own, at temperature 1"),
    ("backend", "torch", r"backend: it is set when the loss is made, CausalLMLoss\(model, \.\.\.\)'s backend="),
    ("label_smoothing", 0.1, r"label_smoothing: it is set when the loss is made, CausalLMLoss\(model, \.\.\.\)'s "
                             "label_smoothing="),
    ("softcap", 30.0, "softcap: the model's own logit soft cap"),
    ("mask", torch.ones(3, 8, dtype=torch.bool), "mask: a position counts where its label is not ignore_index"),
])
def test_a_losss_keyword_given_to_forward_is_refused_by_name_before_the_decoder_runs(keyword, value, message):
    """Like token_weight, a temperature, softcap, mask or a constructor's setting went on to the decoder, whose
    **kwargs dropped it: the loss was silently the plain one. Each is refused naming it and what to do instead."""
    model = tiny_llama(VOCAB)
    inputs = batch(seed=2)
    loss_fn = CausalLMLoss(model, backend="torch")
    calls = []
    model.model.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=rf"^CausalLMLoss\.forward takes no {message}"):
        loss_fn(**inputs, **{keyword: value})
    assert not calls


def test_per_token_losses_with_grads_in_forward_are_refused_before_the_decoder_only_where_a_gradient_is_taken():
    """grads_in_forward=True with reduction="none" was refused by the op, naming linear_cross_entropy, after the
    decoder ran, and under torch.no_grad() too, where no gradient is taken. It is refused before the decoder naming
    CausalLMLoss in grad mode; under no_grad it gives the per-token losses."""
    model = tiny_llama(VOCAB)
    inputs = batch(seed=1)
    loss_fn = CausalLMLoss(model, backend="torch", grads_in_forward=True)
    calls = []
    model.model.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=r"^CausalLMLoss\(grads_in_forward=True\) takes the gradient of a scalar loss"):
        loss_fn(**inputs, reduction="none")
    assert not calls
    with torch.no_grad():
        torch.testing.assert_close(loss_fn(**inputs, reduction="none"),
                                   CausalLMLoss(model, backend="torch")(**inputs, reduction="none"))


def test_an_ignore_index_is_the_models_own():
    """Labels that use another ignore_index (5, where the batch had -100): the model's loss with that index."""
    model = tiny_llama(VOCAB)
    inputs = batch(seed=1)
    inputs["labels"] = inputs["labels"].masked_fill(inputs["labels"] == -100, 5)
    fused = CausalLMLoss(model, backend="torch")(**inputs, ignore_index=5)
    assert_same_loss_and_gradients(model, fused, model(**inputs, ignore_index=5).loss)


def test_shift_labels_are_targets_of_every_position():
    """shift_labels (already shifted): position t predicts shift_labels[:, t], the last position included."""
    model = tiny_llama(VOCAB)
    inputs = batch(seed=2)
    shift_labels = torch.nn.functional.pad(inputs.pop("labels")[:, 1:], (0, 1), value=-100)
    shift_labels[0, -1] = 7   # a target for the last position, which labels cannot give
    logits = model(**inputs).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), shift_labels.flatten(), ignore_index=-100)
    fused = CausalLMLoss(model, backend="torch")(**inputs, shift_labels=shift_labels)
    assert_same_loss_and_gradients(model, fused, expected)


def test_shift_labels_given_with_labels_are_the_targets_as_in_the_models_forward():
    """labels and shift_labels both, as a Trainer under context parallelism passes them (it adds shift_labels and
    keeps labels): the model's own loss, which takes shift_labels as its targets; the batch was refused ("got
    both")."""
    model = tiny_llama(VOCAB)
    inputs = batch(seed=2)
    shift_labels = torch.nn.functional.pad(inputs["labels"][:, 2:], (0, 2), value=7)   # other targets than labels'
    fused = CausalLMLoss(model, backend="torch")(**inputs, shift_labels=shift_labels)
    assert_same_loss_and_gradients(model, fused, model(**inputs, shift_labels=shift_labels).loss)


def test_packed_sequences_given_by_position_ids_are_split_as_without_a_cache():
    """A row of sequences packed by position_ids that restart, with no attention_mask (DataCollatorWithFlattening):
    the decoder runs without a KV cache, where transformers' masks split the row at the restarts, so the loss is
    the model's with use_cache=False (its forward with its default cache attends across them on eager and sdpa),
    fused or not (README: the loss of any causal LM)."""
    model = tiny_llama(VOCAB)
    ids = torch.randint(1, VOCAB, (2, 14), generator=torch.Generator().manual_seed(1))
    inputs = dict(input_ids=ids, position_ids=torch.cat([torch.arange(6), torch.arange(8)]).expand(2, -1),
                  labels=ids.masked_fill(torch.arange(14) == 6, -100))   # (no target across the restart)
    expected = model(**inputs, use_cache=False).loss
    assert_same_loss_and_gradients(model, CausalLMLoss(model, backend="torch")(**inputs), expected)
    fused = fuse_causal_lm_loss(copy.deepcopy(model), backend="torch")
    torch.testing.assert_close(fused(**inputs).loss, expected)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_label_smoothing_is_torchs_cross_entropy_of_the_models_logits(backend):
    """CausalLMLoss(label_smoothing=0.1): torch's cross_entropy(label_smoothing=0.1) of the model's shifted logits
    (a tiny random Llama), the loss and every gradient; a loss that smoothing changes."""
    device = device_for(backend)
    model = tiny_llama(VOCAB).to(device)
    inputs = {name: t.to(device) for name, t in batch(seed=5).items()}
    logits = model(**{name: t for name, t in inputs.items() if name != "labels"}).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), inputs["labels"][:, 1:].flatten(),
                                                 label_smoothing=0.1)
    fused = CausalLMLoss(model, backend=backend, label_smoothing=0.1)(**inputs)
    assert_same_loss_and_gradients(model, fused, expected)
    assert abs(float(fused - model(**inputs).loss)) > 1e-3


def test_the_triton_kernels_give_the_models_loss():
    """The Triton backend (on a GPU, else in the interpreter) on the same batch, with an lm_head bias."""
    model = tiny_phi(VOCAB).to(TRITON_DEVICE)
    inputs = {name: t.to(TRITON_DEVICE) for name, t in batch(seed=3).items()}
    assert_same_loss_and_gradients(model, CausalLMLoss(model, backend="triton")(**inputs), model(**inputs).loss)


def test_a_lora_model_trains_its_adapters_on_its_own_loss():
    """A PEFT model: its LoRA layers act in the decoder's forward, and its adapters get the model's gradients."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(VOCAB), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                   init_lora_weights=False))
    inputs = batch(seed=4)
    fused = CausalLMLoss(model, backend="torch")(**inputs)
    assert all("lora" in name for name, p in model.named_parameters() if p.requires_grad)
    assert_same_loss_and_gradients(model, fused, model(**inputs).loss)


def test_lora_on_input_embeddings_tied_to_the_lm_head_gets_the_models_own_loss():
    """PEFT's forward runs the tied lm_head on the base weight (the adapter acts on the embeddings alone), which is what
    the fused losses read: they refused such a model anyway, with the unlearning trainer's reason (merging the adapter
    would change the lm_head), though they merge nothing. The loss and gradients are PEFT's."""
    peft = pytest.importorskip("peft")
    from tests.unlearn.test_objective import tiny_model
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False)
    model = peft.get_peft_model(tiny_model("Llama", VOCAB, tie_word_embeddings=True), config)
    inputs = batch(seed=4)
    expected = model(**inputs).loss
    with model.disable_adapter():
        assert (model(**inputs).loss - expected).abs() > 1e-3   # the adapter acts
    assert_same_loss_and_gradients(model, CausalLMLoss(model, backend="torch")(**inputs), expected)


@pytest.mark.parametrize("adapter", ["PromptTuningConfig", "PrefixTuningConfig"])
def test_a_prompt_learning_adapter_is_refused_by_name_and_the_fused_forward_serves_it(adapter):
    """A PEFT prompt-learning adapter puts its virtual tokens (or their K/V) before the inputs in PEFT's forward alone:
    CausalLMLoss ran the decoder on the inputs, the loss of the model without its prompt, which got no gradient.
    Refused by name; fuse_causal_lm_loss fuses the base model's forward, which PEFT calls with the prompt."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(VOCAB), getattr(peft, adapter)(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(NotImplementedError, match=rf"its PEFT adapter \({adapter}\) is a prompt-learning adapter"):
        CausalLMLoss(model)
    inputs = batch(seed=4)
    expected = model(**inputs).loss
    fuse_causal_lm_loss(model, backend="torch")
    assert_same_loss_and_gradients(model, model(**inputs).loss, expected)


def test_a_compiled_model_gets_its_own_loss():
    """torch.compile(model): CausalLMLoss refused it as a model that "computes its loss itself" (it read the source of
    the compiled wrapper's forward), while CausalLMKLDiv took it. The model under the wrapper is the one read."""
    model = tiny_llama(VOCAB)
    inputs = batch(seed=5)
    fused = CausalLMLoss(torch.compile(model, backend="eager"), backend="torch")(**inputs)
    assert_same_loss_and_gradients(model, fused, model(**inputs).loss)


@pytest.mark.parametrize("make_loss", [CausalLMLoss, fuse_causal_lm_loss], ids=["CausalLMLoss", "fused-model"])
def test_fullgraph_compile_is_refused_with_the_reason_of_the_op(make_loss):
    """Every call read the model's forward's source (where it reads its logit multiplier and soft cap) by inspect,
    which dynamo cannot trace: one more graph break a call, and under fullgraph=True an error about inspect instead
    of the fused op's documented reason. The source is read once, when the loss is made."""
    loss = make_loss(tiny_llama(VOCAB), backend="torch")
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="linear_cross_entropy runs outside the compiled graph"):
        torch.compile(loss, backend="eager", fullgraph=True)(**batch(seed=6))


def test_trainable_tokens_on_a_tied_lm_head_are_refused():
    """PEFT's trainable tokens on tied embeddings wrap the lm_head too, adding the trained rows in its forward, which
    the fused loss does not run: refused by name (it failed on the wrapper's missing bias)."""
    peft = pytest.importorskip("peft")
    from tests.unlearn.test_objective import tiny_model
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], trainable_token_indices=[1, 2])
    model = peft.get_peft_model(tiny_model("Llama", VOCAB, tie_word_embeddings=True), config)
    with pytest.raises(ValueError, match="the lm_head carries PEFT's trainable tokens"):
        CausalLMLoss(model)


def test_under_autocast_the_loss_takes_the_autocast_dtype_as_the_models_head_does():
    """Mixed precision (fp32 weights, bf16 compute): the fused op runs on bf16 hidden states and head, as the model's
    lm_head matmul does, both accumulating in fp32: the same loss and gradients to bf16's rounding."""
    model = tiny_llama(VOCAB)
    inputs = batch(seed=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, expected = CausalLMLoss(model, backend="torch")(**inputs), model(**inputs).loss
    torch.testing.assert_close(fused, expected, rtol=2e-2, atol=0)
    for mine, theirs in zip(grads_of(model, fused), grads_of(model, expected)):
        assert mine.dtype == torch.float32
        assert (mine - theirs).norm() <= 3e-2 * theirs.norm()


def test_under_autocast_a_float64_model_keeps_float64_as_its_head_does():
    """Autocast casts no float64 operand, so a float64 model's lm_head runs in float64 under it: the fused loss rounded
    its hidden states and head to bf16, another loss than the model's (whose loss takes the logits in float32)."""
    model = tiny_llama(VOCAB).double()
    inputs = batch(seed=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, expected = CausalLMLoss(model, backend="torch")(**inputs), model(**inputs).loss
    assert fused.dtype == torch.float64
    assert_same_loss_and_gradients(model, fused.float(), expected)


def test_with_gradient_checkpointing_the_gradients_are_the_same():
    """A decoder that recomputes its layers in the backward (gradient checkpointing, as memory-bound fine-tuning sets
    it): the same gradients as the model's own loss without it."""
    model = tiny_llama(VOCAB).train()
    inputs = batch(seed=9)
    expected = model(**inputs).loss
    reference = grads_of(model, expected)
    enable_activation_checkpointing(model)
    fused = CausalLMLoss(model, backend="torch")(**inputs)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(grads_of(model, fused), reference):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


def test_a_batch_without_a_counted_token_has_loss_zero_and_zero_gradients():
    """Every label ignored: 0 and zero gradients, where the model's own mean is NaN."""
    model = tiny_llama(VOCAB)
    inputs = batch(seed=5)
    inputs["labels"] = torch.full_like(inputs["labels"], -100)
    assert model(**inputs).loss.isnan()
    fused = CausalLMLoss(model, backend="torch")(**inputs)
    assert fused.item() == 0.0
    assert all(g is None or not g.any() for g in grads_of(model, fused))


def test_a_use_cache_input_does_not_clash_with_the_training_forward():
    """The decoder runs without a KV cache (a training forward), also when the inputs (a generation config's) ask for
    one."""
    model = tiny_llama(VOCAB)
    inputs = batch(seed=6)
    fused = CausalLMLoss(model, backend="torch")(**inputs, use_cache=True)
    torch.testing.assert_close(fused, model(**inputs).loss)


def test_a_return_dict_input_gives_the_same_loss():
    """A batch built for code that calls model(**batch, return_dict=False) (the loss first in a tuple): the decoder
    returned a tuple too, and the loss and the KL crashed on its missing last_hidden_state. return_dict says how the
    model's outputs are packed, not what the loss is."""
    model = tiny_llama(VOCAB)
    inputs = batch(seed=6)
    torch.testing.assert_close(CausalLMLoss(model, backend="torch")(**inputs, return_dict=False),
                               model(**inputs, return_dict=False)[0])
    kl = CausalLMKLDiv(model, tiny_llama(VOCAB), backend="torch")(**inputs, return_dict=False)
    torch.testing.assert_close(kl, torch.zeros(()), atol=1e-6, rtol=0)


@pytest.mark.parametrize("labels, shift_labels, message", [
    (None, None, r"labels \(aligned with the inputs\) or shift_labels \(already shifted\) is needed, got neither"),
    ("ids", "short", r"shift_labels must be an integer tensor of the inputs' shape \(3, 9\), got \(3, 8\)"),
    ("short", None, r"labels must be an integer tensor of the inputs' shape \(3, 9\), got \(3, 8\)"),
    (None, "float", r"shift_labels must be an integer tensor .* torch.float32"),
    ("mask", None, r"labels must be an integer tensor .* torch.bool"),   # a mask where the ids belong: not 0 and 1
    (None, "mask", r"shift_labels must be an integer tensor .* torch.bool"),
])
@pytest.mark.parametrize("make_loss", [CausalLMLoss, lambda model, **settings: CausalLMKLDiv(
    model, tiny_llama(VOCAB, seed=1), **settings)], ids=["loss", "kl"])
def test_bad_labels_are_refused_naming_the_argument_before_the_decoder_runs(labels, shift_labels, message, make_loss):
    """(They were refused after a whole forward of the decoder.)"""
    model = tiny_llama(VOCAB)
    loss = make_loss(model, backend="torch")
    inputs = batch()
    ids = inputs.pop("labels")
    given = {"ids": ids, "short": ids[:, 1:], "float": ids.float(), "mask": ids > 20, None: None}
    model.model.register_forward_pre_hook(refuse_to_run)
    with pytest.raises(ValueError, match=message):
        loss(**inputs, labels=given[labels], shift_labels=given[shift_labels])


def refuse_to_run(module, _):
    raise AssertionError(f"{type(module).__name__} ran")


@pytest.mark.parametrize("make_loss, advice", [
    (CausalLMLoss, r"fuse_causal_lm_loss\(model\) makes the model's forward take this loss under a plain Trainer"),
    (lambda model, **settings: CausalLMKLDiv(model, tiny_llama(VOCAB, seed=1), **settings),
     r"return kl\(\*\*inputs\) from a Trainer subclass's compute_loss")], ids=["loss", "kl"])
def test_a_batch_given_positionally_or_a_compute_loss_func_call_is_refused_saying_what_serves(make_loss, advice):
    """loss_fn(batch) (the batch landed in labels) failed in the decoder ("You must specify exactly one of input_ids
    or inputs_embeds"), and a Trainer's compute_loss_func call (outputs, labels, num_items_in_batch=...) with a
    TypeError on forward's positional arguments: both say what to do, before the decoder runs."""
    model = tiny_llama(VOCAB)
    loss = make_loss(model, backend="torch")
    inputs = batch(seed=17)
    outputs = model(**inputs)
    model.model.register_forward_pre_hook(refuse_to_run)
    with pytest.raises(TypeError, match=r"got a batch \(a dict\) as its labels: pass the batch as keywords: "
                                        r"loss_fn\(\*\*batch\)"):
        loss(inputs)
    for call in ((outputs, inputs["labels"]), (outputs,)):
        with pytest.raises(TypeError, match=r"is no compute_loss_func: it runs the model.* itself on the batch, .*: "
                                            + advice):
            loss(*call, num_items_in_batch=11)


def test_a_trainer_given_the_loss_as_compute_loss_func_is_told_what_serves(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    rows = batch(seed=18, rows=2)
    model = tiny_llama(VOCAB)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1,
                                          use_cpu=True, report_to=[], save_strategy="no")
    trainer = transformers.Trainer(model=model, args=args, compute_loss_func=CausalLMLoss(model),
                                   train_dataset=[{name: t[i] for name, t in rows.items()} for i in range(2)])
    with pytest.raises(TypeError, match=r"CausalLMLoss is no compute_loss_func: .* fuse_causal_lm_loss\(model\)"):
        trainer.train()


@pytest.mark.parametrize("fuse", [CausalLMLoss, fuse_causal_lm_loss])
def test_a_model_whose_logits_the_op_cannot_reproduce_is_refused_when_wrapped_or_fused(fuse):
    """A head that is more than its weight (here, logits halved by a forward of its own) would train another loss."""
    model = tiny_llama(VOCAB)
    head = model.lm_head
    model.lm_head.forward = lambda hidden: torch.nn.functional.linear(hidden, head.weight) / 2
    with pytest.raises(NotImplementedError, match="its logits are not its lm_head's weight"):
        fuse(model)


def test_a_model_prepared_for_bf16_mixed_precision_is_served_and_other_logits_still_refused():
    """accelerate's prepare for bf16 mixed precision (a Trainer's with bf16=True) wraps the model's forward in autocast:
    the probe compared its bf16 logits with fp32 ones and refused a plain Llama, for the loss and the KL alike. The
    forward is probed unwrapped; a head that halves its logits is still refused."""
    accelerate = pytest.importorskip("accelerate")

    def prepared(model):
        return accelerate.Accelerator(mixed_precision="bf16", cpu=True).prepare_model(model)

    halving = tiny_llama(VOCAB)
    head = halving.lm_head
    halving.lm_head.forward = lambda hidden: torch.nn.functional.linear(hidden, head.weight) / 2
    model = prepared(tiny_llama(VOCAB))
    inputs = batch(seed=7)
    expected = model(**inputs).loss   # (the model's loss in bf16 mixed precision, as the loss computes it)
    torch.testing.assert_close(CausalLMLoss(model, backend="torch")(**inputs), expected, rtol=1e-2, atol=1e-2)
    CausalLMKLDiv(model, tiny_llama(VOCAB, seed=1))
    with pytest.raises(NotImplementedError, match="its logits are not its lm_head's weight"):
        CausalLMLoss(prepared(halving))


def test_an_lm_head_that_is_no_linear_is_refused_as_documented():
    """An lm_head replaced by an nn.Sequential (a projection, then the vocabulary head) raised TypeError "has no
    lm_head ...; unlearning needs a causal LM": it has one, and this is no unlearning. The README says such a model
    raises NotImplementedError, naming the head's type."""
    model = tiny_llama(VOCAB)
    model.lm_head = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, VOCAB))
    with pytest.raises(NotImplementedError, match="LlamaForCausalLM: its lm_head .* is a Sequential without a weight"):
        CausalLMLoss(model)


def meta_llama(seed=0):
    """tiny_llama moved to the meta device, with eager attention (sdpa's padding mask reads a value: not on meta)."""
    model = tiny_llama(VOCAB, seed=seed)
    model.set_attn_implementation("eager")
    return model.to("meta")


def test_a_model_on_the_meta_device_is_refused_naming_it():
    """A model on the meta device (moved there, or built there to trace shapes), whose own forward runs there: the
    loss failed with torch's "unknown device type for autocast" (compute_dtype asked autocast about the meta device)
    before fastalign's own checks."""
    model = meta_llama()
    assert model(**batch()).loss.is_meta
    with pytest.raises(ValueError, match="meta device"):
        CausalLMLoss(model)(**batch())


def offloaded_layer_llama():
    """tiny_llama with its second decoder layer offloaded by accelerate: its weights on the meta device, loaded by its
    hooks at each forward, as a device_map with "cpu" or "disk" leaves a model too large for its devices."""
    accelerate = pytest.importorskip("accelerate")
    model = tiny_llama(VOCAB)
    accelerate.cpu_offload(model.model.layers[1], execution_device=torch.device("cpu"))
    assert model.model.layers[1].mlp.down_proj.weight.is_meta
    return model


def test_a_model_with_an_offloaded_layer_gets_its_own_loss():
    """The probe of the logits runs such a model through its hooks, as its forward runs it."""
    model = offloaded_layer_llama()
    torch.testing.assert_close(CausalLMLoss(model, backend="torch")(**batch()), model(**batch()).loss)


@pytest.mark.parametrize("fuse", [CausalLMLoss, fuse_causal_lm_loss])
def test_a_model_with_an_offloaded_layer_whose_logits_the_op_cannot_reproduce_is_refused(fuse):
    """The probe of the logits was skipped for any weight on the meta device, which every model that accelerate
    offloads a part of has: a head whose logits are of twice its inputs (a user's pre-hook) got another loss than the
    model's own, silently (5.38 against its 7.03)."""
    model = offloaded_layer_llama()
    model.lm_head.register_forward_pre_hook(lambda module, args: (2 * args[0],))
    with pytest.raises(NotImplementedError, match="its logits are not its lm_head's weight"):
        fuse(model)


def test_a_model_with_a_part_not_loaded_is_refused_naming_it():
    """A part on the meta device that no accelerate hook loads (moved there by hand, a state dict loaded with
    assign=True and strict=False into a model built there): the probe was skipped and the loss computed on
    uninitialised memory (F.linear of a CPU input and a meta weight), silently."""
    model = tiny_llama(VOCAB)
    model.model.layers[1].mlp.to("meta")
    with pytest.raises(ValueError, match=r"^model: its weights are not loaded \(model.layers.1.mlp.gate_proj has no "):
        CausalLMLoss(model)


@pytest.mark.parametrize("fuse", [CausalLMLoss, fuse_causal_lm_loss])
def test_an_offloaded_lm_head_is_refused_naming_it(fuse):
    """accelerate offloads the lm_head of a model too large for its devices (device_map="auto" offloads the last
    modules first; cpu_offload): its weight waits on the meta device for the hook that loads it when the lm_head runs,
    which the fused loss never runs. The loss failed with "weight must be on cpu like the hidden states, got ...
    device meta", naming an argument the caller never passed, not the offloading."""
    accelerate = pytest.importorskip("accelerate")
    model = tiny_llama(VOCAB)
    accelerate.cpu_offload(model.lm_head, execution_device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"the model's lm_head weight is on the meta device \(offloaded by accelerate"):
        fuse(model)(**batch())


def test_a_model_accelerate_offloads_whole_is_checked_not_passed_over():
    """A model that accelerate offloads whole (cpu_offload: every weight on the meta device, every hook loads its
    own) has weights to run, unlike FSDP's low-memory loading, whose checks are skipped: its offloaded lm_head, which
    the fused losses read without running it, is refused when the loss is made, not at the first call."""
    accelerate = pytest.importorskip("accelerate")
    model = tiny_llama(VOCAB)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    assert all(p.is_meta for p in model.parameters())
    with pytest.raises(ValueError, match=r"the model's lm_head weight is on the meta device \(offloaded by accelerate"):
        CausalLMLoss(model, backend="torch")


WRAPPERS = ["ddp", "fsdp2", "fsdp2_head_unit", "ddp_kl", "fsdp2_kl", "ddp_fused_forward", "fsdp2_fused_forward"]


@pytest.fixture(scope="module")
def distributed_grads(tmp_path_factory):
    """wrapper -> the gradients of two gloo processes (causal_lm_loss_worker.py), each on half the batch."""
    out = tmp_path_factory.mktemp("distributed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               "--module", "tests.causal_lm_loss_worker", str(out), *WRAPPERS]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {wrapper: torch.load(out / f"{wrapper}.pt") for wrapper in WRAPPERS}


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_ddp_and_fsdp2_wrap_the_loss_module_as_they_wrap_a_model(distributed_grads, wrapper):
    """Two processes, each on half the batch with num_items_in_batch the whole batch's count: the gradients they
    average are half the one-process gradients of the whole batch's token mean (a Trainer scales by the number of
    processes), for every parameter, the lm_head's also when FSDP2 gave it a unit of its own; and so for the KL to a
    teacher, which the wrapped module holds frozen, and for the model itself wrapped, its forward fused
    (fuse_causal_lm_loss)."""
    from tests.causal_lm_loss_worker import teacher
    model = tiny_llama(VOCAB)
    loss = (CausalLMKLDiv(model, teacher(), backend="torch") if wrapper.endswith("_kl")
            else CausalLMLoss(model, backend="torch"))
    loss(**batch(rows=4)).backward()
    grads = distributed_grads[wrapper]
    assert sorted(grads) == sorted(name for name, _ in model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(2 * grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_trainer_whose_compute_loss_calls_the_loss_module_takes_the_models_own_steps(tmp_path):
    """A Trainer subclass whose compute_loss calls CausalLMLoss in training, under gradient accumulation
    (micro-batches of unequal token counts): two optimizer steps end at the weights the Trainer reaches with the
    model's own loss, and it evaluates. (SGD: Adam's first steps move each weight by about lr * sign(gradient), which
    would turn the last-bit differences of near-zero gradients into differences of lr.)"""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    rows = batch(seed=7, rows=8)
    data = [{name: t[i] for name, t in rows.items()} for i in range(8)]
    data[2]["labels"] = data[2]["labels"].masked_fill(torch.arange(9) < 6, -100)   # fewer tokens in one micro-batch
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                                          gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2, optim="sgd",
                                          use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no", seed=0)

    class FusedLossTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs:   # evaluation, which reads the logits: the model's own forward
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return loss_fn(**inputs, num_items_in_batch=num_items_in_batch)

    start = tiny_llama(VOCAB).state_dict()
    ends, evaluated = {}, {}
    for trainer_class in (FusedLossTrainer, transformers.Trainer):
        model = tiny_llama(VOCAB).train()
        loss_fn = CausalLMLoss(model, backend="torch")
        trainer = trainer_class(model=model, args=args, train_dataset=data)
        trainer.train()
        ends[trainer_class] = model.state_dict()
        evaluated[trainer_class] = trainer.evaluate(eval_dataset=data[:4])["eval_loss"]
    fused, own = ends[FusedLossTrainer], ends[transformers.Trainer]
    assert all(not torch.equal(own[name], start[name]) for name in own if "layers" in name)   # every layer trained
    for name in own:
        torch.testing.assert_close(fused[name], own[name], rtol=1e-4, atol=1e-6, msg=name)
    # and evaluation, which asks for the outputs too, runs the model's own forward
    assert evaluated[FusedLossTrainer] == pytest.approx(evaluated[transformers.Trainer], rel=1e-4)


def trained_in_bf16(tmp_path, fuse):
    """The weights a Trainer(bf16=True) reaches in two steps on a fresh tiny Llama, fused (fuse=True), or through a
    compute_loss that returns CausalLMLoss (fuse=False), or its own loss in fp32 (fuse=None: bf16 off)."""
    transformers = pytest.importorskip("transformers")
    rows = batch(seed=11, rows=4)
    data = [{name: t[i] for name, t in rows.items()} for i in range(4)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2,
                                          learning_rate=1e-1, optim="sgd", use_cpu=True, bf16=fuse is not None,
                                          report_to=[], save_strategy="no", logging_strategy="no", seed=0)

    class LossModuleTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return loss_fn(**inputs, num_items_in_batch=num_items_in_batch)

    model = tiny_llama(VOCAB).train()
    loss_fn = CausalLMLoss(model, backend="torch")
    if fuse:
        fuse_causal_lm_loss(model, backend="torch")
    (LossModuleTrainer if fuse is False else transformers.Trainer)(model=model, args=args, train_dataset=data).train()
    return model.state_dict()


def test_a_trainers_compute_loss_in_bf16_mixed_precision_computes_as_the_fused_model_does(tmp_path):
    """Trainer(bf16=True) wraps the model's forward in autocast, which a compute_loss returning CausalLMLoss (running
    the decoder itself) never entered: its steps were fp32's. It now runs under that autocast: the fused model's bf16
    steps, not the fp32 ones."""
    pytest.importorskip("accelerate")
    through_loss, fused, fp32 = (trained_in_bf16(tmp_path, fuse) for fuse in (False, True, None))
    assert max(float((through_loss[name] - fp32[name]).abs().max()) for name in fp32) > 1e-6
    for name in fused:
        torch.testing.assert_close(through_loss[name], fused[name], rtol=0, atol=1e-6, msg=name)


def test_a_loss_on_a_model_accelerate_prepared_in_bf16_computes_in_bf16_unless_under_an_autocast_of_its_own():
    """An accelerate loop: CausalLMLoss and CausalLMKLDiv of a model prepared for bf16 give what they give under the
    model's autocast (the prepared model's bf16 loss), where fp32's differs; an autocast already on (fp16's) is left as
    it is; a prepared forward whose autocast cannot be found warns once, naming the fix."""
    accelerate = pytest.importorskip("accelerate")
    model = tiny_llama(VOCAB)
    reference = tiny_llama(VOCAB, seed=1)
    inputs = batch(seed=12)
    loss, kl = CausalLMLoss(model, backend="torch"), CausalLMKLDiv(model, reference, backend="torch")
    fp32 = loss(**inputs), kl(**inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = loss(**inputs), kl(**inputs)
    with torch.autocast("cpu", dtype=torch.float16):
        fp16 = loss(**inputs)
    prepared = accelerate.Accelerator(mixed_precision="bf16", cpu=True).prepare_model(model)
    torch.testing.assert_close(prepared(**inputs).loss, bf16[0], rtol=1e-2, atol=1e-2)   # (logits against fused)
    for fresh, fp32_value, bf16_value in zip((loss(**inputs), kl(**inputs)), fp32, bf16):
        assert fresh.item() == bf16_value.item() != fp32_value.item()
    with torch.autocast("cpu", dtype=torch.float16):
        assert loss(**inputs).item() == fp16.item() != bf16[0].item()
    model.forward = lambda **kwargs: prepared._original_forward(**kwargs)   # (a wrapper of no autocast)
    with pytest.warns(UserWarning, match=r"call the loss under accelerator.autocast\(\), or prepare the loss"):
        assert loss(**inputs).item() == fp32[0].item()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss(**inputs)   # (once)


@requires_cuda
def test_bf16_on_the_gpu_gives_the_models_loss_to_bf16_rounding():
    """The Triton kernels on a bf16 model (a larger vocabulary: several vocabulary tiles and splits): the loss and
    every gradient within bf16's rounding of the model's own."""
    model = tiny_llama(4099, hidden_size=64).to("cuda", torch.bfloat16)
    inputs = {name: t.to("cuda") for name, t in batch(seed=16, rows=4, width=33).items()}
    fused, expected = CausalLMLoss(model, backend="triton")(**inputs), model(**inputs).loss
    torch.testing.assert_close(fused, expected.float(), rtol=2e-2, atol=0)
    for mine, theirs in zip(grads_of(model, fused), grads_of(model, expected)):
        assert (mine.float() - theirs.float()).norm() <= 3e-2 * theirs.float().norm()


class FP8Linear(torch.nn.Linear):
    """A Linear whose weight is stored in float8_e4m3fn divided by a scale and rescaled in its forward (as Hugging
    Face's FP8 integrations store weights)."""

    def __init__(self, linear, scale=1.5):
        super().__init__(linear.in_features, linear.out_features, bias=False)
        self.weight = torch.nn.Parameter((linear.weight.detach() / scale).to(torch.float8_e4m3fn),
                                         requires_grad=False)
        self.register_buffer("weight_scale_inv", torch.tensor(scale))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.to(x.dtype) * self.weight_scale_inv.to(x.dtype))


def test_an_lm_head_stored_in_float8_is_refused_naming_its_dtype():
    """The fused losses read lm_head.weight as the weight the lm_head computes with; a float8 one without its scale
    passed the probe (its bound was 4 eps of float8, half the largest logit): the loss under bf16 autocast was 5.190
    for the model's 5.642, and without autocast a TypeError blamed `hidden`."""
    model = tiny_llama(VOCAB)
    model.lm_head = FP8Linear(model.lm_head)
    with pytest.raises(NotImplementedError, match=r"LlamaForCausalLM: the model's lm_head weight \(53, 32\) "
                                                  r"torch.float8_e4m3fn is of no dtype the fused losses compute with"):
        CausalLMLoss(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_logits_rescaled_by_two_percent_are_refused_in_bf16_too(dtype):
    """The probe's bound, 4 eps of the dtype (3% of the largest logit in bf16), let a bf16 model whose lm_head's
    output is rescaled by 1.02 (a hook here; a head's own forward alike) train on its logits without the rescaling."""
    from tests.runtime.tiny_models import tiny_model
    model = tiny_model("llama-gqa-untied", dtype=dtype)
    CausalLMLoss(model)
    model.lm_head.register_forward_hook(lambda module, inputs, logits: logits * 1.02)
    with pytest.raises(NotImplementedError, match="its logits are not its lm_head's weight applied to the final"):
        CausalLMLoss(model)


class LoRAHead(torch.nn.Linear):
    """A hand-written LoRA lm_head: weight x + B A x, B zero at first as LoRA draws it."""

    def __init__(self, linear, rank=4):
        super().__init__(linear.in_features, linear.out_features, bias=False)
        self.weight = linear.weight
        self.lora_A = torch.nn.Parameter(torch.randn(rank, linear.in_features) * 0.1)
        self.lora_B = torch.nn.Parameter(torch.zeros(linear.out_features, rank))

    def forward(self, x):
        return super().forward(x) + x @ self.lora_A.T @ self.lora_B.T


def test_an_lm_head_with_parameters_of_its_own_is_refused_naming_its_class():
    """A hand-written LoRA lm_head agreed with the probe while its B was zero, and the fused loss then read its weight
    alone: once B trained, the loss was 5.646 for the model's 6.184, and the adapter got no gradient."""
    model = tiny_llama(VOCAB)
    model.lm_head = LoRAHead(model.lm_head)
    with pytest.raises(NotImplementedError, match=r"the model's lm_head is a LoRAHead, which holds parameters or "
                                                  r"buffers besides weight and bias \(lora_A, lora_B\)"):
        CausalLMLoss(model)


@pytest.mark.parametrize("wrap", ["modules_to_save", "weight_norm"])
def test_an_lm_head_whose_weight_comes_from_other_tensors_is_served(wrap):
    """PEFT's modules_to_save copy of the lm_head (its weight the active copy's) and a weight_norm parametrization
    (its weight computed from two sources at each access) hold parameters named otherwise than weight: both are
    served with the model's loss and gradients, not refused as a head with parameters of its own."""
    model = tiny_llama(VOCAB)
    if wrap == "modules_to_save":
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    else:
        torch.nn.utils.parametrizations.weight_norm(model.lm_head)
    inputs = batch(seed=4)
    assert_same_loss_and_gradients(model, CausalLMLoss(model, backend="torch")(**inputs), model(**inputs).loss)


class FloatAccumulatingHead(torch.nn.Linear):
    """An lm_head whose forward is its own but reads nothing more than its weight (Ergo's: float32 logits)."""

    def forward(self, x):
        return torch.nn.functional.linear(x.float(), self.weight.float())


def test_an_lm_head_with_a_forward_of_its_own_and_nothing_more_is_left_to_the_probe():
    """A forward of its own that reads the weight alone is the probe's to judge: one computing x W^T (in float32, as
    Ergo's lm_head does) gets the model's own loss; one rescaling it is refused by the probe."""
    model = tiny_llama(VOCAB)
    head = FloatAccumulatingHead(model.lm_head.in_features, model.lm_head.out_features, bias=False)
    head.weight = model.lm_head.weight
    model.lm_head = head
    inputs = batch(seed=3)
    assert_same_loss_and_gradients(model, CausalLMLoss(model, backend="torch")(**inputs), model(**inputs).loss)
    head.forward = lambda x: 1.5 * torch.nn.functional.linear(x, head.weight)
    with pytest.raises(NotImplementedError, match="its logits are not its lm_head's weight applied"):
        CausalLMLoss(model)


def test_an_lm_head_holding_parameters_besides_weight_and_bias_is_refused_naming_them():
    """An nn.Linear that holds a parameter its forward does not read is refused too: the fused losses cannot know
    what a module of its own (here an extra scale) will do with it."""
    model = tiny_llama(VOCAB)
    model.lm_head.register_parameter("logit_gain", torch.nn.Parameter(torch.ones(())))
    with pytest.raises(NotImplementedError, match=r"holds parameters or buffers besides weight and bias "
                                                  r"\(logit_gain\)"):
        CausalLMLoss(model)


@pytest.mark.parametrize("which", ["original", "active copy"])
def test_a_modules_to_save_lm_head_whose_copy_holds_more_than_weight_and_bias_is_refused(which):
    """PEFT's modules_to_save wrapper of the lm_head holds its original (what runs with the adapter disabled: the
    reference of reference='adapter') and its trained copy: a parameter besides weight and bias in either is one the
    fused losses would not read, so each of the two is checked."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(VOCAB),
                                peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    CausalLMLoss(model, backend="torch")   # served as it is
    wrapper = model.base_model.model.lm_head
    holder = wrapper.original_module if which == "original" else wrapper.modules_to_save["default"]
    holder.register_parameter("logit_gain", torch.nn.Parameter(torch.ones(())))
    with pytest.raises(NotImplementedError, match=r"holds parameters or buffers besides weight and bias "
                                                  r"\(.*logit_gain\)"):
        CausalLMLoss(model, backend="torch")


class BufferScaledHead(torch.nn.Linear):
    """An lm_head whose forward multiplies its logits by a buffer of its own (a fixed logit scale)."""

    def __init__(self, linear):
        super().__init__(linear.in_features, linear.out_features, bias=False)
        self.weight = linear.weight
        self.register_buffer("logit_scale", torch.ones(()))

    def forward(self, x):
        return super().forward(x) * self.logit_scale


def test_an_lm_head_holding_a_buffer_besides_weight_and_bias_is_refused_naming_it():
    """A buffer is read by the head's forward as a parameter is (here a logit scale, 1 when the probe runs, so the
    probe cannot see it): the fused losses would not apply it, so it is refused by name, as a parameter is."""
    model = tiny_llama(VOCAB)
    model.lm_head = BufferScaledHead(model.lm_head)
    with pytest.raises(NotImplementedError, match=r"holds parameters or buffers besides weight and bias "
                                                  r"\(logit_scale\)"):
        CausalLMLoss(model, backend="torch")


@pytest.mark.parametrize("parametrized", ["weight", "bias"])
def test_an_lm_head_with_a_bias_and_a_parametrized_tensor_is_served(parametrized):
    """An lm_head with a bias, one of its tensors parametrized (its sources at parametrizations.<name>.*): the bias
    is read by the fused losses as the weight is, so the head is served with the model's loss and gradients, not
    refused as holding parameters of its own."""
    model = tiny_llama(VOCAB)
    model.lm_head.bias = torch.nn.Parameter(torch.randn(VOCAB) * 0.1)
    torch.nn.utils.parametrize.register_parametrization(model.lm_head, parametrized, torch.nn.Identity())
    inputs = batch(seed=5)
    assert_same_loss_and_gradients(model, CausalLMLoss(model, backend="torch")(**inputs), model(**inputs).loss)


class UpcastingScaledHead(torch.nn.Linear):
    """An lm_head storing a bf16 weight in an fp32 model, upcast in its forward, that rescales its logits by 1%."""

    def forward(self, x):
        return 1.01 * torch.nn.functional.linear(x, self.weight.to(x.dtype))


def test_a_bf16_stored_head_of_an_fp32_model_does_not_loosen_the_probes_bound():
    """The probe's bound is 2 eps of the dtype the hidden states and the weight compute in together (fp32 here), not
    of the weight's storage (bf16, whose 2 eps is 1.6%): a head that rescales its logits by 1% is refused, where the
    fused losses would train on logits that are not the model's."""
    model = tiny_llama(VOCAB)
    head = UpcastingScaledHead(model.lm_head.in_features, model.lm_head.out_features, bias=False)
    head.weight = torch.nn.Parameter(model.lm_head.weight.detach().to(torch.bfloat16))
    model.lm_head = head
    with pytest.raises(NotImplementedError, match="its logits are not its lm_head's weight applied"):
        CausalLMLoss(model, backend="torch")
