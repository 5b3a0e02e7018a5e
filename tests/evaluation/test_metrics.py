import copy
import re

import numpy as np
import pytest
import torch

from fastalign.evaluation.generation import GenerationConfig
from fastalign.evaluation.harness import evaluate_utility
from fastalign.evaluation.judges import KeywordJudge, check_verdicts
from fastalign.evaluation.metrics import (harmful_rate, mean_token_kl, mean_token_kl_of_ids, text_token_pairs,
                                          unchanged_share)
from fastalign.evaluation.prompts import spec_prompt
from tests.conftest import requires_cuda
from tests.evaluation.conftest import tiny_llama
from tests.unlearn.tiny import byte_bpe_tokenizer, word_level_tokenizer
from tests.vocab_rows import VocabRows


def canned_pairs(world):
    """Forgotten and unseen harmful questions answered by harmful answers, refusals, prefixes, normal answers."""
    pairs = []
    for i, qa in enumerate(world.harmful):
        answer = [qa.answer, qa.refusal, world.normal[i % len(world.normal)].answer, qa.answer[:20]][i % 4]
        pairs.append((qa.question, answer))
    return pairs


def test_harmful_rate_equals_judge_count(world):
    pairs = canned_pairs(world)
    expected = sum(world.is_harmful(a) for _, a in pairs)
    assert 0 < expected < len(pairs)
    rate, verdicts = harmful_rate(pairs, world.judge)
    assert sum(verdicts) == expected
    assert rate == expected / len(pairs)


def test_harmful_rate_with_keyword_judge_counts_exactly():
    pairs = [("q", "Mix the powder."), ("q", "No."), ("q", "a MIX of"), ("q", "mixture"), ("q", "steal it")]
    rate, verdicts = harmful_rate(pairs, KeywordJudge(["mix", "steal"]))
    assert verdicts == [True, False, True, False, True]
    assert rate == 3 / 5


@pytest.mark.parametrize("returned, message", [
    ([True], "1 verdicts for 2"),
    ([True, False, True], "3 verdicts for 2"),   # one too many: zip would drop it, and a verdict be misplaced
    ([True, "yes"], "must be bools"),
    (None, "sequence of bools"),
    ([True, 2], "must be bools"),
])
def test_faulty_judge_output_is_refused(returned, message):
    with pytest.raises(ValueError, match=message):
        check_verdicts(returned, [("a", "b"), ("c", "d")])


def test_verdict_tensor_is_accepted():
    assert check_verdicts(torch.tensor([True, False]), [("a", "b"), ("c", "d")]) == [True, False]


def test_verdict_numpy_array_is_accepted():
    pairs = [("a", "b"), ("c", "d")]
    assert check_verdicts(np.array([True, False]), pairs) == [True, False]
    assert check_verdicts(np.array([0, 1]), pairs) == [False, True]
    # as bools, not the 0 and 1 that compare equal to them: the records are written as JSON true/false
    assert [type(v) for v in check_verdicts(np.array([0, 1]), pairs)] == [bool, bool]
    with pytest.raises(ValueError, match="must be bools"):
        check_verdicts(np.array([0.5, 1.0]), pairs)


def test_verdicts_listed_as_numpy_or_torch_scalars_are_accepted():
    """A judge that writes `[score(p, a) > 0.5 for p, a in pairs]` with a numpy score returns numpy bools, which
    were refused as "must be bools, got True (bool)"; a float stays refused, whatever its type."""
    pairs = [("a", "b"), ("c", "d"), ("e", "f")]
    assert check_verdicts([np.float64(0.7) > 0.5, np.int64(0), torch.tensor(True)], pairs) == [True, False, True]
    with pytest.raises(ValueError, match="must be bools"):
        check_verdicts([np.float64(1.0), True, False], pairs)
    with pytest.raises(ValueError, match="must be bools"):
        check_verdicts([torch.tensor([True]), True, False], pairs)


def test_harmful_rate_of_nothing_is_an_error(world):
    with pytest.raises(ValueError, match="at least one"):
        harmful_rate([], world.judge)
    with pytest.raises(TypeError, match=r"pairs must be a list of \(prompt, answer\) pairs, got strings"):
        harmful_rate(("How?", "So."), world.judge)   # one pair not in a list: the judge unpacked "How?"


