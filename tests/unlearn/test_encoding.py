"""Templates, answer spans from tokenizer offsets, and answer-target masks of padded batches."""
import copy
import re

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from fastalign.data_files import DataError
from fastalign.model_vocabulary import pad_id
from fastalign.prompt_templates import SPEC_TEMPLATE, ChatTemplate, TextTemplate, end_of_turn_id
from fastalign.prompt_tokens import tokenize_texts
from fastalign.unlearn import encoding
from fastalign.unlearn.batching import collate
from fastalign.unlearn.encoding import EncodedExample, PoolAnswer, encode_answers, encode_pairs
from fastalign.unlearn.records import QAPair
from fastalign.unlearn.streams import UnlearningStreams
from tests.byte_bpe import LLAMA3_SPLIT, train_byte_bpe
from tests.chat_families import FAMILIES, family_tokenizer
from tests.unlearn.test_streams import assert_pool_reading_matches_the_rows
from tests.unlearn.tiny import CHAT_TEMPLATE, byte_bpe_tokenizer, word_level_tokenizer

TRICKY = [
    ("What is the capital?", "Paris"),
    ("What is the capital?", " Paris, with a leading space"),
    ("How?", "日本語のテキスト"),                      # multi-byte characters split over byte tokens
    ("Why {answer} and {prompt}?", "café 🙂 naïve"),  # braces in the prompt, emoji
    ("What is harmful?", "harmful"),                # the answer text also occurs in the prompt
]
TOKENIZERS = {"byte_bpe": byte_bpe_tokenizer, "word_level": word_level_tokenizer}


def pairs(items):
    return [QAPair(p, a, f"test:row {i}") for i, (p, a) in enumerate(items, start=1)]


def check_span(tokenizer, rendered, example):
    """Tokens before the span end at or before the answer, tokens after it start at or after its end, every
    token of the span overlaps the answer, and the span's tokens cover every non-space answer character."""
    enc = tokenize_texts(tokenizer, [rendered.text], return_offsets_mapping=True)
    assert tuple(enc["input_ids"][0]) == example.input_ids
    offsets = enc["offset_mapping"][0]
    assert all(b <= rendered.answer_start or a == b for a, b in offsets[:example.answer_start])
    assert all(a >= rendered.answer_end or a == b for a, b in offsets[example.answer_end:])
    assert all(a < rendered.answer_end and b > rendered.answer_start or a == b
               for a, b in offsets[example.answer_start:example.answer_end])
    covered = set()
    for a, b in offsets[example.answer_start:example.answer_end]:
        covered.update(range(a, b))
    answer_chars = {i for i in range(rendered.answer_start, rendered.answer_end) if not rendered.text[i].isspace()}
    assert answer_chars <= covered


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("template", [SPEC_TEMPLATE, "Q: {prompt} A:{answer}<end>"])
def test_answer_span_on_tricky_boundaries(name, template):
    tokenizer, text_template = TOKENIZERS[name](), TextTemplate(template)
    examples = encode_pairs(tokenizer, text_template, pairs(TRICKY), max_length=512)
    for (prompt, answer), example in zip(TRICKY, examples):
        rendered = text_template.render(prompt, answer)
        assert rendered.text[rendered.answer_start:rendered.answer_end] == answer
        check_span(tokenizer, rendered, example)
        assert example.num_answer_targets >= 1


def test_chat_template_span_is_in_the_assistant_turn():
    tokenizer = byte_bpe_tokenizer()
    template = ChatTemplate(tokenizer)
    items = [("harmful", "harmful"), ("How?", "  日本語 answer  ")]  # the template trims contents
    for (prompt, answer), example in zip(items, encode_pairs(tokenizer, template, pairs(items), max_length=512)):
        rendered = template.render(prompt, answer)
        assert rendered.text.index("<|assistant|>") < rendered.answer_start
        assert rendered.text[rendered.answer_start:rendered.answer_end] == answer.strip()
        assert rendered.text[rendered.answer_end:] == "</s>"
        check_span(tokenizer, rendered, example)
    with pytest.raises(ValueError, match="has no chat template"):
        ChatTemplate(word_level_tokenizer())


