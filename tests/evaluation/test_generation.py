import collections
import copy
import dataclasses
import random

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fastalign.evaluation.generation import (GenerationConfig, encode_prompts, eos_ids, generate, generations,
                                             iter_generate, iter_generations, pads_exactly)
from fastalign.evaluation.harness import evaluate_harm
from fastalign.evaluation.prompts import spec_prompt
from tests.runtime.tiny_models import WrappedEmbedding
from tests.vocab_rows import VocabRows


def prompts_of(world):
    # Different lengths, so that a batch is left-padded.
    return [spec_prompt(qa.question) for qa in world.normal[:4] + world.harmful[::30]] + ["### Question: Hi"]


def slow_greedy(model, tokenizer, prompt, max_new_tokens):
    """One prompt, no cache: the whole sequence re-run for every new token."""
    ids = tokenizer(prompt)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            out.append(token)
    return tokenizer.decode(out, skip_special_tokens=True)


def test_batched_greedy_equals_one_prompt_at_a_time(world, tokenizer, model):
    prompts = prompts_of(world)
    config = GenerationConfig(max_new_tokens=12, batch_size=4)
    batched = generate(model, tokenizer, prompts, config)
    single = [generate(model, tokenizer, [p], GenerationConfig(max_new_tokens=12, batch_size=1))[0] for p in prompts]
    assert batched == single
    assert batched == [slow_greedy(model, tokenizer, p, 12) for p in prompts]
    assert len(set(batched)) > 1


def test_stop_strings_cut_the_answer(world, tokenizer, model):
    prompts = prompts_of(world)
    full = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=12))
    stop = full[0][len(full[0]) // 2:][:3]
    assert stop
    cut = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=12, stop_strings=(stop,)))
    for whole, short in zip(full, cut):
        assert short == (whole[: whole.index(stop)] if stop in whole else whole)


def test_sampling_is_reproducible_and_differs_from_greedy(world, tokenizer, model):
    prompts = prompts_of(world)
    config = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=2.0, top_k=20, seed=3)
    first = generate(model, tokenizer, prompts, config)
    assert first == generate(model, tokenizer, prompts, config)
    assert first != generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=10))
    assert first != generate(model, tokenizer, prompts, dataclasses.replace(config, seed=4))   # the seed draws them


def test_sampled_answers_do_not_depend_on_the_batch_size(world, tokenizer, model):
    """Each prompt samples from its own seeded generator: the batch size, a speed setting, changes no answer."""
    prompts = prompts_of(world)
    answers = [generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=10, do_sample=True, temperature=2.0,
                                                                    batch_size=size, seed=3))
               for size in (1, 3, len(prompts))]
    assert answers[0] == answers[1] == answers[2]


def test_prompt_longer_than_context_is_refused(tokenizer, model):
    long_prompt = "### Question: " + "How do I bake a " * 30
    with pytest.raises(ValueError, match="prompt 1 has .* exceeds the model's context of 96"):
        generate(model, tokenizer, ["### Question: Hi", long_prompt], GenerationConfig(max_new_tokens=8))
    # a prompt that fits the context alone but leaves less than max_new_tokens positions to answer in
    fitting = "### Question: " + "How do I bake a " * 10
    room = 96 - len(tokenizer(fitting)["input_ids"])
    assert 0 < room < 90
    assert encode_prompts(tokenizer, [fitting], room, model) == [tokenizer(fitting)["input_ids"]]
    with pytest.raises(ValueError, match=f"prompt 0 has .* with max_new_tokens={room + 1} it exceeds"):
        encode_prompts(tokenizer, [fitting], room + 1, model)


@pytest.mark.parametrize("kwargs, message", [({"max_new_tokens": 0}, "max_new_tokens"),
                                             ({"batch_size": 0}, "batch_size"),
                                             ({"do_sample": True, "temperature": 0.0}, "temperature"),
                                             ({"do_sample": True, "temperature": float("inf")}, "temperature"),
                                             ({"do_sample": True, "temperature": float("nan")}, "temperature"),
                                             ({"top_k": -1}, "top_k"),
                                             # a float failed inside generation, naming no setting
                                             ({"batch_size": 16.0}, "batch_size must be an integer, got 16.0"),
                                             ({"max_new_tokens": 4.0}, "max_new_tokens must be an integer"),
                                             ({"top_k": 2.0}, "top_k must be an integer")])
def test_bad_generation_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**kwargs)


@pytest.mark.parametrize("seed", [1.0, True, "1", None, -1, 2 ** 64, 2 ** 70])
def test_a_seed_that_is_no_64_bit_integer_is_refused(seed):
    """Each prompt's generator is seeded from the text f"{seed}:{i}": 1.0, True and "1" sampled otherwise than 1,
    and None, -1 or 2**70 were taken, where RainConfig and UnlearnConfig refuse them all."""
    with pytest.raises(ValueError, match=r"^seed must be an integer in \[0, 2\*\*64\), got "):
        GenerationConfig(do_sample=True, seed=seed)


def test_a_numpy_seed_samples_as_its_python_int():
    """A NumPy integer is taken as the int it holds, as UnlearnConfig takes it (its text, which seeds the draws, is
    that int's)."""
    seed = random.randrange(2 ** 64)
    config = GenerationConfig(do_sample=True, seed=np.uint64(seed))
    assert type(config.seed) is int and config.seed == seed