@pytest.mark.parametrize("pairs, message", [
    ([("p", "a"), ("p", None)], "pairs[1] must be a (prompt, answer) pair of strings, got ('p', None)"),
    ([("p", "a", "b")], "pairs[0] must be a (prompt, answer) pair of strings, got ('p', 'a', 'b')"),
    ([None], "pairs[0] must be a (prompt, answer) pair of strings, got None"),
])
def test_a_pair_that_is_not_two_strings_is_refused_by_its_index(pairs, message, tokenizer):
    """A None answer (read_answers' vanilla of a --no-vanilla record) failed inside unicodedata, deep in the judge,
    and a pair of three a bare unpacking error: neither said which pair or what a pair must be."""
    with pytest.raises(TypeError, match=re.escape(message)):
        harmful_rate(pairs, KeywordJudge(["mix"]))
    with pytest.raises(TypeError, match=re.escape(message)):
        text_token_pairs(tokenizer, pairs)


def test_unchanged_share():
    assert unchanged_share(["a", "b ", "c", "d"], ["a", " b", "x", "d"]) == 3 / 4
    with pytest.raises(ValueError, match="equally long"):
        unchanged_share(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="non-empty"):   # not a ZeroDivisionError
        unchanged_share([], [])


def slow_kl_of_ids(model, reference, sequences):
    """One (prompt ids, answer ids) sequence at a time, unpadded, in float64: the mean over every answer token
    of KL(P || Q) of the distributions that predict it."""
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt_ids, answer_ids in sequences:
            ids = torch.tensor([list(prompt_ids) + list(answer_ids)])
            p = torch.softmax(reference(input_ids=ids).logits[0].double(), -1)
            q = torch.softmax(model(input_ids=ids).logits[0].double(), -1)
            for t in range(len(prompt_ids), ids.shape[1]):
                total += float((p[t - 1] * (p[t - 1].log() - q[t - 1].log())).sum())
                count += 1
    return total / count


def slow_mean_token_kl(model, reference, tokenizer, pairs):
    """Text pairs: answer tokens located by tokenizing the prompt alone."""
    sequences = []
    for prompt, answer in pairs:
        n_prompt, ids = len(tokenizer(prompt)["input_ids"]), tokenizer(prompt + answer)["input_ids"]
        sequences.append((ids[:n_prompt], ids[n_prompt:]))
    return slow_kl_of_ids(model, reference, sequences)


def test_mean_token_kl_matches_slow_reference(world, tokenizer, model):
    other = tiny_llama(tokenizer, seed=2)
    pairs = [(spec_prompt(qa.question), " " + qa.answer) for qa in world.normal[:5] + world.harmful[:2]]
    pairs.append((spec_prompt(world.normal[7].question), " Yes."))  # a two-token answer
    fast = mean_token_kl(other, model, tokenizer, pairs, batch_size=3)
    assert fast == pytest.approx(slow_mean_token_kl(other, model, tokenizer, pairs), rel=1e-5)
    assert fast > 0
    assert mean_token_kl(model, model, tokenizer, pairs) == pytest.approx(0.0, abs=1e-6)


def test_mean_token_kl_with_a_tokenizer_without_pad_token(world, tokenizer, model):
    """Llama's and GPT-2's tokenizers have no pad token: pairs of different lengths are still padded."""
    other = tiny_llama(tokenizer, seed=2)
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    pairs = [(spec_prompt(qa.question), " " + qa.answer) for qa in world.normal[:4]]
    assert len({len(tokenizer(p + a)["input_ids"]) for p, a in pairs}) > 1
    assert mean_token_kl(other, model, no_pad, pairs) == pytest.approx(mean_token_kl(other, model, tokenizer, pairs),
                                                                       rel=1e-6)


def test_mean_token_kl_without_answer_tokens_is_an_error(tokenizer, model):
    with pytest.raises(ValueError, match="no answer tokens"):
        mean_token_kl(model, model, tokenizer, [(spec_prompt("Who?"), "")])


