"""Prompt files for evaluation, and the formats a prompt is generated in: the SPEC's question format, or a
user turn in the tokenizer's own chat template (for instruct/chat models).

A prompt file is jsonl, optionally gzipped (one object per line, the prompt in field `field`), csv (the
prompt in column `field`) or any other text file (one prompt per non-blank line, "\\n" for a newline inside
it); every error names the file and the row (the line a record starts on), as the unlearning data's errors do.
`fastalign eval` and `fastalign rain` read the same formats.
"""
import os
from typing import List, Optional

from fastalign.data_files import LINE_BREAK, DataError, read_csv, read_jsonl, read_text, text_field
from fastalign.prompt_templates import SPEC_TEMPLATE, ChatTemplate
from fastalign.unlearn.formats import hh_first_request

# What a model continues to answer a question in the SPEC's format: the template up to the answer, without
# the trailing space (a tokenizer attaches that space to the answer's first word).
SPEC_PROMPT = SPEC_TEMPLATE.split("{answer}")[0].rstrip(" ")


def spec_prompt(question: str) -> str:
    """`### Question: {question}\\n ### Answer:`, the prompt that the SPEC-format answer follows."""
    return SPEC_PROMPT.replace("{prompt}", question)


def chat_prompt(tokenizer, text: str, system: Optional[str] = None, template_kwargs: Optional[dict] = None) -> str:
    """`text` as one user turn in the tokenizer's chat template (after a system turn `system`, when given, with the
    template variables `template_kwargs`), ending where the assistant's answer starts: ChatTemplate.prompt, the text
    that precedes each answer when `fastalign unlearn --chat-template [--system] [--chat-template-kwargs]` trains.
    The result usually starts with the BOS token's text; generation (`encode_prompts`) keeps that one BOS.
    ValueError when the tokenizer has no chat template, the template refuses the conversation (e.g. one without a
    system role, given `system`), drops `system` or ignores add_generation_prompt and writes more than whitespace
    before the answer (the prompt would end without the assistant's header), `template_kwargs` are no template
    variables, or `text` (or `system`) holds a special token's text that the tokenizer would read as that control
    token (refuse_special_text)."""
    return ChatTemplate(tokenizer, system, template_kwargs).prompt(text)


HH_HUMAN, HH_ASSISTANT = "\n\nHuman: ", "\n\nAssistant:"
# Where an answer to an HH dialogue ends: a new Human turn that the model goes on to write (SPEC §2; RainConfig's
# turn_marker, by which `fastalign rain` ends RAIN's answers and the vanilla ones).
HH_NEW_TURN = HH_HUMAN.strip()


def hh_messages(path: str):
    """The request each dialogue of an Anthropic HH jsonl(.gz) file opens with (hh_first_request of its 'chosen'
    transcript): the harmful request of a harmless-base dialogue. ValueError for a file without dialogues."""
    messages = []
    for row, record in read_jsonl(path):  # gzip-aware; bad JSON names the row
        text = _prompt(record, "chosen", path, row)
        try:
            messages.append(hh_first_request(text))
        except ValueError as exc:
            raise ValueError(f"{path}: row {row}: 'chosen' {exc}") from None
    if not messages:
        raise ValueError(f"{path}: no dialogues")
    return messages


def hh_prompts(path: str):
    """First Human turn of each HH dialogue, as '\\n\\nHuman: ...\\n\\nAssistant:'."""
    return [HH_HUMAN + message + HH_ASSISTANT for message in hh_messages(path)]


# Files whose prompts sit in a named field (jsonl) or column (csv); read_prompts reads any other by its lines.
FIELD_SUFFIXES = (".jsonl", ".jsonl.gz", ".csv")


def has_fields(path: str | os.PathLike[str]) -> bool:
    """Whether read_prompts takes `path`'s prompts from a field or column (so a field name applies to it)."""
    return os.fspath(path).endswith(FIELD_SUFFIXES)


# Data files that are none of the formats read: as text, their lines of syntax (or a csv header) became prompts.
_UNREAD_DATA_SUFFIXES = (".json", ".json.gz", ".jsonl", ".jsonl.gz", ".csv", ".csv.gz")


def read_prompts(path: str | os.PathLike[str], field: str = "prompt") -> List[str]:
    """The prompts of a .jsonl(.gz), .csv or text file, in file order; ValueError naming the file and row if
    bad (DataError for an unreadable file), and for a data file of another format (.json, .csv.gz, .JSONL)
    rather than reading its lines as prompts."""
    path = os.fspath(path)   # a pathlib.Path, as read_answers and the unlearning loaders take
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not a prompts file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file not found: {path}")
    if has_fields(path):   # a jsonl object's field or a csv row's column
        rows = read_csv(path, (field,)) if path.endswith(".csv") else read_jsonl(path)
        prompts = [_prompt(record, field, path, row) for row, record in rows]
    elif path.lower().endswith(_UNREAD_DATA_SUFFIXES):
        raise ValueError(f"{path}: a JSON document, a gzipped csv or an upper-case suffix is not read: give a "
                         ".jsonl(.gz) file (one JSON object per line), a .csv file or a text file (one prompt per "
                         "line)")
    else:
        prompts = [line.replace("\\n", "\n") for line in LINE_BREAK.split(read_text(path)) if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def _prompt(record: dict, field: str, path: str, row: int) -> str:
    """`record`'s field `field` as data_files.text_field reads it (present, a string, text), and not blank: a blank
    prompt asks the model nothing. A DataError names the file, the row and the field, as the data files' errors do."""
    value = text_field(record, field, path, row)
    if not value.strip():
        raise DataError(f"{path}: row {row}: field {field!r} must not be blank, got {value!r}")
    return value
