"""--template chat: prompts in the tokenizer's chat template, one BOS, answers that end at the end of turn."""
import json
import re
import shutil

import pytest

from fastalign.evaluation.cli import main
from fastalign.evaluation.generation import GenerationConfig, encode_prompts, eos_ids, generate, generations
from fastalign.evaluation.metrics import text_token_pairs
from fastalign.evaluation.prompts import chat_prompt
from fastalign.prompt_templates import end_of_turn_id
from tests.evaluation.chat_model import (BOS, CHAT_TEMPLATE, END, EOT, QUESTION, START, SYSTEM, chat_tokenizer,
                                         rigged_chat_model)
from tests.evaluation.test_cli import records


# A file a test leaves open (a ResourceWarning once it is collected, easily missed) fails the test.
pytestmark = pytest.mark.filterwarnings("error::ResourceWarning", "error::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def chat_tok():
    return chat_tokenizer()


@pytest.fixture(scope="module")
def rigged(chat_tok):
    return rigged_chat_model(chat_tok)


def test_chat_prompt_is_one_user_turn_with_a_single_bos(chat_tok, rigged):
    text = chat_prompt(chat_tok, QUESTION, system=SYSTEM)
    ids, = encode_prompts(chat_tok, [text], 8, rigged[0])
    assert chat_tok.convert_ids_to_tokens(ids) == [
        BOS, START, "system", END, "Ċ", "Ċ", "Be", "Ġbrief", ".", EOT,
        START, "user", END, "Ċ", "Ċ", "Who", "Ġis", "ĠBob", "?", EOT,
        START, "assistant", END, "ĊĊ"]
    assert chat_prompt(chat_tok, QUESTION) == text.replace(f"{START}system{END}\n\n{SYSTEM}{EOT}", "")


def test_chat_prompt_needs_a_chat_template():
    with pytest.raises(ValueError, match="has no chat template"):
        chat_prompt(chat_tokenizer(chat_template=None), QUESTION)


def test_utility_kl_scores_the_tokens_generation_read(chat_tok, rigged):
    text = chat_prompt(chat_tok, QUESTION)
    prompt_ids = encode_prompts(chat_tok, [text], 8, rigged[0])[0]
    assert text_token_pairs(chat_tok, [(text, " yes no")]) == [
        (tuple(prompt_ids), tuple(chat_tok.convert_tokens_to_ids(["Ġyes", "Ġno"])))]


def test_end_of_turn_is_the_special_token_after_an_assistant_answer(chat_tok):
    assert end_of_turn_id(chat_tok) == chat_tok.convert_tokens_to_ids(EOT)
    assert end_of_turn_id(chat_tokenizer(chat_template=None)) is None
    # a template whose turns end in plain text has no end-of-turn token: answers may hold that text
    plain = "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}\n\n{% endfor %}"
    assert end_of_turn_id(chat_tokenizer(chat_template=plain)) is None


@pytest.mark.parametrize("listed", ["end_of_text_and_eot", "end_of_text_only"])
def test_generation_stops_at_the_end_of_turn(chat_tok, rigged, listed):
    """Stops at <|eot_id|> whether the generation config lists it (as Llama-3-Instruct's does now) or only
    <|end_of_text|> (its first release): the chat template says where a turn ends."""
    model, answer_ids = rigged
    eos, eot = chat_tok.eos_token_id, chat_tok.convert_tokens_to_ids(EOT)
    model.generation_config.eos_token_id = [eos, eot] if listed == "end_of_text_and_eot" else eos
    try:
        assert eos_ids(model, chat_tok) == {eos, eot}
        prompts = [chat_prompt(chat_tok, QUESTION, SYSTEM), chat_prompt(chat_tok, "Where does Alice live?")]
        answer, _ = generations(model, chat_tok, prompts, GenerationConfig(max_new_tokens=6, batch_size=2))
        assert answer.text == chat_tok.decode(answer_ids) and "<|" not in answer.text
        assert answer.answer_ids == (*answer_ids, eot)   # the end of turn it stopped on, for the utility KL
    finally:
        model.generation_config.eos_token_id = eos


def test_without_the_end_of_turn_generation_runs_past_it(chat_tok, rigged):
    """The rig's control: with no chat template to name <|eot_id|>, the answer goes on after it."""
    model, answer_ids = rigged
    plain = chat_tokenizer(chat_template=None)
    answer, = generate(model, plain, [chat_prompt(chat_tok, QUESTION, SYSTEM)], GenerationConfig(max_new_tokens=6))
    assert answer.startswith(chat_tok.decode(answer_ids)) and answer != chat_tok.decode(answer_ids)


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, chat_tok, rigged):
    path = tmp_path_factory.mktemp("tiny_chat_llama")
    model = rigged[0]
    model.generation_config.eos_token_id = [chat_tok.eos_token_id, chat_tok.convert_tokens_to_ids(EOT)]
    model.save_pretrained(path)
    model.generation_config.eos_token_id = chat_tok.eos_token_id
    chat_tok.save_pretrained(path)
    return path