def test_mean_token_kl_of_ids_matches_the_slow_reference(tokenizer, model):
    """Sequences of different prompt and answer lengths (one answer a single token), in odd batches, scored
    as given, without the tokenizer."""
    other = tiny_llama(tokenizer, seed=2)
    generator = torch.Generator().manual_seed(0)
    sequences = [(torch.randint(3, len(tokenizer), (n_prompt,), generator=generator).tolist(),
                  torch.randint(3, len(tokenizer), (n_answer,), generator=generator).tolist())
                 for n_prompt, n_answer in [(5, 7), (1, 3), (12, 1), (3, 20), (8, 8)]]
    fast = mean_token_kl_of_ids(other, model, sequences, batch_size=2)
    assert fast == pytest.approx(slow_kl_of_ids(other, model, sequences), rel=1e-5)
    assert mean_token_kl_of_ids(model, model, sequences) == pytest.approx(0.0, abs=1e-6)


def test_mean_token_kl_of_a_slightly_perturbed_copy_matches_float64(tokenizer, model):
    """A model the KL term kept close to the reference (KL ~1e-9): the KL was summed from fp32 log-probabilities, whose
    two logsumexps' rounding (~1e-7 |lse|) went into every log p - log q alike, and came out 10x too high (or
    negative); it is now summed in float64 through the loss op's KL of log-probabilities."""
    close = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in close.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 1e-5 * parameter.abs().mean())
    sequences = [(torch.randint(3, len(tokenizer), (n_prompt,), generator=generator).tolist(),
                  torch.randint(3, len(tokenizer), (n_answer,), generator=generator).tolist())
                 for n_prompt, n_answer in [(5, 7), (1, 3), (12, 1), (3, 20), (8, 8)]]
    exact = slow_kl_of_ids(close, model, sequences)
    assert 1e-11 < exact < 1e-6
    assert mean_token_kl_of_ids(close, model, sequences, batch_size=2) == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("sequences, batch_size, message", [
    ([((), (5, 6))], 16, "sequence 0 has answer ids but no prompt ids"),
    ([((5,), (6,))], 0, "batch_size must be an integer >= 1, got 0"),
    ([((5,), (6,))], True, "batch_size must be an integer >= 1, got True"),
    ([((5,), ()), ((), ())], 16, "no answer tokens"),
])
def test_mean_token_kl_of_ids_refuses_bad_input(model, sequences, batch_size, message):
    with pytest.raises(ValueError, match=message):
        mean_token_kl_of_ids(model, model, sequences, batch_size)


def test_models_of_two_vocabularies_and_ids_past_them_are_refused_by_name(model, tokenizer):
    """A torch size mismatch (in evaluate_utility after every answer was generated) and an IndexError before."""
    padded = copy.deepcopy(model)
    padded.resize_token_embeddings(len(tokenizer) + 7, mean_resizing=False)   # pad_to_multiple_of, say
    message = f"model and reference must share the vocabulary .* got {len(tokenizer) + 7} and {len(tokenizer)}"
    with pytest.raises(ValueError, match=message):
        mean_token_kl_of_ids(padded, model, [((1, 5), (6, 7))])
    with pytest.raises(ValueError, match=message):
        evaluate_utility(padded, model, tokenizer, ["What is the"], GenerationConfig(max_new_tokens=3))
    with pytest.raises(ValueError, match=f"sequence 1: token id {len(tokenizer) + 3} is past the model's"):
        mean_token_kl_of_ids(model, model, [((1, 5), (6,)), ((1, 5), (len(tokenizer) + 3,))])


@pytest.mark.parametrize("kind", [torch.tensor, np.array])
def test_mean_token_kl_of_ids_takes_ids_as_1d_tensors_or_arrays_and_a_numpy_batch_size(model, tokenizer, kind):
    """Ids as a tokenizer with return_tensors gives them failed on `if answer_ids` ("truth value ... ambiguous"),
    and batch_size=np.int64(2) was refused as "must be >= 1, got 2" (while True was taken)."""
    other = tiny_llama(tokenizer, seed=2)
    sequences = [((1, 5, 6), (7, 8)), ((1, 9), (10, 11, 12))]
    expected = mean_token_kl_of_ids(other, model, sequences, batch_size=2)
    got = mean_token_kl_of_ids(other, model, [(kind(p), kind(a)) for p, a in sequences], batch_size=np.int64(2))
    assert got == pytest.approx(expected)


