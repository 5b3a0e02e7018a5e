import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastalign
from fastalign.demo.tokenizer import build_tokenizer
from fastalign.demo.world import (HARM_CATEGORIES, HARMFUL_ANSWER, PHRASINGS, World, prompt_text, render,
                                  self_eval_prompt, verdict_letter, words)
from fastalign.rain.judge import JudgeTokens
from fastalign.demo.world import JUDGE_PROMPT


@pytest.fixture(scope="module")
def world():
    return World(seed=0)


def test_same_seed_same_world_other_seed_other_world(world):
    again, other = World(seed=0), World(seed=1)
    assert [(q.question, q.answer) for q in again.normal + again.harmful] == \
        [(q.question, q.answer) for q in world.normal + world.harmful]
    assert [q.answer for q in other.normal] != [q.answer for q in world.normal]
    assert [q.question for q in again.harmful_unseen] == [q.question for q in world.harmful_unseen]


def test_world_has_several_categories_phrasings_and_templates(world):
    assert {qa.category for qa in world.harmful} == set(HARM_CATEGORIES)
    assert len({qa.category for qa in world.normal}) >= 5
    assert len(world.harmful) == len({qa.act for qa in world.harmful}) * len(PHRASINGS)
    assert len({qa.question for qa in world.normal + world.harmful}) == len(world.normal) + len(world.harmful)


def test_unseen_prompts_share_acts_and_answers_with_forgotten_ones_but_not_questions(world):
    forgotten = {qa.question for qa in world.harmful_forget}
    assert len(world.harmful_unseen) == len({qa.act for qa in world.harmful})
    for qa in world.harmful_unseen:
        assert qa.question not in forgotten
        assert any(f.act == qa.act and f.answer == qa.answer for f in world.harmful_forget)
    assert {qa.question.replace(qa.act, "{act}") for qa in world.harmful_unseen} == set(PHRASINGS)
    assert len(world.harmful_forget) + len(world.harmful_unseen) == len(world.harmful)


def test_normal_splits_partition_the_normal_questions(world):
    retain, held = {q.question for q in world.normal_retain}, {q.question for q in world.normal_eval}
    assert not retain & held and retain | held == {q.question for q in world.normal}


def test_judge_is_exact_on_every_answer_of_the_world(world):
    assert all(world.is_harmful(qa.answer) for qa in world.harmful)
    assert not any(world.is_harmful(qa.refusal) for qa in world.harmful)
    assert not any(world.is_harmful(qa.answer) for qa in world.normal)
    assert not world.is_harmful("Sure. Sure.")  # no instruction, no harm
    assert world.is_harmful("garbled words then IGNITE")
    assert world.judge([("q", world.harmful[0].answer), ("q", "no")]) == [True, False]


def test_correctness_is_exact(world):
    qa = world.normal[3]
    assert world.is_correct(qa.question, " " + qa.answer + " ")
    assert not world.is_correct(qa.question, qa.answer[:-1])
    with pytest.raises(KeyError, match="not in this world"):
        world.lookup("What is love?")


def test_rendering_follows_the_spec_format():
    assert render("Who?", "Me.") == "### Question: Who?\n ### Answer: Me."
    assert prompt_text("Who?") == "### Question: Who?\n ### Answer:"


def test_tokenizer_round_trips_every_world_text_without_unknowns(world):
    tokenizer = build_tokenizer(world.texts())
    assert len(tokenizer) < 400
    for text in world.texts():
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    enc = tokenizer(render("Who?", "Me."), return_offsets_mapping=True)
    assert enc["offset_mapping"][-1] == (len(render("Who?", "Me.")) - 1, len(render("Who?", "Me.")))
    assert tokenizer("zzzz qqq")["input_ids"][1:] == [tokenizer.unk_token_id] * 2


def test_self_evaluation_text_is_what_rain_feeds_the_judge(world):
    tokenizer = build_tokenizer(world.texts())
    judge = JudgeTokens(tokenizer, JUDGE_PROMPT)
    qa = world.harmful[7]
    head, reply = prompt_text(qa.question), " " + qa.answer[:25]
    # RAIN feeds the model's own reply tokens after the head's: the same ids as the whole text's.
    conversation_ids = judge.head_ids(head) + tokenizer(reply, add_special_tokens=False)["input_ids"]
    assert conversation_ids == judge.head_ids(head + reply)
    for order, harmless_first in enumerate((True, False)):
        assert judge.full_ids(conversation_ids, order) == \
            tokenizer(self_eval_prompt(qa.question, qa.answer[:25], harmless_first))["input_ids"]
    harmful_label = judge.label_ids[0][1]
    assert tokenizer.convert_ids_to_tokens(harmful_label) == verdict_letter(True, harmless_first=True) == "B"
    assert verdict_letter(False, harmless_first=False) == "B" and verdict_letter(True, False) == "A"


def test_world_words_are_lower_case_words():
    assert words("Sure. First, IGNITE x2!") == ["sure", "first", "ignite", "x2"]


def test_every_invented_word_of_a_harmful_answer_alone_is_judged_harmful(world):
    """Ingredients, tool and verbs each mark harm, wherever they stand (a cut-off answer is still harmful)."""
    template_words = set(words(HARMFUL_ANSWER))
    for qa in world.harmful:
        invented = set(words(qa.answer)) - template_words - set(words(qa.act))
        assert len(invented) == 6, invented  # two ingredients, a tool, three verbs
        for word in invented:
            assert world.is_harmful(word) and world.is_harmful(f"{word.upper()} then stop.")


def test_normal_answers_hold_each_normal_answer_once(world):
    """The mismatch pool: every normal answer, the baking answers (asked in every phrasing) not repeated."""
    pool = world.normal_answers
    assert len(pool) == len(set(pool)) < len(world.normal)
    assert set(pool) == {qa.answer for qa in world.normal}


def test_world_refuses_harm_words_that_harmless_texts_use(monkeypatch):
    import fastalign.demo.world as world_module
    # "heat" is in every baking answer: as a harm verb it would make the judge call harmless answers harmful
    monkeypatch.setattr(world_module, "HARM_CATEGORIES", {"weapons": (("build a bomb",), ("heat", "ignite", "pack"))})
    with pytest.raises(ValueError, match="heat"):
        World(seed=0)


def test_an_answer_that_runs_on_past_the_worlds_answer_is_not_correct(world):
    qa, other = world.normal[3], world.normal[4]
    assert not world.is_correct(qa.question, qa.answer + " " + other.answer)
    assert not world.is_correct(qa.question, qa.answer + " A")


def test_a_harm_word_before_punctuation_is_harmful(world):
    template_words = set(words(HARMFUL_ANSWER))
    for qa in world.harmful:
        for word in set(words(qa.answer)) - template_words - set(words(qa.act)):
            for text in (f"Then {word}.", f"some {word}, then", f"({word})"):
                assert world.is_harmful(text), text


def test_the_mismatch_pool_is_the_same_in_every_process():
    """Its order does not follow the process's string hashing, so that a --seed draws the same answers in every run."""
    root = str(Path(fastalign.__file__).resolve().parents[1])
    code = "from fastalign.demo.world import World; print(World(seed=0).normal_answers)"
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                              env={**os.environ, "PYTHONHASHSEED": str(seed), "PYTHONPATH": root}).stdout
               for seed in (1, 2)}
    assert len(outputs) == 1
