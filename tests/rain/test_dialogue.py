"""The text rules of the search: where a rollout stops, and what the judge reads of a reply cut before a new
user turn (the model's own tokens up to the cut, then the cut text tokenized anew)."""
import random

from fastalign.rain import JudgeTokens, RainConfig
from fastalign.rain.dialogue import answer_text, cut_at_turn, has_new_turn, judge_input, last_char, rollout_stops
from fastalign.rain.jobs import PromptContext

from tests.test_token_text import TEXT, random_answer

from .tiny import PROMPTS, SHORT_JUDGE, tokenizer


def ids(text):
    return tokenizer()(text, add_special_tokens=False)["input_ids"]


def context(max_length=100):
    root = tokenizer()(PROMPTS[0])["input_ids"]
    return PromptContext(index=0, prompt_text=PROMPTS[0], root_ids=root, head_ids=[], root_key=0,
                         max_length=max_length)


def test_rollout_stops_at_a_new_turn_in_the_answer_only():
    """The prompt's own "Human:" does not stop a rollout; one that opens the answer does (':' is no stop
    character here)."""
    tok, ctx, config = tokenizer(), context(), RainConfig(rollout_stop_chars=".")
    assert answer_text(tok, ctx.root_ids + ids(" I will not"), ctx.answer_start) == " I will not"
    assert not rollout_stops(tok, config, ctx, ctx.root_ids + ids(" I will not"))
    assert rollout_stops(tok, config, ctx, ctx.root_ids + ids("Human:"))


def test_a_state_without_text_does_not_stop_a_rollout():
    """A state of special tokens only decodes to no text, whose last character "" is `in` any string of stop
    characters: the rollout stopped before drawing anything."""
    tok = tokenizer()
    special = [tok.bos_token_id, tok.eos_token_id]
    ctx = PromptContext(index=0, prompt_text="", root_ids=special, head_ids=[], root_key=0, max_length=100)
    assert last_char(tok, special) == ""
    assert not rollout_stops(tok, RainConfig(), ctx, special)


def test_rollout_stops_when_the_sequence_reaches_max_length():
    tok, config = tokenizer(), RainConfig(rollout_stop_chars=".")
    state = context().root_ids + ids(" I will not")
    assert rollout_stops(tok, config, context(max_length=len(state)), state)
    assert not rollout_stops(tok, config, context(max_length=len(state) + 1), state)


def test_last_char_sees_a_character_split_over_byte_tokens():
    """'。' is three byte tokens of this tokenizer: the decoded tail must hold all of them."""
    assert len(ids("\u3002")) == 3
    assert last_char(tokenizer(), ids(" yes\u3002")) == "\u3002"
    assert rollout_stops(tokenizer(), RainConfig(rollout_stop_chars="\u3002"), context(),
                         context().root_ids + ids(" yes\u3002"))


def test_rollout_stops_decodes_a_short_answer_once_and_stops_at_its_last_character():
    """A rollout token's check decoded the state's tail for the last character and the answer for the turn marker:
    now the answer's decode gives both (the tail alone where the answer holds no text yet), the same stops as the
    last character of the state's text gives, on random answers (characters split over byte tokens, special
    tokens)."""
    tok, ctx, rng = tokenizer(), context(max_length=10**6), random.Random()
    calls, real_decode = [], type(tok).decode

    def counting_decode(self, ids, *args, **kwargs):
        calls.append(len(ids))
        return real_decode(self, ids, *args, **kwargs)

    for _ in range(30):
        answer = random_answer(tok, rng, rng.randrange(1, 20))
        state = ctx.root_ids + answer
        char = last_char(tok, state)
        config = RainConfig(rollout_stop_chars=char if rng.random() < 0.5 else "\u3002", turn_marker="Human:")
        type(tok).decode, calls[:] = counting_decode, []
        try:
            stops = rollout_stops(tok, config, ctx, state)
        finally:
            type(tok).decode = real_decode
        assert stops == (bool(char) and char in config.rollout_stop_chars) or \
            has_new_turn(answer_text(tok, answer, 0), "Human:")
        assert len(calls) == 1 or not answer_text(tok, answer, 0)