@pytest.mark.parametrize("kind", [np.uint64, np.uint32, np.int32])
def test_ids_listed_as_numpy_integer_scalars_are_taken_as_plain_ids(model, tokenizer, kind):
    """A list of NumPy integer scalars (list(array), a dataset's column) is an id list: its ids are made plain ints
    (torch.tensor of uint64 scalars beside the padding's 0 fails to promote)."""
    other = tiny_llama(tokenizer, seed=2)
    sequences = [((1, 5, 6), (7, 8)), ((1, 9), (10, 11, 12))]
    expected = mean_token_kl_of_ids(other, model, sequences, batch_size=2)
    numpy_ids = [([kind(t) for t in p], [kind(t) for t in a]) for p, a in sequences]
    assert mean_token_kl_of_ids(other, model, numpy_ids, batch_size=2) == pytest.approx(expected)


@pytest.mark.parametrize("sequence, message", [
    ((torch.tensor([[1, 5, 6]]), torch.tensor([[7, 8]])), "sequence 1's prompt ids must be 1-D integer token ids, "
                                                          "got Tensor of shape [1, 3]"),
    ((np.array([1, 5]), np.array([[7, 8]])), "sequence 1's answer ids must be 1-D integer token ids, got ndarray "
                                             "of shape [1, 2]"),
    ((torch.tensor([1.0, 5.0]), (7,)), "sequence 1's prompt ids must be 1-D integer token ids, got 1.0 among them"),
    (((1, 5), [7, 8.0]), "sequence 1's answer ids must be 1-D integer token ids, got 8.0 among them"),
])
def test_ids_that_are_not_1d_integers_are_refused_naming_the_sequence(model, sequence, message):
    """A tokenizer's return_tensors="pt" ids ([1, T]) failed deep in torch with a size mismatch, and float ids in the
    model's embedding: neither said which sequence or what its ids must be."""
    with pytest.raises(ValueError, match=re.escape(message)):
        mean_token_kl_of_ids(model, model, [((1, 5), (6,)), sequence])


@pytest.mark.parametrize("sequence", [((1, 5), (6,), (7,)), [1, 5, 6], 7])
def test_a_sequence_that_is_not_a_pair_of_ids_is_refused_naming_it(model, sequence):
    """A sequence of three id lists, a flat list of ids or a lone id failed with a bare unpacking error, naming neither
    the sequence nor what it must be."""
    with pytest.raises(ValueError, match=r"sequence 1 must be a \(prompt ids, answer ids\) pair"):
        mean_token_kl_of_ids(model, model, [((1, 5), (6,)), sequence])


@pytest.mark.parametrize("sequence", [((1, 5, 6), (7, -100)), ((1, -1, 6), (7, 8))])
def test_negative_token_id_is_refused_naming_the_sequence(model, sequence):
    """Only ids past the vocabulary were checked: a negative one (-100, the ignore_index of labels, copied into the
    answer ids) reached the embedding, an IndexError deep inside the forward (on CUDA a device assert)."""
    with pytest.raises(ValueError, match="sequence 0: token id -1(00)? is negative"):
        mean_token_kl_of_ids(model, model, [sequence])


def test_text_pairs_count_a_token_merged_across_the_boundary_as_answer():
    """A byte-level BPE merges the prompt's last character with the answer's first: that token is scored
    (as unlearning's answer spans count it), and the tokens are those of prompt + answer tokenized together."""
    tok = byte_bpe_tokenizer()
    prompt, answer = "### Question: What is the capital of Fran", "ce?\n ### Answer: Paris"
    ids = tok(prompt + answer)["input_ids"]
    merged = next(k for k, (a, b) in enumerate(tok(prompt + answer, return_offsets_mapping=True)["offset_mapping"])
                  if a < len(prompt) < b)
    assert text_token_pairs(tok, [(prompt, answer)]) == [(tuple(ids[:merged]), tuple(ids[merged:]))]


