"""The vanilla answer `fastalign rain` records beside RAIN's: greedy decoding of the ids RAIN reads, with RAIN's
length limits and end tokens, whatever the checkpoint's generation config."""
import pytest

import fastalign.rain as rain_package
from fastalign.evaluation.generation import GenerationConfig, encode_prompts, generations
from fastalign.evaluation.prompts import chat_prompt
from fastalign.rain import RainConfig
from fastalign.rain.vanilla import greedy_answer
from tests.evaluation.chat_model import QUESTION, SYSTEM, chat_tokenizer, rigged_chat_model

from .fake_model import HashLM
from .tiny import PROMPTS, SHORT_JUDGE, tiny_llama, tokenizer


@pytest.mark.parametrize("prefix, prompt", [("Human: Hi\nAssistant: Hello\n\n", "Human: How do I bake bread?"),
                                            ("Human: Hi\nAssistant: Hel", "lo\n\nHuman: How do I bake bread?")])
def test_vanilla_answer_reads_the_ids_rain_reads_after_the_generation_prefix(prefix, prompt):
    """The vanilla answer beside RAIN's conditions on the ids RAIN's search starts from, so that the two compare
    answers to one input: prefix + prompt as one text (RAIN read a SentencePiece "\u2581" between them, which the
    vanilla answer did not), and where the prefix's end merges with the prompt into other tokens, the prefix's own ids
    (which RAIN computes once for all prompts) then the prompt's."""
    from fastalign.prompt_tokens import tokenize_prompts
    from fastalign.rain.ledger import EMPTY_KEY
    from fastalign.rain.minimum import chain_key
    from tests.chat_families import family_tokenizer

    tok, prompt = family_tokenizer("mistral"), prompt + "\nAssistant:"
    model, read = HashLM(len(tok)), []
    model.generate = lambda ids, **kw: read.append(ids[0].tolist()) or ids
    assert greedy_answer(model, tok, prompt, 2, "Human:", generation_prefix=prefix) == ""
    run = rain_package.rain_generate(model, tok, [prompt], RainConfig(root_visits=2, max_new_tokens=2), engine="slow",
                                     judge_prompt=SHORT_JUDGE, embedding="hidden", generation_prefix=prefix)
    assert run.results[0].error is None and chain_key(EMPTY_KEY, read[0]) in run.ledger.fed_keys
    assert tok.decode(read[0]) == tok.decode(tokenize_prompts(tok, [prefix + prompt])[0])