def test_stop_strings_decode_a_bounded_tail_of_the_answer_at_each_step(world, tokenizer, model):
    """A stop string can only end in the newest token's text: each step decodes a window of the answer's last tokens
    (the whole answer, decoded at every step, cost O(answer) per token: 542k tokens decoded for one 1024-token
    answer), and the answer's text is decoded whole once, at its end."""
    prompt, stops = "### Question: Hi", ("\u2603", "zz")
    free = generations(model, tokenizer, [prompt], GenerationConfig(max_new_tokens=90))[0]
    assert len(free.answer_ids) == 90 and not any(s in free.text for s in stops)
    calls = []
    real_decode = type(tokenizer).decode

    def counting_decode(self, ids, *args, **kwargs):
        calls.append(len(ids))
        return real_decode(self, ids, *args, **kwargs)

    type(tokenizer).decode = counting_decode
    try:
        stopped = generations(model, tokenizer, [prompt], GenerationConfig(max_new_tokens=90, stop_strings=stops))[0]
    finally:
        type(tokenizer).decode = real_decode
    assert stopped == free
    steps = calls[:-2]   # the last two: prompt, and prompt + answer, decoded for the answer's text
    # 8 tokens of context and a window of the longest stop string's length + 8 tokens (doubled at most twice), or the
    # answer itself while no longer than two windows with their context
    assert calls[-1] == len(free.prompt_ids) + 90 and max(steps) <= 8 + max(4 * (2 + 8), 2 * (2 + 8 + 16)) < 90


def test_generation_stops_at_eos_like_the_slow_reference(world, tokenizer, model):
    """Rows stop at EOS as one-at-a-time decoding does. The tiny model never picks EOS: make EOS win wherever
    its most common answer token would."""
    prompts = prompts_of(world)
    config = GenerationConfig(max_new_tokens=12, batch_size=4)
    free = generate(model, tokenizer, prompts, config)
    ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in free]
    token = collections.Counter(t for row in ids for t in row[1:]).most_common(1)[0][0]
    eos_model = copy.deepcopy(model)
    with torch.no_grad():
        eos_model.lm_head.weight[tokenizer.eos_token_id] = eos_model.lm_head.weight[token] * 1.05
    batched = generate(eos_model, tokenizer, prompts, config)
    assert batched == [slow_greedy(eos_model, tokenizer, p, 12) for p in prompts]
    assert any(len(b) < len(f) for b, f in zip(batched, free))  # EOS did end some answers early


def test_generations_hold_the_ids_each_answer_was_generated_from_and_as(world, tokenizer, model):
    """Prompt ids as generation read them; answer ids as written, through the EOS a row stopped on (never in
    the text), all max_new_tokens of them where it ran out, through the token completing a stop string."""
    prompts = prompts_of(world)
    config = GenerationConfig(max_new_tokens=12, batch_size=4)
    free = generations(model, tokenizer, prompts, config)
    token = collections.Counter(t for g in free for t in g.answer_ids[1:]).most_common(1)[0][0]
    eos_model = copy.deepcopy(model)
    with torch.no_grad():
        eos_model.lm_head.weight[tokenizer.eos_token_id] = eos_model.lm_head.weight[token] * 1.05
    eos = tokenizer.eos_token_id
    stopped = generations(eos_model, tokenizer, prompts, config)
    assert [g.prompt_ids for g in stopped] == [tuple(r) for r in encode_prompts(tokenizer, prompts, 12, model)]
    assert [g.text for g in stopped] == generate(eos_model, tokenizer, prompts, config)
    assert any(g.answer_ids[-1:] == (eos,) for g in stopped) and all(len(g.answer_ids) == 12 for g in free)
    for writer, g in [(eos_model, g) for g in stopped] + [(model, g) for g in free]:
        ended = g.answer_ids[-1:] == (eos,)
        assert eos not in g.answer_ids[:-1] and (ended or len(g.answer_ids) == 12)
        assert g.text == tokenizer.decode(g.answer_ids[:len(g.answer_ids) - ended])
        with torch.no_grad():   # each answer id is the greedy pick after the ids before it
            logits = writer(input_ids=torch.tensor([g.prompt_ids + g.answer_ids])).logits[0]
        assert tuple(logits[len(g.prompt_ids) - 1:-1].argmax(-1).tolist()) == g.answer_ids
    stop = free[0].text[len(free[0].text) // 2:][:3]
    cut = [g for g in generations(model, tokenizer, prompts, GenerationConfig(max_new_tokens=12, stop_strings=(stop,)))
           if stop in tokenizer.decode(g.answer_ids)]
    assert cut and all(stop not in tokenizer.decode(g.answer_ids[:-1]) and stop not in g.text for g in cut)


def test_generation_stops_at_every_eos_of_the_generation_config(world, tokenizer, model):
    """A model whose generation config lists a second end-of-sequence token (Gemma's end of turn) ends its
    answers there, as `model.generate` does."""
    prompts = prompts_of(world)
    config = GenerationConfig(max_new_tokens=12, batch_size=4)
    ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in generate(model, tokenizer, prompts, config)]
    token = collections.Counter(t for row in ids for t in row[1:]).most_common(1)[0][0]
    turn_model = copy.deepcopy(model)
    turn_model.generation_config.eos_token_id = [tokenizer.eos_token_id, token]
    expected = []
    for prompt in prompts:
        prompt_ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out = turn_model.generate(prompt_ids, max_new_tokens=12, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)[0, prompt_ids.shape[1]:].tolist()
        expected.append(tokenizer.decode([t for t in out if t not in (token, tokenizer.eos_token_id)]))
    assert generate(turn_model, tokenizer, prompts, config) == expected
    assert sum(map(len, expected)) < sum(len(tokenizer.decode(row)) for row in ids)  # the token ended answers