def write_prompts(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return str(path)


def test_cli_template_chat_end_to_end(chat_tok, rigged, chat_model_dir, tmp_path, capsys):
    questions = [QUESTION, "Where does Alice live?"]
    prompts = write_prompts(tmp_path / "p.jsonl", questions)
    out = tmp_path / "out.jsonl"
    assert main([str(a) for a in ("--model", chat_model_dir, "--prompts", prompts, "--template", "chat",
                                  "--system", SYSTEM, "--judge", "keyword", "--keywords", "Bob,Alice",
                                  "--output", out, "--max-new-tokens", 6, "--batch-size", 2,
                                  "--reference", chat_model_dir, "--normal-prompts", prompts)]) == 0
    rows = records(out)
    assert [r["prompt"] for r in rows] == [chat_prompt(chat_tok, q, SYSTEM) for q in questions]
    assert rows[0]["answer"] == chat_tok.decode(rigged[1])          # the assistant's text, up to <|eot_id|>
    assert not any("<|" in r["answer"] or "assistant" in r["answer"] for r in rows)
    summary = json.loads(capsys.readouterr().out)
    assert summary["unchanged_share"] == 1.0 and summary["mean_token_kl"] == pytest.approx(0.0, abs=1e-6)
    assert (summary["generation"]["template"], summary["generation"]["system"]) == ("chat", SYSTEM)


def test_cli_template_chat_names_a_prompt_holding_a_special_tokens_text(chat_model_dir, tmp_path, capsys):
    """The chat template writes the turn markers; an end of turn written in a prompt would end the user's turn
    inside it. Such a prompt (or normal prompt) is a usage error naming it, before any answer."""
    good = write_prompts(tmp_path / "ok.jsonl", [QUESTION])
    bad = write_prompts(tmp_path / "bad.jsonl", [QUESTION, f"Who is Bob?{EOT}"])
    args = ("--model", chat_model_dir, "--template", "chat", "--judge", "keyword", "--output", tmp_path / "out.jsonl")
    for source, files in (("--prompts", ("--prompts", bad)),
                          ("--normal-prompts", ("--prompts", good, "--reference", chat_model_dir,
                                                "--normal-prompts", bad))):
        assert main([str(a) for a in args + files]) == 2
        assert f"{source}: prompt 1: the prompt holds '{EOT}', the text of" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()
    with pytest.raises(ValueError, match=f"the prompt holds '{re.escape(EOT)}'"):
        chat_prompt(chat_tokenizer(), f"Hi{EOT}")


def test_cli_chat_template_kwargs_render_every_prompt_and_are_recorded(chat_model_dir, tmp_path, capsys):
    """--chat-template-kwargs are the chat template's variables in every prompt (here one that ends the generation
    prompt with a word when enable_thinking is false, as Qwen3's ends it with a reasoning block) and recorded in
    the summary; names apply_chat_template takes itself and values that are no JSON object are usage errors."""
    model_dir, kwargs = tmp_path / "model", {"enable_thinking": False}
    shutil.copytree(chat_model_dir, model_dir)
    template = CHAT_TEMPLATE + "{% if add_generation_prompt and enable_thinking is false %}Hi{% endif %}"
    (model_dir / "chat_template.jinja").write_text(template)
    prompts, out = write_prompts(tmp_path / "p.jsonl", [QUESTION]), tmp_path / "out.jsonl"
    args = ["--model", str(model_dir), "--prompts", prompts, "--template", "chat", "--judge", "keyword",
            "--keywords", "Bob", "--output", str(out), "--max-new-tokens", "2", "--chat-template-kwargs"]
    assert main(args + [json.dumps(kwargs)]) == 0
    [row] = records(out)
    tok = chat_tokenizer(template)
    assert row["prompt"] == chat_prompt(tok, QUESTION, template_kwargs=kwargs) == chat_prompt(tok, QUESTION) + "Hi"
    assert json.loads(capsys.readouterr().out)["generation"]["chat_template_kwargs"] == kwargs
    assert main(args + ['{"tokenize": true}']) == 2
    assert ("--template chat: template_kwargs (--chat-template-kwargs): 'tokenize' is an argument of "
            "apply_chat_template") in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["enable_thinking=false"])
    assert exit_info.value.code == 2
    assert "argument --chat-template-kwargs: expected a JSON object such as" in capsys.readouterr().err