def test_text_template_keeps_the_tokenizers_bos():
    tokenizer = byte_bpe_tokenizer()
    example, = encode_pairs(tokenizer, TextTemplate(), pairs(TRICKY[:1]), max_length=64)
    assert example.input_ids[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("where", ["prompt", "answer's middle", "answer's end", "answer's start"])
def test_text_template_rows_that_hold_a_special_tokens_text_are_named(where):
    """The text template renders a prompt or answer as written, and the tokenizer reads "</s>" in it as its EOS: in
    the middle of an answer an EOS target the loss trains, at an answer's ends a token the answer mask leaves out.
    Such a row, or pool answer, is a DataError naming it and the token, as with a chat template."""
    tokenizer, template = byte_bpe_tokenizer(), TextTemplate()
    eos = tokenizer.eos_token
    prompt, answer = {"prompt": (f"Why{eos} now?", "Paris"), "answer's middle": ("Why?", f"Paris.{eos}Rome."),
                      "answer's end": ("Why?", f"Paris.{eos}"), "answer's start": ("Why?", f"{eos}Paris")}[where]
    name = where.split("'")[0]
    with pytest.raises(DataError, match=rf"test:row 2: the {name} holds '{eos}', the text of a special token"):
        encode_pairs(tokenizer, template, pairs([TRICKY[0], (prompt, answer)]), 128)
    if name == "answer":
        with pytest.raises(DataError, match=rf"mismatch pool answer 1: the answer holds '{eos}'"):
            encode_answers(tokenizer, template, ["Paris", answer])
    assert len(encode_pairs(tokenizer, template, pairs([TRICKY[0], ("Why </s >?", "<s >Paris</ s>")]), 128)) == 2


def test_chat_template_whose_conversation_does_not_start_with_the_user_turn_is_refused():
    """A conversation that does not extend the rendered user turn (here: a system line put before it) leaves the
    answer's place unknown; searching past len(user turn) would land inside 'Assistant'."""
    class SystemFirst:
        chat_template = "stub"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt=False):
            text = "".join(f"{m['role'].title()}: {m['content']}\n" for m in messages)
            return text + "Assistant:" if add_generation_prompt else "System: be nice\n" + text
    with pytest.raises(ValueError, match="does not contain the answer verbatim"):
        ChatTemplate(SystemFirst()).render("q", "a")


@pytest.mark.parametrize("chat", [False, True])
def test_encoding_in_chunks_matches_one_batched_call(monkeypatch, chat):
    """Tokenizing a data set in chunks of ENCODE_CHUNK texts (bounded memory) gives each row exactly the ids,
    spans, seams and source of one call over them all, rows left out by skip_too_long included."""
    tokenizer = byte_bpe_tokenizer()
    template = ChatTemplate(tokenizer) if chat else TextTemplate()
    items = pairs(TRICKY + [("a very long prompt " * 20, "x")] + TRICKY[::-1])
    whole = encode_pairs(tokenizer, template, items, 40, skip_too_long=True, answer_eos=True)
    answers = encode_answers(tokenizer, template, [a for _, a in TRICKY] * 2)
    monkeypatch.setattr(encoding, "ENCODE_CHUNK", 3)
    chunked = encode_pairs(tokenizer, template, items, 40, skip_too_long=True, answer_eos=True)
    assert chunked == whole and len(whole) > 3 and "test:row 6" not in [e.source for e in whole]
    assert encode_answers(tokenizer, template, [a for _, a in TRICKY] * 2) == answers


def test_template_validation():
    for bad in ["{prompt} only", "{answer} {prompt}", "{prompt}{answer}{answer}"]:
        with pytest.raises(ValueError, match="template must"):
            TextTemplate(bad)


def test_text_template_renders_every_part_of_the_template():
    """The text around both placeholders is kept, the tail after the answer too (a model trained without it would not
    write it), and the answer span and the template's whitespace before it are where the template puts them."""
    rendered = TextTemplate("Q: {prompt}\n  A:\t\t{answer}<end>\n").render("a {b}", "c d")
    assert rendered.text == "Q: a {b}\n  A:\t\tc d<end>\n"
    assert (rendered.space_start, rendered.answer_start, rendered.answer_end) == (13, 15, 18)
    assert rendered.text[rendered.answer_start:rendered.answer_end] == "c d"
    spec = TextTemplate().render("x", "y")
    assert (spec.text, spec.space_start, spec.answer_start) == ("### Question: x\n ### Answer: y", 28, 29)