def test_top_k_one_sampling_is_greedy(world, tokenizer, model):
    """Sampling from the top 1 token, at any temperature, is greedy decoding."""
    prompts = prompts_of(world)
    sampled = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=10, do_sample=True,
                                                                   temperature=3.0, top_k=1, seed=3))
    assert sampled == generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=10))


def test_sampling_at_a_tiny_temperature_is_greedy(world, tokenizer, model):
    """A tiny temperature the config accepts (1e-40; 1e-300, which is 0 in fp32) made logits / temperature +-inf, a
    NaN softmax and torch.multinomial crash; the draw is now the limit's, the greedy answer."""
    prompts = prompts_of(world)[:2]
    greedy = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=5))
    for temperature in (1e-40, 1e-300):
        assert generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=5, do_sample=True,
                                                                    temperature=temperature)) == greedy

def test_batched_greedy_with_absolute_positions(world, tokenizer):
    """Left padding shifts no position: a model with learned absolute positions (which, unlike RoPE, would
    show a shift) decodes each prompt of a batch as it decodes it alone."""
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=96, n_embd=32, n_layer=2, n_head=4,
                                      eos_token_id=tokenizer.eos_token_id,
                                      bos_token_id=tokenizer.bos_token_id)).eval()
    with torch.no_grad():
        gpt2.transformer.wpe.weight.mul_(30)  # make positions matter
    prompts = prompts_of(world)
    batched = generate(gpt2, tokenizer, prompts, GenerationConfig(max_new_tokens=8, batch_size=8))
    assert batched == [slow_greedy(gpt2, tokenizer, p, 8) for p in prompts]


@pytest.mark.parametrize("family", ["rwkv", "recurrent_gemma"])
def test_a_model_whose_cache_does_not_come_back_generates_as_without_a_cache(world, tokenizer, family):
    """RWKV keeps its recurrent state in an output of its own and RecurrentGemma inside the model: no cache comes
    back to pass on, and each step saw its last token alone (both failed this: RWKV gave every prompt one answer).
    The whole sequence runs again instead, as one-at-a-time decoding without a cache does."""
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM, RwkvConfig, RwkvForCausalLM
    torch.manual_seed(0)
    ids = dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    if family == "rwkv":
        model = RwkvForCausalLM(RwkvConfig(hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                                           intermediate_size=64, context_length=128, **ids)).eval()
        with torch.no_grad():   # logits that tell contexts apart
            model.get_output_embeddings().weight.mul_(20)
    else:
        model = RecurrentGemmaForCausalLM(RecurrentGemmaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
            lru_width=32, attention_window_size=16, **ids)).eval()
    prompts = prompts_of(world)[:3]
    answers = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=6, batch_size=1))
    assert answers == [slow_greedy(model, tokenizer, p, 6) for p in prompts]
    assert family != "rwkv" or len(set(answers)) > 1


@pytest.mark.parametrize("family", ["rwkv", "pegasus"])
def test_a_model_whose_logits_padding_changes_answers_each_prompt_as_alone(world, tokenizer, family):
    """RWKV reads no attention mask (the pads run through its state) and Pegasus places its sinusoidal positions by
    the sequence's length, not position_ids: a prompt left-padded in a batch got another answer than alone. A probe
    finds such a model, and prompts of one token length run together instead."""
    from transformers import PegasusConfig, PegasusForCausalLM, RwkvConfig, RwkvForCausalLM
    torch.manual_seed(0)
    ids = dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    if family == "rwkv":
        model = RwkvForCausalLM(RwkvConfig(hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                                           intermediate_size=64, context_length=128, **ids)).eval()
    else:
        model = PegasusForCausalLM(PegasusConfig(d_model=32, decoder_layers=2, decoder_attention_heads=2,
                                                 decoder_ffn_dim=64, encoder_layers=2, max_position_embeddings=128,
                                                 pad_token_id=tokenizer.pad_token_id, **ids)).eval()
    with torch.no_grad():   # logits that tell contexts apart
        model.get_output_embeddings().weight.mul_(20)
    prompts = prompts_of(world)[:2] + prompts_of(world)[:1]   # two of one length: run together
    batched = generations(model, tokenizer, prompts, GenerationConfig(max_new_tokens=6, batch_size=3))
    alone = generations(model, tokenizer, prompts, GenerationConfig(max_new_tokens=6, batch_size=1))
    assert [g.answer_ids for g in batched] == [g.answer_ids for g in alone]


def test_the_padding_probe_takes_ids_every_vocabulary_has(tokenizer):
    """The probe's token ids (up to 3) fell outside a model of 3 words: an IndexError (a device-side assert on a GPU)
    where its generation had run."""
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=3, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0,
                                         bos_token_id=1, eos_token_id=2)).eval()
    assert pads_exactly(model, tokenizer)


def test_a_model_whose_embeddings_are_wrapped_generates_as_the_model(world, tokenizer, model):
    """A model whose input vocabulary is not known (embeddings without a weight) crashed the padding probe with
    `1 % None` (TypeError) on prompts of two lengths; it generates the model's answers."""
    wrapped = copy.deepcopy(model)
    wrapped.set_input_embeddings(WrappedEmbedding(wrapped.get_input_embeddings()))
    prompts, config = prompts_of(world)[::len(prompts_of(world)) - 1], GenerationConfig(max_new_tokens=4)
    assert pads_exactly(wrapped, tokenizer) == pads_exactly(model, tokenizer)
    assert generate(wrapped, tokenizer, prompts, config) == generate(model, tokenizer, prompts, config)