def test_judge_input_of_a_reply_cut_in_the_rollout_keeps_the_models_tokens():
    """Turn marker "e" cuts the reply inside the rollout: base "leaf" (the leaf's tokens are read from the
    search tree), then the rollout's tokens that end before the cut, then the cut text tokenized anew; a
    cut right after the leaf's last token keeps no rollout token but is still "leaf"."""
    tok, ctx = tokenizer(), context()
    judge, config, end = JudgeTokens(tok, SHORT_JUDGE), RainConfig(turn_marker="e"), {tok.eos_token_id}
    leaf = ctx.root_ids + ids(" I will not")
    assert ids(" do that here")[2:] == ids(" here")            # ' he', 're': the cut falls after ' h'
    reply, base, judged = judge_input(judge, tok, end, config, ctx, leaf + ids(" do that here"), len(leaf))
    assert (reply, base, judged) == (" I will not do that h", "leaf", ids(" do that") + judge.head_ids(" h"))
    reply, base, judged = judge_input(judge, tok, end, config, ctx, leaf + ids(" help"), len(leaf))
    assert (reply, base, judged) == (" I will not h", "leaf", judge.head_ids(" h"))


def test_an_empty_turn_marker_cuts_nothing_and_stops_nothing():
    """turn_marker "" switches the rule off: "" is `in` every text, so each reply would be cut to nothing and each
    rollout would stop before drawing."""
    tok, ctx, config = tokenizer(), context(), RainConfig(rollout_stop_chars=".", turn_marker="")
    assert cut_at_turn(" I will not", "") == " I will not" and not has_new_turn(" I will not", "")
    assert not rollout_stops(tok, config, ctx, ctx.root_ids + ids(" I will not"))


def test_last_char_reads_past_a_tail_of_special_tokens():
    """A state ending in more special tokens than the tail decodes: the whole state is decoded for its last
    character, not taken as no text (which never stops a rollout)."""
    tok = tokenizer()
    state = ids(" I will not.") + [tok.eos_token_id] * 9
    assert last_char(tok, state) == "."
    assert rollout_stops(tok, RainConfig(rollout_stop_chars="."), context(), context().root_ids + state)


def test_judge_input_of_a_reply_cut_inside_the_answers_first_token_keeps_none_of_its_tokens():
    """Turn marker "e" cuts the leaf's first token (' he') itself: no model token ends before the cut, so the judge
    reads the cut text alone, from the head (not that first token, which reads past the cut)."""
    tok, ctx = tokenizer(), context()
    judge, config, end = JudgeTokens(tok, SHORT_JUDGE), RainConfig(turn_marker="e"), {tok.eos_token_id}
    leaf = ctx.root_ids + ids(" here")
    assert tok.decode(ids(" here")[:1]) == " he"
    assert judge_input(judge, tok, end, config, ctx, leaf, len(leaf)) == (" h", "head", judge.head_ids(" h"))


def test_a_rollout_stops_at_the_token_that_opens_a_new_turn_as_the_whole_answer_says():
    """rollout_stops reads only the answer's end for the turn marker: a rollout of random tokens (characters split
    over byte tokens, special tokens) stops at the token where the whole answer's text first holds the marker."""
    tok, ctx, rng = tokenizer(), context(max_length=10**6), random.Random()
    for _ in range(30):
        answer = random_answer(tok, rng, rng.randrange(20, 120))
        whole = answer_text(tok, answer, 0)
        size = rng.randrange(1, 12)
        start = rng.randrange(max(len(whole) - size, 0) + 1)
        config = RainConfig(rollout_stop_chars="", turn_marker=whole[start:start + size] or "x")
        stop = next(n for n in range(len(answer) + 1) if rollout_stops(tok, config, ctx, ctx.root_ids + answer[:n]))
        assert has_new_turn(answer_text(tok, answer[:stop], 0), config.turn_marker)
        assert stop == 0 or not has_new_turn(answer_text(tok, answer[:stop - 1], 0), config.turn_marker)


def test_rollout_stops_decodes_as_many_tokens_at_the_end_of_a_long_answer_as_early_on():
    """Each rollout token's check decoded the whole answer (tokens decoded per token grew with the answer):
    now a window of its last tokens, and the 8-token tail for the last character."""
    tok, ctx = tokenizer(), context(max_length=10**6)
    answer = tok(TEXT * 12, add_special_tokens=False)["input_ids"][:600]
    config, decoded = RainConfig(rollout_stop_chars="", turn_marker="Human:"), []
    real_decode = type(tok).decode

    def counting_decode(self, ids, *args, **kwargs):
        decoded[-1] += len(ids)
        return real_decode(self, ids, *args, **kwargs)

    type(tok).decode = counting_decode
    try:
        for n in range(60, 601, 60):
            decoded.append(0)
            assert not rollout_stops(tok, config, ctx, ctx.root_ids + answer[:n])
    finally:
        type(tok).decode = real_decode
    # the last character's 8 tokens, then windows of len("Human:") + 8 tokens after 8 more, doubled twice at most
    widths = [(6 + 8) * 2 ** k for k in range(3)]
    assert max(decoded) <= 8 + sum(3 * (w + 8) for w in widths) < 600