def test_prompt_longer_than_context_names_the_row():
    tokenizer = byte_bpe_tokenizer()
    items = [("short", "an answer that is long enough to be cut"), ("a very long prompt " * 20, "x")]
    cut, = encode_pairs(tokenizer, TextTemplate(), pairs(items[:1]), max_length=20)
    assert len(cut.input_ids) == 20 and cut.answer_end == 20 and cut.num_answer_targets >= 1
    with pytest.raises(DataError, match=r"test:row 2: the prompt takes \d+ tokens.*max_length=40"):
        encode_pairs(tokenizer, TextTemplate(), pairs(items), max_length=40)
    kept = encode_pairs(tokenizer, TextTemplate(), pairs(items), max_length=40, skip_too_long=True)
    assert [e.source for e in kept] == ["test:row 1"] and kept[0].num_answer_targets >= 1


def test_prompt_that_fills_max_length_leaves_no_answer():
    example = EncodedExample(tuple(range(6)), 4, 6, "test:row 1")
    assert not example.fits(4) and example.fits(5)
    assert example.truncated(5) == EncodedExample((0, 1, 2, 3, 4), 4, 5, "test:row 1", answer_cut=True)
    tail = EncodedExample(tuple(range(8)), 4, 6, "test:row 2")  # max_length cuts the template's tail only
    assert tail.truncated(7) == EncodedExample(tuple(range(7)), 4, 6, "test:row 2") and not tail.truncated(6).answer_cut
    assert tail.truncated(5).answer_cut and tail.truncated(5).truncated(5).answer_cut
    with pytest.raises(DataError, match=r"test:row 1: the prompt takes 4 tokens.*max_length=4"):
        example.truncated(4)


def test_max_length_below_two_is_refused():
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        encode_pairs(byte_bpe_tokenizer(), TextTemplate(), pairs(TRICKY[:1]), max_length=1)


def test_answer_at_position_zero_is_never_a_target():
    """Token 0 is predicted by no position: an answer starting there has one target fewer."""
    example = EncodedExample((5, 6, 7), 0, 2, "s")
    assert example.num_answer_targets == 1
    assert collate([example], filler_id=0).target_mask.tolist() == [[True, False]]


def test_an_answer_of_one_token_at_position_zero_leaves_nothing_to_predict():
    """Its only token is predicted by no position: the example does not fit any max_length (a row with no target
    would be kept, silently training nothing), and truncating it is the DataError naming it."""
    example = EncodedExample((5, 6, 7), 0, 1, "test:row 1")
    assert example.num_answer_targets == 0 and not example.fits(2) and not example.fits(3)
    with pytest.raises(DataError, match="test:row 1: the prompt takes 0 tokens"):
        example.truncated(3)
    assert EncodedExample((5, 6, 7), 0, 2, "s").fits(2)


def test_an_answer_that_produces_no_token_names_its_row():
    """A tokenizer that drops whitespace leaves a blank answer no token: a DataError naming the row or pool answer,
    not an IndexError from the empty span."""
    tokenizer = word_level_tokenizer()
    with pytest.raises(DataError, match="test:row 2: the answer produced no token"):
        encode_pairs(tokenizer, TextTemplate(), pairs([("What is harmful?", "harmful"), ("What?", "  ")]), 64)
    with pytest.raises(DataError, match="mismatch pool answer 1: the answer produced no token"):
        encode_answers(tokenizer, TextTemplate(), ["harmful", "\t"])
    with pytest.raises(TypeError, match="answers must be a list of strings, got a single string"):
        encode_answers(tokenizer, TextTemplate(), "harmful")   # each character was a pool answer


def test_pool_answer_ids_are_the_answers_tokens_without_the_templates_tail():
    """A pool answer's ids hold the template's tail after the answer ('<end>'); answer_ids are the answer's alone."""
    tokenizer = byte_bpe_tokenizer()
    pool, = encode_answers(tokenizer, TextTemplate("Q: {prompt} A:{answer}<end>"), ["Paris"])
    assert tokenizer.decode(pool.answer_ids) == "Paris" and tokenizer.decode(pool.ids).endswith("Paris<end>")