def test_generation_computes_the_logits_of_each_rows_last_position_alone(world, tokenizer, model):
    """The prefill ran the model over [rows, prompt tokens] and read the last position's logits, making every
    position's (Llama-3-8B, 16 prompts padded to 2048 tokens, bf16: 7.8 GiB where 4 MiB are read); so did each step of
    a model whose cache does not come back (RWKV), over its whole sequence. Now both keep the last position's alone
    (logits_to_keep=1, as transformers' generate); the answers are as before (the tests above)."""
    from transformers import RwkvConfig, RwkvForCausalLM
    torch.manual_seed(0)
    rwkv = RwkvForCausalLM(RwkvConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                      attention_hidden_size=32, intermediate_size=64, context_length=128)).eval()
    prompts = prompts_of(world)[:2]
    for each in (model, rwkv):
        with VocabRows(len(tokenizer)) as logits:
            generate(each, tokenizer, prompts, GenerationConfig(max_new_tokens=3, batch_size=2))
        assert logits.most == 2, type(each).__name__


class _NumberTokenizer:
    """Token ids as the text: answers of any model compare by their ids."""
    pad_token_id = eos_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_a_mamba_model_generates_its_own_greedy_answers():
    """Mamba's mixers multiply their inputs by the attention mask: fed the whole mask with one new token (generate gives
    none once there is a cache), each step computed a sequence as long as the context, and answers drifted from the
    model's own after their first token."""
    from fastalign.evaluation.generation import _generate_batch
    from tests.runtime.tiny_models import tiny_model
    model = tiny_model("mamba-stepped-states")   # logits of order 1: the drift is no near-tie
    prompts = [[1, 30, 40, 50, 60, 7], [5, 9, 11]]
    expected = []
    with torch.no_grad():
        for ids in map(list, prompts):
            for _ in range(6):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            expected.append(ids[-6:])
    generations = _generate_batch(model, _NumberTokenizer(), prompts, GenerationConfig(max_new_tokens=6), set(), [])
    assert [list(g.answer_ids) for g in generations] == expected


SENTENCEPIECE_PROMPTS = ["### Question: how do I bake a cake ### Answer:", "### Question: is it ### Answer:"]


def sentencepiece_model():
    """(model, tokenizer): Llama 2's kind of tokenizer ("▁word" pieces) over a few words, a random tiny Llama."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = "### Question: Answer: how do I bake a cake sure it is".split()
    pieces = ["<unk>", "<s>", "</s>"] + ["▁" + w for w in words]
    core = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(pieces), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, eos_token_id=2)).eval()
    return model, tokenizer


def test_answer_keeps_the_space_that_a_sentencepiece_tokenizer_puts_in_its_first_token():
    """With Llama 2's kind of tokenizer ("▁word" pieces), decoding the answer alone drops the space before its
    first word; the answer is the text after the prompt, so prompt + answer re-encodes to the tokens written."""
    model, tokenizer = sentencepiece_model()
    prompts = SENTENCEPIECE_PROMPTS
    for prompt, answer in zip(prompts, generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=6))):
        prompt_ids = tokenizer(prompt)["input_ids"]
        written = model.generate(torch.tensor([prompt_ids]), max_new_tokens=6, do_sample=False,
                                 pad_token_id=2)[0, len(prompt_ids):].tolist()
        written = [t for t in (written[:written.index(2)] if 2 in written else written) if t > 2]  # words only
        assert written and answer.startswith(" ")
        assert tokenizer(prompt + answer)["input_ids"] == prompt_ids + written


def test_a_stop_string_starting_with_the_space_of_the_first_word_stops_there():
    """The stop rule reads the answer as its text will be (the space of a SentencePiece first word included),
    so generation ends on the token that completes the stop string, as the answer_ids say."""

    model, tokenizer = sentencepiece_model()
    free = generations(model, tokenizer, SENTENCEPIECE_PROMPTS, GenerationConfig(max_new_tokens=8))
    stop = " " + free[0].text.split()[0]
    assert free[0].text.startswith(stop) and len(free[0].answer_ids) > 1
    cut = generations(model, tokenizer, SENTENCEPIECE_PROMPTS, GenerationConfig(max_new_tokens=8, stop_strings=(stop,)))
    assert cut[0].text == "" and cut[0].answer_ids == free[0].answer_ids[:1]


def test_the_answer_is_cut_at_the_earliest_of_the_stop_strings_it_holds(world, tokenizer, model):
    """Stop strings that one token completes together (one a suffix of the other): the answer is cut before the
    one that starts first, whichever order they are listed in."""
    prompts = prompts_of(world)
    full = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=12))
    # a 6-character piece whose last 3 characters first occur there (and not as a stop before it)
    found = [(i, text[k:k + 6], text[k + 3:k + 6]) for i, text in enumerate(full) for k in range(len(text) - 5)
             if text.find(text[k + 3:k + 6]) == k + 3 and text.find(text[k:k + 6]) == k]
    assert found
    i, longer, suffix = found[0]
    for stops in ((longer, suffix), (suffix, longer)):
        cut = generate(model, tokenizer, [prompts[i]], GenerationConfig(max_new_tokens=12, stop_strings=stops))
        assert cut == [full[i][:full[i].index(longer)]]


def test_generation_gives_the_model_back_in_the_mode_it_was_in(world, tokenizer, model):
    """Generation runs in eval mode (no dropout: the model in training drops half its attention weights) and gives a
    model being trained back in train mode, each module in its own (a frozen layer of a policy stays in eval mode)."""
    training = copy.deepcopy(model).train()
    training.model.layers[0].eval()
    for layer in training.model.layers:
        layer.self_attn.attention_dropout = 0.5
    assert generate(training, tokenizer, prompts_of(world)[:2], GenerationConfig(max_new_tokens=3)) == \
        generate(model, tokenizer, prompts_of(world)[:2], GenerationConfig(max_new_tokens=3))
    assert training.training and not training.model.layers[0].training and training.model.layers[1].training
    generate(model, tokenizer, prompts_of(world)[:1], GenerationConfig(max_new_tokens=2))
    assert not model.training


def test_a_tokenizer_that_appends_eos_to_every_text_gives_prompts_without_it(world, tokenizer, model):
    """A tokenizer configured with add_eos_token=True ends every encoding with EOS: a prompt read that way asked the
    model to go on after the end of the sequence. Prompts are read without it, so answers are those of the same
    tokenizer without add_eos_token; an EOS the prompt's text writes itself stays."""
    from tests.tokenizer_variants import appending_eos

    eos_tokenizer, prompts = appending_eos(tokenizer), prompts_of(world)
    assert eos_tokenizer(prompts[0])["input_ids"] == tokenizer(prompts[0])["input_ids"] + [tokenizer.eos_token_id]
    assert encode_prompts(eos_tokenizer, prompts, 8, model) == encode_prompts(tokenizer, prompts, 8, model)
    written = prompts[0] + tokenizer.eos_token
    assert encode_prompts(eos_tokenizer, [written], 8, model) == [tokenizer(written)["input_ids"]]
    config = GenerationConfig(max_new_tokens=6, batch_size=4)
    assert generations(model, eos_tokenizer, prompts, config) == generations(model, tokenizer, prompts, config)