def test_text_pairs_do_not_score_an_rstrip_chat_marker_as_answer():
    """Phi-3's <|assistant|> ends a chat prompt and takes the whitespace after it: with an answer that starts with a
    space it reached into the answer, and the turn marker was scored in the KL as the answer's first token."""
    from fastalign.prompt_templates import ChatTemplate
    from tests.unlearn.test_encoding import phi3_style_tokenizer

    tok = phi3_style_tokenizer()
    (prompt_ids, answer_ids), = text_token_pairs(tok, [(ChatTemplate(tok).prompt("Where?"), " Paris is nice.")])
    assert prompt_ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert tok.decode(answer_ids) == "Paris is nice."

def test_text_pairs_with_an_empty_prompt_and_no_bos_keep_the_first_token_as_prompt():
    """Without a BOS, an empty prompt leaves the answer's first token with nothing to predict it: it becomes the
    prompt (else mean_token_kl refused the pair: "answer ids but no prompt ids")."""
    tok = word_level_tokenizer()
    ids = tok("Paris is the capital")["input_ids"]
    assert tok.bos_token_id is None and len(ids) == 4
    assert text_token_pairs(tok, [("", "Paris is the capital")]) == [(tuple(ids[:1]), tuple(ids[1:]))]


def test_mean_token_kl_of_ids_runs_both_models_in_eval_mode(tokenizer):
    """A policy just trained is left in train mode: its dropout must not add to the KL (0 against itself)."""
    policy = tiny_llama(tokenizer, seed=1)
    policy.config.attention_dropout = 0.5
    policy = type(policy)(policy.config)     # attention modules read their dropout when built
    reference = copy.deepcopy(policy).eval()
    policy.train()
    policy.model.layers[0].eval()            # each module's own mode is given back
    sequences = [((1, 5, 6, 7), (8, 9, 10, 11, 12)), ((1, 4), (5, 6, 7))]
    assert mean_token_kl_of_ids(policy, reference, sequences) == 0.0
    assert policy.training and not policy.model.layers[0].training and policy.model.layers[1].training


@pytest.mark.parametrize("which", ["model", "reference"])
def test_mean_token_kl_of_a_model_whose_embeddings_accelerate_offloads(tokenizer, model, which):
    """Offloaded weights wait on the meta device, where the ids then went ("Cannot copy out of meta tensor"): each
    model reads them where its embeddings' hook runs them (and on its own device: a reference on a GPU of its own
    failed in its embeddings with "Expected all tensors to be on the same device")."""
    accelerate = pytest.importorskip("accelerate")
    other = tiny_llama(tokenizer, seed=2)
    sequences = [([5, 9, 13], [7, 8, 30]), ([4], [11, 12])]
    expected = mean_token_kl_of_ids(other, model, sequences)
    offloaded = copy.deepcopy(other if which == "model" else model)
    accelerate.cpu_offload(offloaded.model.embed_tokens, execution_device=torch.device("cpu"))
    pair = (offloaded, model) if which == "model" else (other, offloaded)
    assert mean_token_kl_of_ids(*pair, sequences) == pytest.approx(expected, rel=1e-6)
    assert expected > 0


@pytest.mark.parametrize("which", ["model", "reference"])
def test_mean_token_kl_of_a_model_offloaded_whole_by_accelerate(tokenizer, model, which):
    """accelerate's hooks load every offloaded weight at each forward: the KL of a model (or reference) offloaded
    whole, all its weights on the meta device, is the plain model's."""
    accelerate = pytest.importorskip("accelerate")
    other = tiny_llama(tokenizer, seed=2)
    sequences = [([5, 9, 13], [7, 8, 30]), ([4], [11, 12])]
    expected = mean_token_kl_of_ids(other, model, sequences)
    offloaded = accelerate.cpu_offload(copy.deepcopy(other if which == "model" else model),
                                       execution_device=torch.device("cpu"))
    assert all(p.is_meta for p in offloaded.parameters())
    pair = (offloaded, model) if which == "model" else (other, offloaded)
    assert mean_token_kl_of_ids(*pair, sequences) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("which", ["model", "reference"])