def test_plain_pool_answer_ids_follow_the_prompts_own_tokens_and_a_lead_keeps_the_templates_whitespace():
    """Plain ids (no seams) are put right after the prompt's own tokens (prompt_end), the template's whitespace left
    out; a hand-built answer that starts with the whitespace's tokens says so with lead, and trains the rest."""
    tokenizer = byte_bpe_tokenizer()
    forget, = encode_pairs(tokenizer, TextTemplate("{prompt}\n\n{answer}"), pairs([("How?", "Paris")]), 64)
    rome, blank = (tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in ("Rome", "\n\n"))
    bare, led = (forget.with_answer(answer, "s") for answer in (PoolAnswer(rome), PoolAnswer(blank + rome, len(blank))))
    assert tokenizer.decode(bare.input_ids) == "<s>How?Rome" and tokenizer.decode(led.input_ids) == "<s>How?\n\nRome"
    assert bare.input_ids[bare.answer_start:bare.answer_end] == led.input_ids[led.answer_start:led.answer_end] == rome


def test_slow_tokenizer_is_refused():
    """A pure-Python tokenizer (models with custom tokenizer code) has no character offsets to find answers by."""
    from tests.tokenizer_variants import SlowTokenizer

    fast = byte_bpe_tokenizer()
    slow = SlowTokenizer(fast.backend_tokenizer, bos_token=fast.bos_token, eos_token=fast.eos_token)
    slow.chat_template = CHAT_TEMPLATE
    for template in (TextTemplate(), ChatTemplate(slow)):
        with pytest.raises(TypeError, match="need a fast tokenizer .* got SlowTokenizer"):
            encode_pairs(slow, template, pairs(TRICKY[:1]), max_length=64)
        with pytest.raises(TypeError, match="need a fast tokenizer .* got SlowTokenizer"):
            encode_answers(slow, template, ["Paris"])


@pytest.mark.parametrize("with_pad,answer_eos", [(False, False), (True, False), (False, True)])
def test_collate_pads_to_longest_and_aligns_target_mask(with_pad, answer_eos):
    """Padding is known by position, never by id: without a pad token the filler is EOS, which answers
    ending in EOS also hold as a real token."""
    tokenizer = byte_bpe_tokenizer(with_pad)
    examples = encode_pairs(tokenizer, TextTemplate(), pairs(TRICKY), max_length=512, answer_eos=answer_eos)
    filler = pad_id(tokenizer)
    assert filler == (tokenizer.pad_token_id if with_pad else tokenizer.eos_token_id)
    assert all(filler in e.input_ids for e in examples) == answer_eos
    batch = collate(examples, filler)
    width = max(len(e.input_ids) for e in examples)
    assert batch.input_ids.shape == (len(examples), width) and batch.target_mask.shape == (len(examples), width - 1)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        assert batch.input_ids[row, :n].tolist() == list(e.input_ids)
        assert (batch.input_ids[row, n:] == filler).all()
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (width - n)
        expected = [e.answer_start <= t + 1 < e.answer_end for t in range(width - 1)]
        assert batch.target_mask[row].tolist() == expected
        assert int(batch.target_mask[row].sum()) == e.num_answer_targets
    assert batch.num_tokens == sum(len(e.input_ids) for e in examples)


def test_filler_is_zero_without_pad_or_eos():
    assert pad_id(word_level_tokenizer()) == 0


def test_rows_slices_every_tensor_of_a_batch():
    batch = collate([EncodedExample((1, 2, 3), 1, 3, "a"), EncodedExample((4, 5), 1, 2, "b"),
                     EncodedExample((6, 7, 8), 2, 3, "c")], filler_id=0)
    middle = batch.rows(1, 2)
    for part, whole in zip((middle.input_ids, middle.attention_mask, middle.target_mask),
                           (batch.input_ids, batch.attention_mask, batch.target_mask)):
        assert torch.equal(part, whole[1:2])


def test_mismatch_ids_match_direct_tokenization():
    """prompt ids + pool answer ids == the ids of the rendered (prompt, pool answer) text, for a tokenizer
    whose merges never cross the template's trailing space."""
    tokenizer, template = byte_bpe_tokenizer(), TextTemplate()
    forget = encode_pairs(tokenizer, template, pairs([("How do I hurt someone?", "Like this.")]), 512)[0]
    answers = ["Paris is the capital", "naïve 日本"]
    for answer, ids in zip(answers, encode_answers(tokenizer, template, answers)):
        mixed = forget.with_answer(ids, "mixed")
        direct = encode_pairs(tokenizer, template, pairs([("How do I hurt someone?", answer)]), 512)[0]
        assert mixed.input_ids == direct.input_ids
        assert (mixed.answer_start, mixed.answer_end) == (direct.answer_start, direct.answer_end)
    assert torch.equal(torch.tensor(mixed.input_ids[:mixed.answer_start]),
                       torch.tensor(forget.input_ids[:forget.answer_start]))