def test_a_slow_tokenizer_generates_as_the_fast_one_with_the_same_ids(world, tokenizer, model):
    """Generation needs no character offsets: a pure-Python tokenizer (models with custom tokenizer code) works."""
    from tests.tokenizer_variants import SlowTokenizer

    slow = SlowTokenizer(tokenizer.backend_tokenizer, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                         pad_token=tokenizer.pad_token, unk_token=tokenizer.unk_token)
    prompts, config = prompts_of(world), GenerationConfig(max_new_tokens=6, batch_size=4)
    assert not slow.is_fast and encode_prompts(slow, prompts, 6, model) == encode_prompts(tokenizer, prompts, 6, model)
    assert generations(model, slow, prompts, config) == generations(model, tokenizer, prompts, config)


def test_token_ids_past_the_models_embeddings(world, tokenizer, model):
    """A tokenizer with tokens added past the model's input embeddings (a pad token or chat markers added without
    resizing them): a pad token there only fills masked positions, which the embedding still looks up (an
    IndexError deep in the forward of any batch of prompts of different lengths), so batches are padded with an
    id the model embeds; a prompt that holds such a token is an error naming it."""
    extended = copy.deepcopy(tokenizer)
    extended.add_special_tokens({"pad_token": "[PAD]", "additional_special_tokens": ["<|im_start|>"]})
    vocab = model.get_input_embeddings().weight.shape[0]
    assert extended.pad_token_id >= vocab
    prompts, config = prompts_of(world), GenerationConfig(max_new_tokens=4, batch_size=4)
    assert generations(model, extended, prompts, config) == generations(model, tokenizer, prompts, config)
    with pytest.raises(ValueError, match=rf"prompt 1: token id {vocab + 1} is past the model's {vocab} input "
                                         "embeddings: the tokenizer does not match the model"):
        generate(model, extended, [prompts[0], "<|im_start|>" + prompts[1]], config)


@pytest.mark.parametrize("part", ["model.embed_tokens", ""])
def test_a_model_whose_embeddings_accelerate_offloads_generates_as_the_model(world, tokenizer, model, part):
    """Offloaded weights wait on the meta device, which put the prompts there ("Cannot copy out of meta tensor" when
    the embeddings' hook moved them): the prompts go where the embeddings' hook runs them. A model offloaded whole
    (its hooks load every weight) is loaded, unlike a part on the meta device without a hook (below)."""
    accelerate = pytest.importorskip("accelerate")
    offloaded = copy.deepcopy(model)
    accelerate.cpu_offload(offloaded.get_submodule(part), execution_device=torch.device("cpu"))
    assert next(offloaded.parameters()).is_meta
    prompts = prompts_of(world)
    config = GenerationConfig(max_new_tokens=6, batch_size=3)
    assert generations(offloaded, tokenizer, prompts, config) == generations(model, tokenizer, prompts, config)


@pytest.mark.parametrize("part", ["model.layers.1.mlp.down_proj", "lm_head"])
def test_a_model_with_a_part_not_loaded_is_refused(world, tokenizer, model, part):
    """A part on the meta device with no accelerate hook to load it: only the input embeddings were checked, and
    F.linear of a CPU input and a meta weight returned uninitialised memory (garbage answers, silently), or an lm_head
    there failed deep ("Cannot copy out of meta tensor"). Refused, as TreeRunner refuses it."""
    unloaded = copy.deepcopy(model)
    unloaded.get_submodule(part).to("meta")
    with pytest.raises(ValueError, match=r"^model: its weights are not loaded \(.* on the meta device\); load them "
                                         "onto a device before generation uses it"):
        generations(unloaded, tokenizer, prompts_of(world), GenerationConfig(max_new_tokens=3))


def test_sampling_follows_the_softmax_of_the_logits_over_the_temperature(world, tokenizer, model):
    """Many draws of one prompt's first token: a temperature above 1 flattens the distribution and one below 1
    sharpens it, as softmax(logits / temperature) says (a mutation that multiplied by the temperature, inverting
    both, went unseen: the other tests only compare sampled answers with each other and with greedy ones)."""
    prompt = prompts_of(world)[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokenizer(prompt)["input_ids"]])).logits[0, -1]
    top, n = int(logits.argmax()), 200
    for temperature in (0.5, 2.0):
        expected = float(torch.softmax(logits / temperature, -1)[top])
        drawn = generations(model, tokenizer, [prompt] * n, GenerationConfig(max_new_tokens=1, batch_size=n,
                                                                              do_sample=True, temperature=temperature))
        share = sum(g.answer_ids[0] == top for g in drawn) / n
        assert abs(share - expected) < 0.1, (temperature, share, expected)


