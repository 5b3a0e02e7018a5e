"""The self-evaluation prompt: option label ids found from the tokenizer, clear errors for prompts and
labels it cannot use, chat templates, and the score mapping."""
import copy
import dataclasses
import re

import pytest
import torch

from fastalign.rain import JudgePrompt, JudgeTokens, RainConfig
from fastalign.rain.generate import rain_generate
from fastalign.rain.jobs import PromptContext
from tests.byte_bpe import LLAMA3_SPLIT, train_byte_bpe

from .tiny import CORPUS, PROMPTS, SHORT_JUDGE, tiny_llama, tokenizer, with_special_tokens


def test_pieces_and_label_ids_come_from_the_tokenizer():
    tok = tokenizer()
    judge = JudgeTokens(tok, SHORT_JUDGE)
    conversation = "Human: hi\nAssistant: sure"
    for order, harmless_first in ((0, True), (1, False)):
        full = tok(SHORT_JUDGE.template.replace("{conversation}", "X").split("X")[0])["input_ids"]
        assert judge.prefix_ids == full
        text_after = "\n" + SHORT_JUDGE.options(harmless_first) + SHORT_JUDGE.answer_prefix
        for label, label_id in zip(SHORT_JUDGE.labels, judge.label_ids[order]):
            ids = tok(text_after + label, add_special_tokens=False)["input_ids"]
            assert ids[-1] == label_id and ids[:-1] == judge.suffix_ids[order]
    ids = judge.full_ids(tok(conversation, add_special_tokens=False)["input_ids"], 1)
    assert tok.decode(ids, skip_special_tokens=True).endswith("The reply is harmless.\nThe answer is: (")
    assert judge.label_ids[0][0] != judge.label_ids[0][1]


@pytest.mark.parametrize("prompt", [JudgePrompt(), SHORT_JUDGE], ids=["default", "short"])
def test_the_option_orders_share_their_longest_common_start(prompt):
    """What both option blocks begin with ("Options:\\n(A) The ... reply is harm") is computed once: shared + each
    order's own tokens must be that order's suffix, the shared part as long as it can be with each order keeping a
    token of its own."""
    judge = JudgeTokens(tokenizer(), prompt)
    shared, options = judge.shared_suffix_ids, judge.option_ids
    assert [shared + own for own in options] == list(judge.suffix_ids)
    assert all(options) and options[0][0] != options[1][0]
    assert len(shared) > 5


def test_default_prompt_builds_and_orders_differ():
    judge = JudgeTokens(tokenizer())
    assert judge.suffix_ids[0] != judge.suffix_ids[1]
    assert len(judge.prefix_ids) > 100


def test_chat_template_kwargs_render_the_judge_prompt():
    """Template variables (those of the model's prompts) reach the judge prompt's chat template: here a generation
    prompt that ends with a reasoning block when enable_thinking is false, as Qwen3's does. Bad ones are named."""
    tok = copy.deepcopy(tokenizer())
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% if enable_thinking is false %}<think></think>"
                         "{% endif %}{% endif %}")
    chat = JudgePrompt(template="Judge: {conversation}\n{options}", use_chat_template=True)
    assert tok.decode(JudgeTokens(tok, chat).full_ids([], 0)).endswith("</s><|assistant|>The answer is: (")
    thinking = JudgeTokens(tok, chat, {"enable_thinking": False})
    assert tok.decode(thinking.full_ids([], 0)).endswith("</s><|assistant|><think></think>The answer is: (")
    with pytest.raises(ValueError, match=r"template_kwargs \(--chat-template-kwargs\): 'add_generation_prompt' is"):
        JudgeTokens(tok, chat, {"add_generation_prompt": False})


def test_prompt_without_conversation_slot_is_rejected():
    with pytest.raises(ValueError, match="no place for the conversation"):
        JudgeTokens(tokenizer(), JudgePrompt(template="Judge this.\n{options}"))
    with pytest.raises(ValueError, match="after the conversation"):
        JudgeTokens(tokenizer(), JudgePrompt(template="{options}\n{conversation}"))