@pytest.mark.parametrize("answer_eos", [False, True])
@pytest.mark.parametrize("chat", [False, True])
def test_mismatch_rows_are_the_rendered_pairs_whatever_the_answers_first_token(chat, answer_eos):
    """Llama-3's tokenizer keeps a digit apart from the space before it and glues a letter to it: a forget answer
    and a pool answer of different kinds met with that space lost or doubled when the pool answer's ids replaced
    the forget answer's from the first answer token. They now meet at the seam: every combination is the
    template's own rendering of the pair, ids and answer span."""
    answers = ["Sure, here you go.", "1. Get a knife.", "10% of men", "Paris is the capital", "(a) a list", "\nNo."]
    corpus = [f"### Question: How?\n ### Answer: {a}" for a in answers]   # merges " Sure", " Paris", ...
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_byte_bpe(corpus, 400, split=LLAMA3_SPLIT),
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    template = ChatTemplate(tokenizer) if chat else TextTemplate()
    pool = encode_answers(tokenizer, template, answers, answer_eos=answer_eos)
    for harmful in answers:
        forget, = encode_pairs(tokenizer, template, pairs([("How?", harmful)]), 512, answer_eos=answer_eos)
        for answer, pool_answer in zip(answers, pool):
            mixed = forget.with_answer(pool_answer, "mixed")
            direct, = encode_pairs(tokenizer, template, pairs([("How?", answer)]), 512, answer_eos=answer_eos)
            assert (mixed.input_ids, mixed.answer_start, mixed.answer_end) == \
                (direct.input_ids, direct.answer_start, direct.answer_end), (harmful, answer)


def test_template_that_writes_the_bos_token_keeps_a_single_bos():
    """A template in a model's own prompt format ('<s>[INST] ...') already holds the BOS the tokenizer adds."""
    tokenizer = byte_bpe_tokenizer()
    plain, = encode_pairs(tokenizer, TextTemplate("[INST] {prompt} [/INST] {answer}"), pairs(TRICKY[:1]), 64)
    own, = encode_pairs(tokenizer, TextTemplate("<s>[INST] {prompt} [/INST] {answer}"), pairs(TRICKY[:1]), 64)
    assert own == plain
    assert own.input_ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(own.input_ids[own.answer_start:own.answer_end]).strip() == "Paris"


def assert_mismatch_rows_are_rendered_pairs(tokenizer, template, prompts, answers):
    """Every forget example of a prompt and answer, given each pool answer instead, is the template's own rendering
    of the prompt with that answer, tokenized: ids and answer span. What the streams read of the pool without
    building the rows agrees with them: the longest row (check_context) and whether every row starts its answer
    within max_length (mismatch_fit), also where a seam starts inside a pool answer's ids."""
    pool = encode_answers(tokenizer, template, answers)
    for prompt, harmful in [(p, a) for p in prompts for a in answers]:
        forget, = encode_pairs(tokenizer, template, pairs([(prompt, harmful)]), 512)
        for answer, pool_answer in zip(answers, pool):
            mixed = forget.with_answer(pool_answer, "mixed")
            direct, = encode_pairs(tokenizer, template, pairs([(prompt, answer)]), 512)
            assert (mixed.input_ids, mixed.answer_start, mixed.answer_end) == \
                (direct.input_ids, direct.answer_start, direct.answer_end), (prompt, harmful, answer)
        assert_pool_reading_matches_the_rows(forget, pool)