def test_top_k_past_the_vocabulary_and_an_empty_stop_string_change_nothing(world, tokenizer, model):
    """top_k larger than the vocabulary keeps every token (torch's topk refuses k past the vocabulary size), and an
    empty stop string, which every text contains, stops no answer (it cut every answer to nothing)."""
    prompts = prompts_of(world)
    sampled = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=2.0, seed=3)
    assert generate(model, tokenizer, prompts, dataclasses.replace(sampled, top_k=len(tokenizer) + 5)) == \
        generate(model, tokenizer, prompts, sampled)
    greedy = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=6))
    assert generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=6, stop_strings=("",))) == greedy
    assert all(greedy)


def test_a_prompt_that_tokenizes_to_nothing_is_refused_naming_it():
    """An empty prompt with a tokenizer that adds no BOS (Llama 2's kind here) has no token to answer after: in a batch
    it read padding alone and silently got an answer."""
    model, tokenizer = sentencepiece_model()
    assert tokenizer("")["input_ids"] == []
    with pytest.raises(ValueError, match="prompt 1 is empty after tokenization"):
        generate(model, tokenizer, [SENTENCEPIECE_PROMPTS[0], ""], GenerationConfig(max_new_tokens=3))


def test_one_prompt_string_is_refused(world, tokenizer, model):
    """A str is a sequence of its characters: each was answered as a prompt of its own, a harm rate over them."""
    prompt = prompts_of(world)[0]
    for call in (lambda: generate(model, tokenizer, prompt, GenerationConfig(max_new_tokens=2)),
                 lambda: evaluate_harm(model, tokenizer, prompt, world.judge, GenerationConfig(max_new_tokens=2))):
        with pytest.raises(TypeError, match="prompts must be a list of strings, got a single string"):
            call()


def test_answers_end_at_each_listed_eos_id_0_and_a_tuple_of_them_included():
    """eos_ids: the tokenizer's EOS and every id of the model's generation config, listed alone, in a list or in a
    tuple; id 0 is an EOS like any other (a vocabulary may start with it)."""
    from types import SimpleNamespace
    tokenizer = sentencepiece_model()[1]   # EOS 2, no chat template
    for listed, expected in [(None, {2}), (0, {0, 2}), ([0, 5], {0, 2, 5}), ((0, 5), {0, 2, 5})]:
        assert eos_ids(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=listed)), tokenizer) == expected


def test_batches_come_with_the_index_of_their_first_prompt(world, tokenizer, model):
    """iter_generate and iter_generations yield each batch with its first prompt's index (the harness writes answers
    batch by batch at those indexes); the batches, in order, are generate's answers."""
    prompts, config = prompts_of(world), GenerationConfig(max_new_tokens=3, batch_size=2)
    answers = generate(model, tokenizer, prompts, config)
    batches, starts = list(iter_generate(model, tokenizer, prompts, config)), list(range(0, len(prompts), 2))
    assert [start for start, _ in batches] == starts and len(starts) > 2
    assert all(texts == answers[start:start + 2] for start, texts in batches)
    assert [start for start, _ in iter_generations(model, tokenizer, prompts, config)] == starts


def check_the_loop_body_runs_in_the_callers_mode(stream, model, expected):
    """`stream(m)` yields the answer texts of `expected` (generate's, in eval mode) batch by batch, generating with
    `m`. On a copy of `model` being trained (its attention dropping half its weights, layer 0 frozen in eval mode):
    the loop body runs with each module in the mode the caller set, dropout on (a training step on each batch); a
    train() there leaves the next batches' answers as they were; an eval() there stays after the loop."""
    training = copy.deepcopy(model).train()
    training.model.layers[0].eval()
    for layer in training.model.layers:
        layer.self_attn.attention_dropout = 0.5
    modes = [m.training for m in training.modules()]
    ids = torch.randint(3, model.config.vocab_size, (1, 8))
    batches = 0
    for _ in stream(training):
        assert [m.training for m in training.modules()] == modes
        assert not torch.equal(training(ids).logits, training(ids).logits)
        batches += 1
    assert batches == len(expected) > 2 and [m.training for m in training.modules()] == modes
    got = []
    for answers in stream(training):
        got += answers
        training.train()
    assert got == expected
    for _ in stream(training):
        training.eval()
    assert not any(m.training for m in training.modules())


def test_the_callers_loop_over_the_batches_runs_in_the_mode_it_set(world, tokenizer, model):
    """iter_generate and iter_generations hold the model in eval mode while they generate, not between the batches
    they yield: a caller training on each batch trained without dropout, a train() in its loop made the next batches
    generate with dropout (3 of 4 answers differed), and an eval() in its loop was undone when the loop ended."""
    prompts, config = prompts_of(world)[:4], GenerationConfig(max_new_tokens=6, batch_size=1)
    expected = generate(model, tokenizer, prompts, config)
    check_the_loop_body_runs_in_the_callers_mode(
        lambda m: (answers for _, answers in iter_generate(m, tokenizer, prompts, config)), model, expected)
    check_the_loop_body_runs_in_the_callers_mode(
        lambda m: ([g.text for g in batch] for _, batch in iter_generations(m, tokenizer, prompts, config)), model,
        expected)