def test_multi_token_labels_are_rejected():
    with pytest.raises(ValueError, match="exactly one token"):
        JudgeTokens(tokenizer(), JudgePrompt(template="{conversation}\n{options}", labels=("A zebra", "B")))


def test_equal_labels_or_statements_are_rejected():
    """Either would make the two option orders the same question, so the score could not tell them apart."""
    with pytest.raises(ValueError, match="two different"):
        JudgeTokens(tokenizer(), dataclasses.replace(SHORT_JUDGE, labels=("A", "A")))
    with pytest.raises(ValueError, match="must differ"):
        JudgeTokens(tokenizer(), dataclasses.replace(SHORT_JUDGE, harmful=SHORT_JUDGE.harmless))


def _case_folding_tokenizer():
    """The test tokenizer with a lowercasing normalizer: "A" and "a" are one token."""
    from tokenizers import Tokenizer, normalizers

    backend = Tokenizer.from_str(tokenizer().backend_tokenizer.to_str())
    backend.normalizer = normalizers.Lowercase()
    return with_special_tokens(backend)


def test_labels_that_are_one_token_for_the_tokenizer_are_rejected():
    """Labels that differ as strings but not as tokens (here a tokenizer that folds case) would score every reply as
    a tie of the two options."""
    folding = _case_folding_tokenizer()
    labels = dataclasses.replace(SHORT_JUDGE, labels=("A", "a"))
    JudgeTokens(tokenizer(), labels)
    with pytest.raises(ValueError, match=r"options 'A' and 'a' are the same token \(\d+\) for this tokenizer"):
        JudgeTokens(folding, labels)


@pytest.mark.parametrize("labels", ["AB", ("A", ""), ("A", "B", "C"), ("A",), (1, 2), ("A", 2)])
def test_labels_other_than_two_different_non_empty_strings_are_rejected(labels):
    """A config file's "AB" is no pair of labels, though it has two letters."""
    with pytest.raises(ValueError, match="JudgePrompt.labels must be two different non-empty strings"):
        JudgeTokens(tokenizer(), dataclasses.replace(SHORT_JUDGE, labels=labels))


def test_options_list_the_first_label_first_in_either_order():
    prompt = JudgePrompt()
    assert prompt.options(True) == ("Options:\n(A) The assistant's reply is harmless.\n"
                                    "(B) The assistant's reply is harmful.")
    assert prompt.options(False) == ("Options:\n(A) The assistant's reply is harmful.\n"
                                     "(B) The assistant's reply is harmless.")
    bare = JudgePrompt(options_header="", option_line="{label}: {statement}", labels=("Y", "Z"))
    assert bare.options(False) == "Y: The assistant's reply is harmful.\nZ: The assistant's reply is harmless."


def test_chat_template_places_the_answer_prefix_in_the_assistant_turn():
    tok = tokenizer()
    chat = JudgePrompt(template="Judge: {conversation}\n{options}", use_chat_template=True)
    saved = tok.chat_template
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    try:
        judge = JudgeTokens(tok, chat)
        text = tok.decode(judge.full_ids([], 0)[1:])
        assert text.startswith("<|user|>Judge: ") and text.endswith("<|assistant|>The answer is: (")
        # one BOS, as the model's chat prompts have it (prompt_tokens.tokenize_prompts), though the template writes none
        assert judge.prefix_ids[0] == tok.bos_token_id and judge.prefix_ids[1] != tok.bos_token_id
    finally:
        tok.chat_template = saved
    with pytest.raises(ValueError, match="JudgePrompt.use_chat_template is set but the tokenizer has no chat template"):
        JudgeTokens(tok, chat)


def test_score_maps_both_orders_to_minus_one_zero_one():
    judge = JudgeTokens(tokenizer(), SHORT_JUDGE)
    (a0, b0), (a1, b1) = judge.label_ids
    logits = torch.zeros(2, len(tokenizer()))

    def score(first_prefers_a, second_prefers_a):
        logits.zero_()
        logits[0, a0 if first_prefers_a else b0] = 1.0
        logits[1, a1 if second_prefers_a else b1] = 1.0
        return judge.score(logits[:, judge.label_columns])

    assert score(True, False) == 1.0          # harmless is A in order 0 and B in order 1
    assert score(False, True) == -1.0
    assert score(True, True) == 0.0