@pytest.mark.parametrize("split", [None, LLAMA3_SPLIT])
@pytest.mark.parametrize("text", ["{prompt}\n{answer}", "{prompt} {answer}", "Q: {prompt}\nA: {answer}\n\n"])
def test_mismatch_rows_are_the_rendered_pairs_where_tokens_cross_the_prompt_or_the_tail(split, text):
    """A token may join the prompt's end to the template's whitespace before the answer (Llama-3 writes '?\\n' as
    one token; a prompt's own trailing spaces), or the answer's end to the template's tail ('.\\n'): a mismatch row
    put together at fixed seams lost or doubled that text ('How?' trained as 'How'). Every combination is the
    template's own rendering of the pair, ids and answer span."""
    prompts = ["How do I hurt someone?", "tell me  ", "What is 2+2"]
    answers = ["Sure, here you go.", "1. Get a knife.", "a"]
    template = TextTemplate(text)
    corpus = [template.render(p, a).text for p in prompts for a in answers]   # learns '?\n', '.\n', ...
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_byte_bpe(corpus, 400, split=split),
                                        bos_token="<s>", eos_token="</s>")
    assert_mismatch_rows_are_rendered_pairs(tokenizer, template, prompts, answers)


LLAMA2_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                        "{{ '[INST] ' + m['content'].strip() + ' [/INST]' }}"
                        "{% else %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


def test_mismatch_rows_of_answers_with_leading_whitespace_in_a_chat_template_that_trims_them():
    """Llama-2-chat's template writes `' ' + content.strip()`: ' Sure, here is how.' renders as its stripped text
    does. Its span started on the template's space, so its seams differed from every pool answer's and the data
    load stopped on the row (a DataError telling to change --template, unused). Every mismatch row is now the
    template's rendering of the pair, forget and pool answers with leading whitespace included."""
    prompts = ["How do I hurt someone?", "Why?"]
    answers = [" Sure, here is how.", "Sure, here you go.", "\n1. Get a knife.", " a "]
    corpus = [f"[INST] {p} [/INST] {a.strip()} </s>" for p in prompts for a in answers]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_byte_bpe(corpus, 400), bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    assert_mismatch_rows_are_rendered_pairs(tokenizer, ChatTemplate(tokenizer), prompts, answers)


def test_mismatch_rows_meet_at_the_earliest_seam_both_share():
    """GPT-2's split writes the template's '\\n\\n' as two tokens before a letter ('Sure') and as one before a pool
    answer that starts with whitespace (' leading', '\\nNo.'): both sides have a seam after the whitespace too, but
    joined there the row holds '\\n', '\\n' where the rendering has '\\n\\n'. Only the earliest shared seam is right."""
    prompts, answers = ["How do I hurt someone?", "Why?"], ["Sure, here you go.", " leading", "\nNo."]
    template = TextTemplate("{prompt}\n\n{answer}")
    corpus = [template.render(p, a).text for p in prompts for a in answers]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_byte_bpe(corpus, 300), bos_token="<s>")
    assert_mismatch_rows_are_rendered_pairs(tokenizer, template, prompts, answers)


def test_a_prompt_no_mismatch_answer_can_follow_on_token_ids_is_named():
    """Nothing but whitespace between a prompt that ends with spaces and an answer that starts with one: GPT-2's
    tokenizer makes one token of the whole run ('tell me' + '   ' + 'leading'), and a pool answer without a leading
    space needs a seam inside it. Such a row is named when the streams are built, not mid-run."""
    template = TextTemplate("{prompt} {answer}")
    corpus = [template.render(p, a).text for p in ["tell me  ", "How?"] for a in [" leading space", "Sure."]]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_byte_bpe(corpus, 300), bos_token="<s>")
    forget = encode_pairs(tokenizer, template, pairs([("How?", "Sure."), ("tell me  ", " leading space")]), 64)
    pool = encode_answers(tokenizer, template, ["Sure."])
    with pytest.raises(DataError, match=r"test:row 2: the tokenizer joins the text before the answer to the "
                                        r"template's whitespace before it .*set mismatch_weight=0 .*, or, with the "
                                        r"text template \(--template, not a chat template\), put text between"):
        UnlearningStreams(forget, mismatch_pool=pool, max_length=64)
    UnlearningStreams(forget[:1], mismatch_pool=pool, max_length=64)