def test_vanilla_answer_has_rains_length_limits(monkeypatch):
    """The vanilla answer stops where RAIN's does: within the model's context (a model with learned positions
    fails past it, which stopped the whole run, and a resumed run at the same prompt), and with
    --max-new-tokens 0 (no limit) at max_length tokens in all (generate refused 0 new tokens); a prompt that fills
    max_length answers "" without asking generate for 0 tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tokenizer()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=40, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).eval()
    prompt = "Human: How do I bake bread? " * 3 + "\nAssistant:"
    length = len(tok(prompt).input_ids)
    assert 30 < length < 40
    asked, cached, generate = [], [], model.generate

    def spy(ids, **kw):
        asked.append(kw["generation_config"].max_new_tokens)
        cached.append(kw["generation_config"].use_cache)
        return generate(ids, **kw)

    monkeypatch.setattr(model, "generate", spy)
    assert isinstance(greedy_answer(model, tok, prompt, 30, "Human:"), str)
    assert isinstance(greedy_answer(model, tok, prompt, 0, "Human:", max_length=length + 3), str)
    assert isinstance(greedy_answer(model, tok, prompt, 5, "Human:", max_length=length + 1), str)   # room for one
    assert isinstance(greedy_answer(model, tok, prompt, 2, "Human:"), str)   # --max-new-tokens within the room
    assert asked == [40 - length, 3, 1, 2] and all(cached)
    assert greedy_answer(model, tok, "Human: hi " * 20 + "\nAssistant:", 5, "Human:") == ""
    assert greedy_answer(model, tok, prompt, 5, "Human:", max_length=length) == ""   # no room: no generate call
    assert asked == [40 - length, 3, 1, 2]


@pytest.mark.parametrize("setting, value", [("num_beams", 4), ("repetition_penalty", 0.1), ("suppress_tokens", None),
                                            ("return_dict_in_generate", True), ("num_return_sequences", 2)])
def test_vanilla_answer_is_greedy_whatever_the_checkpoints_generation_config(setting, value):
    """The vanilla answer is greedy decoding, as `fastalign eval`'s: a checkpoint's generation config (num_beams,
    Qwen2.5-Instruct's repetition_penalty, suppress_tokens) made it another decoding, `fastalign eval --answers`
    then comparing RAIN with something else, and its return_dict_in_generate or num_return_sequences failed every
    prompt's record. The model keeps its generation config."""
    tok, model = tokenizer(), tiny_llama(1)
    plain = generations(model, tok, PROMPTS[:1], GenerationConfig(max_new_tokens=12))[0]
    checkpoint = model.generation_config
    setattr(checkpoint, setting, [plain.answer_ids[0]] if value is None else value)   # (suppressed: greedy's first)
    assert greedy_answer(model, tok, PROMPTS[0], 12, "Human:") == plain.text
    assert model.generation_config is checkpoint and getattr(checkpoint, setting) is not None


def test_vanilla_answer_of_a_chat_prompt_reads_one_bos_and_ends_at_the_end_of_turn(monkeypatch):
    """A chat-rendered prompt writes its BOS: the vanilla answer reads it once, as RAIN's search does, and ends
    at <|eot_id|>, where RAIN's answer ends, though the generation config lists only <|end_of_text|> (the first
    Llama-3-Instruct release); model.generate alone would run on into the next turn's text."""
    tok = chat_tokenizer()
    model, answer_ids = rigged_chat_model(tok)
    prompt = chat_prompt(tok, QUESTION, SYSTEM)
    fed, generate = [], model.generate
    monkeypatch.setattr(model, "generate", lambda ids, **kw: fed.append(ids[0].tolist()) or generate(ids, **kw))
    assert greedy_answer(model, tok, prompt, 6, "Human:") == tok.decode(answer_ids)
    assert fed == encode_prompts(tok, [prompt], 6, model) and fed[0].count(tok.bos_token_id) == 1


def test_greedy_answer_stops_at_an_mpt_models_max_seq_len(monkeypatch):
    """MPT names its context max_seq_len: the vanilla answer read max_position_embeddings alone and decoded past it
    ("The size of tensor a (161) must match the size of tensor b (160)"), failing every record of `fastalign rain`."""
    from transformers import MptConfig, MptForCausalLM

    tok, context = tokenizer(), 24
    model = MptForCausalLM(MptConfig(vocab_size=len(tok), d_model=32, n_heads=4, n_layers=1, max_seq_len=context))
    asked, generate = [], model.eval().generate

    def spy(ids, **kw):
        asked.append(kw["generation_config"].max_new_tokens)
        return generate(ids, **kw)

    monkeypatch.setattr(model, "generate", spy)
    assert isinstance(greedy_answer(model, tok, PROMPTS[0], 0, "Human:", 2048), str)
    assert asked == [context - len(tok(PROMPTS[0]).input_ids)]


def test_vanilla_answer_is_cut_before_a_new_turn():
    """The vanilla answer ends before the turn marker (the model writing the next user turn), as RAIN's does."""
    model, tok = tiny_llama(), tokenizer()
    whole = greedy_answer(model, tok, PROMPTS[0], 12, "")
    marker = whole[len(whole) // 2:][:2]
    assert marker.strip() and whole.index(marker) > 0
    assert greedy_answer(model, tok, PROMPTS[0], 12, marker) == whole[:whole.index(marker)]


def test_vanilla_answer_leaves_out_a_plain_end_token_as_eval_does():
    """A generation config that lists a token the tokenizer does not call special (added with add_tokens, an
    end-of-turn string a fine-tune lists): the vanilla answer stopped there but kept its text, which decoding with
    skip_special_tokens does not drop, while `fastalign eval` leaves it out: one greedy answer, two texts."""
    model, tok = tiny_llama(), tokenizer()
    ids = generations(model, tok, [PROMPTS[0]], GenerationConfig(max_new_tokens=5))[0].answer_ids
    end = ids[2]
    assert end not in tok.all_special_ids and end not in ids[:2]
    model.generation_config.eos_token_id = [tok.eos_token_id, end]
    evaluated = generations(model, tok, [PROMPTS[0]], GenerationConfig(max_new_tokens=5))[0]
    assert evaluated.answer_ids == ids[:3] and evaluated.text == tok.decode(ids[:2])
    assert greedy_answer(model, tok, PROMPTS[0], 5, "") == evaluated.text


def test_vanilla_answer_with_a_tokenizer_that_appends_eos_reads_the_prompt_without_it(monkeypatch):
    """A tokenizer configured with add_eos_token=True ends every encoding with EOS: the vanilla answer read the
    prompt with it, and went on after the end of the sequence."""
    from tests.tokenizer_variants import appending_eos

    model = tiny_llama()
    fed, generate = [], model.generate
    monkeypatch.setattr(model, "generate", lambda ids, **kw: fed.append(ids[0].tolist()) or generate(ids, **kw))
    answers = [greedy_answer(model, tok, PROMPTS[0], 4, "Human:") for tok in (tokenizer(), appending_eos(tokenizer()))]
    assert fed[1] == fed[0] == tokenizer()(PROMPTS[0])["input_ids"] and answers[1] == answers[0]


def test_vanilla_answer_stops_decoding_at_the_token_that_opens_a_new_turn():
    """The vanilla answer stops at the token whose text completes the turn marker, as RAIN's answer does: cut only
    afterwards, it decoded on to max_new_tokens (256 forwards where a reply and its new turn took 11), for the
    same text."""
    model, tok = tiny_llama(5), tokenizer()
    whole = greedy_answer(model, tok, PROMPTS[1], 40, "")
    answer_ids = generations(model, tok, PROMPTS[1:2], GenerationConfig(max_new_tokens=40))[0].answer_ids
    marker = whole[len(whole) // 3:][:3]
    assert marker.strip() and whole.index(marker) > 0 and len(answer_ids) == 40
    opened = next(n for n in range(1, 41) if marker in tok.decode(answer_ids[:n], skip_special_tokens=True))
    assert opened < 30
    forwards = []
    model.register_forward_hook(lambda *a: forwards.append(1))
    assert greedy_answer(model, tok, PROMPTS[1], 40, marker) == whole[:whole.index(marker)]
    assert len(forwards) == opened