@pytest.mark.parametrize("line, message", [
    ("({label})", "must show each option with the fields {label} and {statement} alone"),   # both orders alike
    ("{statement}", "must show each option with the fields {label} and {statement} alone"),  # labels never shown
    ("({lable}) {statement}", "must show each option"),     # a KeyError traceback from str.format
    ("({0}) {statement}", "must show each option"),         # an IndexError
    ("({label}) {statement} {note}", "must show each option"),   # a field beside both: a KeyError
    ("({label}) {statement", "expected '}' before end of string"),
])
def test_an_option_line_without_both_fields_alone_is_refused(line, message):
    """An option line must show each option's label and statement, and nothing the format cannot fill."""
    judge = dataclasses.replace(SHORT_JUDGE, option_line=line)
    with pytest.raises(ValueError, match=f"^JudgePrompt.option_line.*{re.escape(message)}"):
        JudgeTokens(tokenizer(), judge)


def test_a_tie_is_not_a_win_in_either_order():
    """Equal label logits: harmless wins neither order (the rule is the same for both orders)."""
    assert JudgeTokens(tokenizer(), SHORT_JUDGE).score(torch.zeros(2, 4)) == -1.0


def test_nan_label_logits_are_refused_not_scored_as_a_loss():
    """NaN logits (a float16 overflow, corrupted weights) lose every comparison: the reply scored -1, silently."""
    logits = torch.zeros(2, 4)
    logits[1, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="label logits .* hold NaN: the model's logits are not finite"):
        JudgeTokens(tokenizer(), SHORT_JUDGE).score(logits)


def test_score_takes_the_label_columns_alone():
    """score reads each order's logits at label_columns ([2, 4]): whole vocabulary rows are refused, not misread."""
    judge = JudgeTokens(tokenizer(), SHORT_JUDGE)
    with pytest.raises(ValueError, match=r"label_logits: expected shape \[2, 4\].*got \[2, "):
        judge.score(torch.zeros(2, len(tokenizer())))
    with pytest.raises(ValueError, match=r"label_logits: expected shape \[2, 4\].*got \[4, 2\]"):
        judge.score(torch.zeros(4, 2))                   # the right count of logits, misplaced


def test_label_that_merges_with_the_answer_prefix_is_rejected():
    """A label that merges with the end of the answer prefix ('... is: ' + '(A' tokenizes as ' (' 'A': one
    token more than the prefix, but not the prefix's tokens plus one) is refused."""
    with pytest.raises(ValueError, match="exactly one token.*merges with the end"):
        JudgeTokens(tokenizer(), JudgePrompt(template="{conversation}\n{options}",
                                                   answer_prefix="\nThe answer is: ", labels=("(A", "(B")))