def test_the_temperature_is_only_checked_when_sampling_and_greedy_runs_64_tokens_by_default(world, tokenizer, model):
    """Greedy decoding reads no temperature, so any is accepted there; by default an answer that meets no EOS runs to
    64 new tokens (the tiny model never picks EOS)."""
    assert GenerationConfig(temperature=0.0) == GenerationConfig(temperature=0.0, do_sample=False)
    assert [len(g.answer_ids) for g in generations(model, tokenizer, ["### Question: Hi"])] == [64]


def test_a_stop_string_holding_a_special_tokens_text_is_refused_by_name():
    """Answers are decoded without special tokens: a stop string '<|start_header_id|>' (a new turn the model begins)
    never showed in one, and the answer ran on to max_new_tokens, silently."""
    from tests.evaluation.chat_model import chat_tokenizer
    from tests.evaluation.conftest import tiny_llama
    tokenizer = chat_tokenizer()
    config = GenerationConfig(max_new_tokens=8, stop_strings=("\n", "x<|start_header_id|>"))
    with pytest.raises(ValueError, match=r"stop string 'x<\|start_header_id\|>' holds the special token "
                                         r"'<\|start_header_id\|>', which answers are decoded without"):
        generations(tiny_llama(tokenizer, 3), tokenizer, ["Hello Bob"], config)


def peft_model(tokenizer, adapter):
    """A tiny Llama under a PEFT prompt-learning adapter (`adapter`: the config's name) of 3 virtual tokens."""
    peft = pytest.importorskip("peft")
    from tests.evaluation.conftest import tiny_llama
    extra = {"encoder_hidden_size": 16} if adapter == "PromptEncoderConfig" else {}
    config = getattr(peft, adapter)(task_type="CAUSAL_LM", num_virtual_tokens=3, **extra)
    return peft.get_peft_model(tiny_llama(tokenizer, 2), config).eval()


@pytest.mark.parametrize("adapter", ["PromptTuningConfig", "PromptEncoderConfig"])
def test_a_peft_adapter_of_virtual_tokens_before_the_inputs_is_refused(world, tokenizer, model, adapter):
    """Prompt tuning and P-tuning put virtual tokens before the inputs in PEFT's forward, at every call: the forward
    per new token over the KV cache prepended them again (and before the left pads), and answers drifted from the
    model's own greedy ones, silently. Such a model is refused before any forward."""
    prompts, config = prompts_of(world)[:2], GenerationConfig(max_new_tokens=4, batch_size=2)
    tuned = peft_model(tokenizer, adapter)
    match = rf"model: its PEFT adapter \({adapter}\) is a prompt-learning adapter .* use an adapter in the layers"
    with pytest.raises(ValueError, match=match):
        generations(tuned, tokenizer, prompts, config)
    with pytest.raises(ValueError, match=match):
        next(iter_generate(tuned, tokenizer, prompts, config))
    from fastalign.evaluation.harness import evaluate_utility
    with pytest.raises(ValueError, match=match):   # before the reference's answers are generated
        evaluate_utility(tuned, model, tokenizer, prompts, config)


def prefix_tuned(tokenizer, adapter):
    """A tiny Llama under a prefix-tuning (or cartridge) adapter of 3 virtual tokens whose fresh random K/V (larger
    than PEFT's initial ones) change its answers."""
    tuned = peft_model(tokenizer, adapter)
    with torch.no_grad():
        for parameter in tuned.prompt_encoder.parameters():
            parameter.normal_(0, 3)
    return tuned


def peft_sampled(model, tokenizer, prompt, index, config):
    """Prompt `index`'s answer sampled by generation's rule from the logits of PEFT's own forward (its prefix K/V
    passed at every call) over the whole sequence, no cache: the reference for a prefix-tuned model."""
    from fastalign.evaluation.generation import _next_tokens, _prompt_generators
    ids, out = tokenizer(prompt)["input_ids"], []
    generators = _prompt_generators(config.seed, index, 1)
    with torch.no_grad():
        for _ in range(config.max_new_tokens):
            token = int(_next_tokens(model(input_ids=torch.tensor([ids + out])).logits[:, -1], config, generators))
            if token == tokenizer.eos_token_id:
                break
            out.append(token)
    return tokenizer.decode(out, skip_special_tokens=True)