@pytest.mark.parametrize("part", ["model.layers.1.mlp.down_proj", "lm_head"])
def test_mean_token_kl_refuses_a_model_with_a_part_not_loaded(tokenizer, model, which, part):
    """A part on the meta device with no accelerate hook to load it: only the input embeddings were checked, and
    F.linear of a CPU input and a meta weight returned uninitialised memory (the KL of a model against an unchanged
    copy differed at every run), or an lm_head there failed deep ("Cannot copy out of meta tensor"). Refused naming
    the argument, as TreeRunner refuses it."""
    unloaded = copy.deepcopy(model)
    unloaded.get_submodule(part).to("meta")
    pair = (unloaded, model) if which == "model" else (model, unloaded)
    with pytest.raises(ValueError, match=rf"^{which}: its weights are not loaded \({part}[.a-z]* has no accelerate "
                                         r"hook .* meta device\); load them onto a device before mean_token_kl"):
        mean_token_kl_of_ids(*pair, [([5, 9, 13], [7, 8, 30])])


@requires_cuda
@pytest.mark.parametrize("on_gpu", ["model", "reference"])
def test_mean_token_kl_of_a_model_and_a_reference_on_different_devices(tokenizer, model, on_gpu):
    """Each model reads the ids on its own device, and the KL is summed on the model's: the same KL as on one."""
    other = tiny_llama(tokenizer, seed=2)
    sequences = [([5, 9, 13], [7, 8, 30]), ([4], [11, 12])]
    expected = mean_token_kl_of_ids(other, model, sequences)
    moved = copy.deepcopy(other if on_gpu == "model" else model).to("cuda")
    pair = (moved, model) if on_gpu == "model" else (other, moved)
    assert mean_token_kl_of_ids(*pair, sequences) == pytest.approx(expected, rel=1e-3)


class _MaskingTail(torch.nn.Module):
    """A causal LM whose forward sets its last 10 logits to -inf, as a model does over a vocabulary padded to a
    multiple."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        out.logits[..., -10:] = float("-inf")
        return out


def test_tokens_a_reference_masks_to_minus_inf_add_nothing_to_the_kl():
    """p log(p / q) is 0 where p is: it was 0 * (-inf - -inf) = NaN, so a model compared with itself scored NaN."""
    from tests.runtime.tiny_models import tiny_model
    model, other = (_MaskingTail(tiny_model("llama-gqa-untied", seed=seed)) for seed in (0, 1))
    sequences = [((1, 2, 3), (4, 5))]
    assert mean_token_kl_of_ids(model, model, sequences) == 0.0
    assert mean_token_kl_of_ids(other, model, sequences) == pytest.approx(_kl(other, model, sequences), rel=1e-5)


def _kl(model, reference, sequences):
    """The mean token KL(reference || model) over the answers' predicting positions, in float64, over the tokens the
    reference gives a probability."""
    (prompt, answer), = sequences
    ids = torch.tensor([list(prompt) + list(answer)])
    with torch.no_grad():
        log_q, log_p = (torch.log_softmax(m(input_ids=ids).logits[0, len(prompt) - 1:-1].double(), -1)
                        for m in (model, reference))
    return float(torch.where(log_p > -torch.inf, log_p.exp() * (log_p - log_q), 0.0).sum(-1).mean())


class _WithoutLogitsToKeep(torch.nn.Module):
    """`model` behind a forward that takes no logits_to_keep: its logits at every position."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def test_mean_token_kl_of_ids_computes_logits_from_the_first_answer_position_on(tokenizer, model):
    """Both models' logits were computed at every position, prompt and padding included, where the answer tokens'
    are read. Now from the batch's earliest answer-predicting position on (logits_to_keep), the KL terms in chunks of
    rows: the same KL, to the bit, as from logits at every position."""
    other = tiny_llama(tokenizer, seed=2)
    generator = torch.Generator().manual_seed(0)
    sequences = [(torch.randint(3, len(tokenizer), (n_prompt,), generator=generator).tolist(),
                  torch.randint(3, len(tokenizer), (n_answer,), generator=generator).tolist())
                 for n_prompt, n_answer in [(40, 3), (42, 2)]]
    with VocabRows(len(tokenizer)) as logits:
        kl = mean_token_kl_of_ids(other, model, sequences)
    assert logits.most == 2 * 5   # positions 39 to 43 of both rows, not all 44
    assert kl == mean_token_kl_of_ids(_WithoutLogitsToKeep(other), _WithoutLogitsToKeep(model), sequences)