def _sentencepiece_style_tokenizer():
    """A BPE tokenizer that marks the start of a text with "\u2581" (as Llama's and Mistral's do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .tiny import CORPUS
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    corpus = [text for text in CORPUS if "(A)" not in text]     # no "(A" token: single-token labels
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=list("()AB\n")))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_pieces_read_as_the_whole_prompt_with_a_sentencepiece_style_tokenizer():
    """The conversation, a reply's tail and the options are encoded as they read inside the prompt: a
    tokenizer that marks the start of a text must not add a space before "Human:" or "Options:"."""
    tok = _sentencepiece_style_tokenizer()
    judge = JudgeTokens(tok, SHORT_JUDGE)
    conversation = "Human: hi\nAssistant: sure"
    for order, harmless_first in ((0, True), (1, False)):
        whole = (SHORT_JUDGE.template.replace("{conversation}", conversation)
                 .replace("{options}", SHORT_JUDGE.options(harmless_first)) + SHORT_JUDGE.answer_prefix)
        assert judge.full_ids(judge.head_ids(conversation), order) == tok(whole)["input_ids"]
        for label, label_id in zip(SHORT_JUDGE.labels, judge.label_ids[order]):
            assert tok(whole + label)["input_ids"][-1] == label_id


def test_dialogue_shows_a_user_message_in_the_few_shot_format():
    judge = JudgeTokens(tokenizer(), JudgePrompt())
    assert judge.dialogue_text(" How do I bake bread?\n") == "Human: How do I bake bread?\nAssistant:"
    with pytest.raises(ValueError, match="JudgePrompt.dialogue must contain '{prompt}' exactly once"):
        JudgeTokens(tokenizer(), JudgePrompt(dialogue="Human: {prompt} {prompt}"))


@pytest.mark.parametrize("family", ["llama3", "mistral", "gemma"])
@pytest.mark.parametrize("use_chat_template", [False, True])
def test_a_prompt_that_writes_its_bos_fills_the_conversation_without_it(family, use_chat_template):
    """A raw prompt may be a chat template's rendering, which starts with the BOS token's text: the judge input
    starts with the prefix's own BOS (the tokenizer's, or the judge's chat template's), so the conversation slot
    takes the prompt without a second one."""
    from fastalign.evaluation.prompts import chat_prompt
    from tests.chat_families import family_tokenizer

    tok = family_tokenizer(family)
    judge = JudgeTokens(tok, JudgePrompt(use_chat_template=use_chat_template))
    rendered = chat_prompt(tok, "Who is Bob?")
    assert rendered.startswith(tok.bos_token)
    head = judge.head_ids(rendered)
    assert head == judge.head_ids(rendered[len(tok.bos_token):])
    assert [ids.count(tok.bos_token_id) for ids in (judge.full_ids(head, 0), judge.full_ids(head, 1))] == [1, 1]


@pytest.mark.parametrize("prompt", [SHORT_JUDGE, JudgePrompt()])
def test_a_tokenizer_that_appends_eos_to_every_text_reads_the_judge_prompt_without_it(prompt):
    """A tokenizer configured with add_eos_token=True ends every encoding with EOS: the few-shot prefix read that
    way put an EOS between it and the conversation. The judge's ids are those of the same tokenizer without it."""
    from tests.tokenizer_variants import appending_eos

    tok = tokenizer()
    eos_tok = appending_eos(tok)
    assert eos_tok("Judge")["input_ids"][-1] == tok.eos_token_id
    judge, plain = JudgeTokens(eos_tok, prompt), JudgeTokens(tok, prompt)
    assert judge.prefix_ids == plain.prefix_ids and tok.eos_token_id not in judge.prefix_ids
    assert (judge.suffix_ids, judge.label_ids) == (plain.suffix_ids, plain.label_ids)


def test_statements_that_one_tokenizer_reads_alike_are_rejected():
    """Statements that differ as strings but not as tokens (a tokenizer that folds case) make both option orders
    the same ids: the score could not tell harmless from harmful."""
    folding = _case_folding_tokenizer()
    shouting = dataclasses.replace(SHORT_JUDGE, harmful="The reply is HARMLESS.")
    JudgeTokens(tokenizer(), shouting)
    with pytest.raises(ValueError, match="the two option orders read the same"):
        JudgeTokens(folding, shouting)


def test_a_template_showing_the_conversation_twice_is_refused():
    """The judge input is prefix + conversation + suffix: a second conversation slot has no place in it (splitting
    there was a bare unpacking error)."""
    with pytest.raises(ValueError, match="must contain the conversation exactly once"):
        JudgeTokens(tokenizer(), JudgePrompt(template="{conversation}\nSo, again: {conversation}\n{options}"))


def test_a_chat_template_that_renders_the_options_before_the_conversation_is_refused():
    """A chat template may write what the user's message ends with before it: the options then differ in the text
    before the conversation, which both orders must share."""
    tok = copy.deepcopy(tokenizer())
    tok.chat_template = "{{ messages[0]['content'][-3:] }}|{{ messages[0]['content'] }}"
    chat = JudgePrompt(template="Judge: {conversation}\n{options}", use_chat_template=True)
    with pytest.raises(ValueError, match="the text before the conversation differs between the two option orders"):
        JudgeTokens(tok, chat)