def test_cli_template_chat_needs_a_chat_template(model_dir, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", [QUESTION])
    args = ["--model", str(model_dir), "--prompts", prompts, "--output", str(tmp_path / "o.jsonl")]
    assert main(args + ["--template", "chat"]) == 2
    assert "--template chat: the tokenizer" in capsys.readouterr().err
    assert main(args + ["--system", SYSTEM]) == 2
    assert "--system is a turn of the chat template: it needs --template chat" in capsys.readouterr().err


def test_chat_prompt_names_a_template_that_refuses_a_system_turn():
    no_system = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                 "{% endif %}" + CHAT_TEMPLATE)
    tokenizer = chat_tokenizer(chat_template=no_system)
    assert chat_prompt(tokenizer, QUESTION) == chat_prompt(chat_tokenizer(), QUESTION)
    with pytest.raises(ValueError, match="refused the conversation: System role not supported"):
        chat_prompt(tokenizer, QUESTION, system=SYSTEM)


def test_chat_prompt_names_a_template_that_drops_the_system_turn():
    """A template that renders no system turn would evaluate without the --system the user asked for (and that
    `fastalign unlearn --system` refuses to train without): an error, not a prompt without it."""
    drops = CHAT_TEMPLATE.replace("{% for m in messages %}", "{% for m in messages if m['role'] != 'system' %}")
    tokenizer = chat_tokenizer(chat_template=drops)
    assert chat_prompt(tokenizer, QUESTION) == chat_prompt(chat_tokenizer(), QUESTION)
    with pytest.raises(ValueError, match=r"system \(--system\) is not in the conversation .* drops the system turn"):
        chat_prompt(tokenizer, QUESTION, system=SYSTEM)


def test_chat_prompt_refuses_a_template_without_a_generation_prompt():
    """A template that ignores add_generation_prompt ended the prompt at the user's end of turn: the model wrote the
    assistant header itself, and the answer's text started with it ('assistant\\n\\nHi'), where training refuses
    the template. Refused for prompting too; one that writes only whitespace before the answer (Llama 2's '[/INST]',
    then ' answer') still prompts, as does one whose answer cannot be found after the prompt (Mistral's, which puts
    the system turn in the last user turn)."""
    ignored = CHAT_TEMPLATE.replace("{% if add_generation_prompt %}", "{% if false %}")
    header = re.escape(repr(f"{START}assistant{END}\n\n"))
    with pytest.raises(ValueError, match=f"writes {header} between the generation prompt and the answer: the template "
                                         "ignores add_generation_prompt"):
        chat_prompt(chat_tokenizer(ignored), QUESTION)
    llama2 = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
              "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    assert chat_prompt(chat_tokenizer(llama2), QUESTION) == f"{BOS}[INST] {QUESTION} [/INST]"
    mistral = ("{{ bos_token }}{% for m in messages if m['role'] != 'system' %}{% if m['role'] == 'user' %}[INST] "
               "{% if loop.last and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
               "{{ m['content'] }}[/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    assert chat_prompt(chat_tokenizer(mistral), QUESTION, SYSTEM) == f"{BOS}[INST] {SYSTEM}\n\n{QUESTION}[/INST]"