@pytest.mark.parametrize("adapter", ["PrefixTuningConfig", "CartridgeConfig"])
def test_a_prefix_tuned_peft_model_generates_peft_forwards_greedy_answers(world, tokenizer, adapter):
    """Prefix tuning (and a cartridge): PEFT's forward passes its K/V at every call, as the cache where the model's
    forward takes it under the name PEFT passes (transformers 5.17; peft 0.22 on transformers 5.24+), which replaced
    generation's cache at every step: such models were refused there. Generation runs the model under the adapter
    over a cache that starts with the K/V: a left-padded batch of prompts of different lengths answers what PEFT's
    forward answers over the whole sequence, and so does peft's generate, on every version."""
    prompts, tuned = prompts_of(world), prefix_tuned(tokenizer, adapter)
    answers = generate(tuned, tokenizer, prompts, GenerationConfig(max_new_tokens=6, batch_size=4))
    assert answers == [slow_greedy(tuned, tokenizer, p, 6) for p in prompts]
    assert answers != generate(tuned.get_base_model(), tokenizer, prompts, GenerationConfig(max_new_tokens=6))
    ids = tokenizer(prompts[0], return_tensors="pt")
    written = tuned.generate(**ids, max_new_tokens=6, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert answers[0] == tokenizer.decode(written, skip_special_tokens=True)


def test_a_prefix_tuned_peft_model_samples_as_peft_forward_with_the_seed(world, tokenizer):
    """Sampling a prefix-tuned model draws each prompt's answer from PEFT's forward's softmax, with its generator."""
    prompts, tuned = prompts_of(world)[:4], prefix_tuned(tokenizer, "PrefixTuningConfig")
    config = GenerationConfig(max_new_tokens=6, batch_size=4, do_sample=True, temperature=1.5, seed=7)
    assert generate(tuned, tokenizer, prompts, config) == \
        [peft_sampled(tuned, tokenizer, p, i, config) for i, p in enumerate(prompts)]


@pytest.mark.parametrize("adapter", ["PrefixTuningConfig", "PromptTuningConfig"])
def test_a_prompt_learning_adapter_under_disable_adapter_generates_the_base_models_answers(world, tokenizer, adapter):
    """Inside PEFT's disable_adapter(), PEFT's forward is the base model's: generation started its cache with the
    prefix's K/V all the same (the adapter's answers, silently), and refused prompt tuning, which no
    forward then runs. Both answer as the base model and PEFT's own forward do, and as the adapter once it is on."""
    prompts, tuned = prompts_of(world)[:4], prefix_tuned(tokenizer, adapter)
    config = GenerationConfig(max_new_tokens=6, batch_size=4)
    base = generate(tuned.get_base_model(), tokenizer, prompts, config)
    with tuned.disable_adapter():
        assert generate(tuned, tokenizer, prompts, config) == base
        assert [slow_greedy(tuned, tokenizer, p, 6) for p in prompts] == base
    assert [slow_greedy(tuned, tokenizer, p, 6) for p in prompts] != base


@pytest.mark.parametrize("adapter", ["PrefixTuningConfig", "CartridgeConfig"])
def test_a_kv_prefix_is_refused_for_rains_search_alone(tokenizer, adapter):
    """A prefix's (or a cartridge's) K/V, which PEFT's forward passes as the cache at every call, are refused by that
    reason where the decoding does not start its cache with them (RAIN's search), not by generation."""
    from fastalign.runtime.hf_cache_argument import refuse_prompt_adapter_over_a_cache
    tuned = peft_model(tokenizer, adapter)
    with pytest.raises(ValueError, match=rf"\({adapter}\) is a prompt-learning adapter whose K/V PEFT's forward "
                                         "passes as the KV cache at every call, which RAIN's search does not start"):
        refuse_prompt_adapter_over_a_cache(tuned, "RAIN's search", kv_prefix=False)
    refuse_prompt_adapter_over_a_cache(tuned, "generation")


def rwkv_model(tokenizer):
    """A tiny RWKV (no attention mask: its logits change with padding) whose logits tell contexts apart."""
    from transformers import RwkvConfig, RwkvForCausalLM
    torch.manual_seed(0)
    model = RwkvForCausalLM(RwkvConfig(hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                                       intermediate_size=64, context_length=128, vocab_size=len(tokenizer),
                                       eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
    return model


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
def test_rows_of_one_length_among_others_keep_their_places_and_generators(world, tokenizer, sample):
    """A model whose logits padding changes runs the rows of each token length in a batch of their own: each must
    keep its place and its own generator (prompt i's, as alone). The padding test's rows of one length were one
    prompt twice, so answers put in each other's places, or drawn with the batch's first generators, passed."""
    by_length = {}
    for qa in world.normal + world.harmful:
        prompt = spec_prompt(qa.question)
        by_length.setdefault(len(tokenizer(prompt)["input_ids"]), []).append(prompt)
    first, third = next(group for group in by_length.values() if len(set(group)) > 1)[:2]
    second = next(group for group in by_length.values() if first not in group)[0]
    prompts = [first, second, third]
    model = rwkv_model(tokenizer)
    config = dict(max_new_tokens=6, do_sample=sample, temperature=2.0, seed=3)
    batched = generations(model, tokenizer, prompts, GenerationConfig(batch_size=3, **config))
    alone = generations(model, tokenizer, prompts, GenerationConfig(batch_size=1, **config))
    assert [g.answer_ids for g in batched] == [g.answer_ids for g in alone]
    assert alone[0].answer_ids != alone[2].answer_ids


def test_no_padding_probe_where_no_batch_is_padded(world, tokenizer, monkeypatch):
    """The padding probe (two forwards) runs only where some batch is padded: batches of one length need none."""
    probes = []
    monkeypatch.setattr("fastalign.evaluation.generation.pads_exactly", lambda *args: probes.append(args) or False)
    model = rwkv_model(tokenizer)
    short, long = "### Question: Hi", spec_prompt(world.normal[0].question)
    generations(model, tokenizer, [short, short, long], GenerationConfig(max_new_tokens=2, batch_size=2))
    assert not probes
    generations(model, tokenizer, [short, long], GenerationConfig(max_new_tokens=2, batch_size=2))
    assert len(probes) == 1


def test_one_stop_string_or_one_that_is_no_text_is_refused(world, tokenizer, model):
    """GenerationConfig(stop_strings="Human:") was read as six one-character stop strings, every answer cut at its
    first 'H', 'u', 'm', ...; a stop string that is no text (None) failed inside generation, naming no setting. Both
    are refused naming stop_strings; an empty stop string, found in every text, stops no answer."""
    with pytest.raises(TypeError, match="stop_strings must be a list of strings, got a single string"):
        GenerationConfig(stop_strings="Human:")
    with pytest.raises(ValueError, match="stop_strings must hold strings, got None"):
        GenerationConfig(stop_strings=("Human:", None))
    prompts = prompts_of(world)[:2]
    assert generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=6, stop_strings=("",))) == \
        generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=6))