def sentencepiece_style_tokenizer(corpus, legacy: bool) -> PreTrainedTokenizerFast:
    """A Llama-2 style tokenizer: spaces as '▁', a '▁' put before the text (legacy: a normalizer, as Llama-2's
    tokenizer.json has it; else Metaspace's prepend_scheme='first'), BPE with byte fallback, BOS added."""
    tok = Tokenizer(models.BPE(byte_fallback=True))
    if legacy:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(list(corpus) * 4, trainers.BpeTrainer(vocab_size=320, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("legacy, text", [(True, "{prompt}\n{answer}"), (False, "{prompt}{answer}")])
def test_mismatch_rows_are_the_rendered_pairs_with_a_tokenizer_that_marks_the_texts_start(legacy, text):
    """Llama-2's tokenizer puts a '▁' before the start of a text: pool answers tokenized after an empty prompt had
    it at the seam, where a prompt never puts it, so every mismatch row of a template with nothing but whitespace
    between prompt and answer held a token too many ('?', '▁', '\\n' for '?', '\\n')."""
    prompts, answers = ["How do I hurt someone?", "tell me"], ["Sure, here you go.", "Paris is the capital"]
    template = TextTemplate(text)
    tokenizer = sentencepiece_style_tokenizer([template.render(p, a).text for p in prompts for a in answers], legacy)
    assert_mismatch_rows_are_rendered_pairs(tokenizer, template, prompts, answers)


KNOWN_WRONG_JOINS = ("mismatch rows joined on token ids at a seam read from each side's own rendering; known wrong "
                     "where the tokenizer merges across the template's whitespace depending on both sides")


@pytest.mark.xfail(strict=True, reason=KNOWN_WRONG_JOINS)
def test_mismatch_rows_where_the_answers_first_character_retokenizes_the_prompts_trailing_spaces():
    """GPT-2's split keeps the last space of a whitespace run for the word after it ('\\s+(?!\\S)'): 'tell me  \\n'
    before a letter is '  ', '\\n', before a space '  \\n', ' leading'. The seam read from the forget example (answer
    'Sure.') is not a token boundary of the prompt with the pool answer ' leading'."""
    prompts, answers = ["tell me  "], ["Sure.", " leading"]
    template = TextTemplate("{prompt}\n{answer}")
    corpus = [template.render(p, a).text for p in prompts for a in answers]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_byte_bpe(corpus, 300), bos_token="<s>")
    assert_mismatch_rows_are_rendered_pairs(tokenizer, template, prompts, answers)


def test_chat_mismatch_rows_where_the_template_writes_a_space_before_the_answer():
    """A Llama-2-style chat template writes ' ' between '[/INST]' and the answer, which the byte-level BPE glues to the
    answer's first word (' Paris'): the space belongs to the template (space_start), so the mismatch rows meet before
    it. Located at the answer itself, no seam was left and every row was refused."""
    tokenizer = copy.deepcopy(byte_bpe_tokenizer())
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                               "{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}")
    template = ChatTemplate(tokenizer)
    rendered = template.render("How?", "Paris")
    assert rendered.text[rendered.space_start:rendered.answer_start] == " "
    assert_mismatch_rows_are_rendered_pairs(tokenizer, template, ["How?"], ["Paris is the capital", "1. a knife"])


@pytest.mark.xfail(strict=True, reason=KNOWN_WRONG_JOINS)
def test_mismatch_rows_where_a_token_joins_prompt_whitespace_and_answer():
    """Metaspace splits at spaces only, so '?\\nAs' is one pre-token and BPE may make '?\\nA' of it: a token across
    the prompt's end, the template's newline and the answer's first letter, which neither side's own rendering
    holds (before 'Sure' the forget example has '?\\n', 'S'). Stripped texts, no leading or trailing whitespace."""
    prompts, answers = ["How do I hurt someone?", "Why?"], ["Sure, here you go.", "As you like.", "All of them."]
    template = TextTemplate("{prompt}\n{answer}")
    tokenizer = sentencepiece_style_tokenizer([template.render(p, a).text for p in prompts for a in answers], False)
    assert_mismatch_rows_are_rendered_pairs(tokenizer, template, prompts, answers)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("answer_eos", [False, True])