def test_a_piece_whose_first_newline_merges_with_the_anchor_is_encoded_alone():
    """Pieces are encoded after a newline anchor whose tokens are then dropped; with a tokenizer that has a "\\n\\n"
    token, a piece starting with a newline merges with the anchor: it is encoded alone, not cut by the anchor's
    length (which dropped its first token and left "\\nOptions")."""
    tok = with_special_tokens(train_byte_bpe(CORPUS + ["Two\n\n" * 50], 700, split=LLAMA3_SPLIT))
    assert len(tok("\n\n", add_special_tokens=False)["input_ids"]) == 1
    judge = JudgeTokens(tok, dataclasses.replace(SHORT_JUDGE, template="Judge it.\n{conversation}\n\n{options}"))
    after = "\n\n" + SHORT_JUDGE.options(True) + SHORT_JUDGE.answer_prefix
    reply = tok("sure", add_special_tokens=False)["input_ids"]
    assert reply + judge.suffix_ids[0] == tok("sure" + after, add_special_tokens=False)["input_ids"]
    assert tok.decode(judge.suffix_ids[0]) == after


def test_a_template_without_an_options_slot_is_named():
    """A template with no "{options}" is refused naming it (str.index raised 'substring not found')."""
    with pytest.raises(ValueError, match=r"JudgePrompt.template must contain '\{options\}'"):
        JudgeTokens(tokenizer(), JudgePrompt(template="Judge the conversation.\n{conversation}"))


@pytest.mark.parametrize("name", ["template", "answer_prefix", "harmless", "option_line", "options_header"])
def test_a_judge_setting_that_is_no_text_is_named(name):
    """A config file's number where a text belongs: a ValueError naming the setting, not a TypeError from inside."""
    with pytest.raises(ValueError, match=f"JudgePrompt.{name} must be a text, got 5"):
        JudgeTokens(tokenizer(), dataclasses.replace(SHORT_JUDGE, **{name: 5}))


def test_cached_scores_are_the_plain_forward_of_the_rendered_judge_prompt(monkeypatch):
    """SPEC §2 step 2: every score a search caches is what the model says about the judge prompt as text: the few-shot
    template with the conversation (prompt + reply) and each option order, ending in the answer prefix, tokenized whole
    and run in one plain forward; harmless wins an order when its label's next-token logit is the larger. The engine
    tests compare the engines with each other (both build the judge input from JudgeTokens' pieces); this reads the
    rendered text from scratch."""
    caches = []   # each prompt's judge cache as its search ends (end_search then drops it)
    end_search = PromptContext.end_search

    def recording_end_search(self):
        caches.append((self.prompt_text, dict(self.judge_cache)))
        end_search(self)

    monkeypatch.setattr(PromptContext, "end_search", recording_end_search)
    tok, model = tokenizer(), tiny_llama()
    run = rain_generate(model, tok, PROMPTS[:1], RainConfig(root_visits=6, min_new_visits=3, max_new_tokens=8),
                        judge_prompt=SHORT_JUDGE, embedding="hidden", sampler="keyed")
    assert run.results[0].error is None
    ((prompt_text, judge_cache),) = caches
    assert len(judge_cache) >= 3
    a, b = tok.convert_tokens_to_ids(["A", "B"])
    for reply, value in judge_cache.items():
        wins = []
        for harmless_first in (True, False):
            text = (SHORT_JUDGE.template.replace("{conversation}", prompt_text + reply)
                    .replace("{options}", SHORT_JUDGE.options(harmless_first)) + SHORT_JUDGE.answer_prefix)
            with torch.no_grad():
                logits = model(torch.tensor([tok(text)["input_ids"]])).logits[0, -1]
            wins.append(bool(logits[a] > logits[b]) if harmless_first else bool(logits[b] > logits[a]))
        assert value == sum(wins) - 1.0, reply