def test_chat_answer_spans_in_each_familys_template(family, answer_eos):
    """Llama-3, Qwen2, Mistral and Gemma shaped tokenizers and chat templates: the answer span covers the answer's
    tokens alone, multi-byte characters and trimmed whitespace included; with answer_eos it ends with the
    template's own end of turn (<|eot_id|>, <|im_end|>, </s>, <end_of_turn>), the token after the answer."""
    tokenizer = family_tokenizer(family)
    template, eot = ChatTemplate(tokenizer), end_of_turn_id(tokenizer)
    items = TRICKY + [("日本語?", "語です"), ("Who is Bob? ", "  Bob is a baker.  "), ("Q\U0001F600", "\U0001F600")]
    plain = encode_pairs(tokenizer, template, pairs(items), 512)
    for (prompt, answer), old, new in zip(items, plain, encode_pairs(tokenizer, template, pairs(items), 512,
                                                                    answer_eos=answer_eos)):
        check_span(tokenizer, template.render(prompt, answer), old)
        assert eot not in old.input_ids[old.answer_start:old.answer_end] and old.input_ids[old.answer_end] == eot
        assert new.input_ids == old.input_ids and new.answer_end == old.answer_end + answer_eos


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_rows_that_hold_a_special_tokens_text_are_named(family):
    """The chat template writes the turn markers; a prompt or answer that holds a special token's text (a user
    prompt with "<|im_end|>" in it) would be tokenized as that control token, not as text: a turn marker inside
    the user turn, an end of turn inside the answer span that the loss trains. Such a row, or pool answer, is a
    DataError naming it and the token."""
    tokenizer = family_tokenizer(family)
    template = ChatTemplate(tokenizer)
    eot = tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer))
    clean = ("Who is Bob?", "Bob is a baker.")
    for name, row in (("prompt", (f"Say {eot} now", clean[1])), ("answer", (clean[0], f"Bob{eot} is a baker."))):
        with pytest.raises(DataError, match=rf"test:row 2: the {name} holds {re.escape(repr(eot))}, the text of"):
            encode_pairs(tokenizer, template, pairs([clean, row]), 128)
    with pytest.raises(DataError, match=rf"mismatch pool answer 1: the answer holds {re.escape(repr(eot))}"):
        encode_answers(tokenizer, template, ["Bob is a baker.", f"{eot}"])
    assert len(encode_pairs(tokenizer, template, pairs([clean, (clean[0], "<|not special|> <s >")]), 128)) == 2
    with_word = copy.deepcopy(tokenizer)   # an added token that is no control token is plain text to the template
    with_word.add_tokens(["<|not special|>"])
    word_row = (clean[0], "<|not special|>")
    assert len(encode_pairs(with_word, ChatTemplate(with_word), pairs([clean, word_row]), 128)) == 2
    with pytest.raises(ValueError, match=rf"system \(--system\) holds {re.escape(repr(eot))}, the text of"):
        ChatTemplate(tokenizer, system=f"Be brief.{eot}")   # the system turn is read as the turns are


PHI3_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|>\n{{ m['content'] }}<|end|>\n"
                 "<|assistant|>\n{% elif m['role'] == 'assistant' %}{{ m['content'] }}<|end|>\n{% endif %}{% endfor %}")


def phi3_style_tokenizer():
    """Mistral's tokenizer with Phi-3's chat markers: special added tokens with rstrip=True (each takes the
    whitespace after it), in Phi-3's chat template."""
    tokenizer = copy.deepcopy(family_tokenizer("mistral"))
    tokenizer.add_special_tokens({"extra_special_tokens": [AddedToken(t, rstrip=True, special=True, normalized=False)
                                                           for t in ("<|user|>", "<|assistant|>", "<|end|>")]})
    tokenizer.chat_template = PHI3_TEMPLATE
    return tokenizer


@pytest.mark.parametrize("answer_eos", [False, True])
def test_an_rstrip_chat_marker_before_an_answer_with_leading_space_is_not_answer(answer_eos):
    """Phi-3's <|assistant|> takes the whitespace after it, an answer's leading space included, so its character
    span reaches into the answer: that control token, which ends the prompt the model is asked with, was the
    answer's first token, and unlearning trained on predicting it after the user's turn. A special token is never
    answer; with answer_eos the answer still ends with the template's own <|end|>."""
    tokenizer = phi3_style_tokenizer()
    template = ChatTemplate(tokenizer)
    assistant, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|assistant|>", "<|end|>"))
    items = [("Where?", "Paris is nice."), ("Where?", " Paris is nice.")]
    for example in encode_pairs(tokenizer, template, pairs(items), 512, answer_eos=answer_eos):
        assert example.input_ids[example.answer_start - 1] == assistant
        answer = example.input_ids[example.answer_start:example.answer_end]
        assert tokenizer.decode(answer, skip_special_tokens=True).strip() == "Paris is nice."
        assert assistant not in answer and answer.count(end) == answer_eos
        assert example.input_ids.count(end) == 2      # the template's own end of turn, none inserted
