"""An unlearning run from an UnlearnConfig: load the model and data, check them all, then train.

Every data file is read, validated and tokenized before anything is written to the output directory,
so a bad row stops the run with an error naming it and leaves no partial output.
"""
from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any, Callable

from fastalign.data_files import DataError
from fastalign.model_vocabulary import input_vocabulary, pad_id
from fastalign.output_lock import output_lock
from fastalign.pretrained import load_pretrained, load_tokenizer
from fastalign.prompt_templates import ChatTemplate, TextTemplate
from fastalign.unlearn.config import UnlearnConfig
from fastalign.unlearn.encoding import encode_answers, encode_pairs
from fastalign.unlearn.formats import load_pairs, load_truthfulqa
from fastalign.unlearn.streams import UnlearningStreams, mismatch_fit

if TYPE_CHECKING:   # the trainer (and with it accelerate) is imported when a run starts
    from fastalign.unlearn.trainer import RunSummary, StepRecord


def _truthfulqa(config: UnlearnConfig, path: str):
    return load_truthfulqa(path, test_fraction=config.truthfulqa_test_fraction,
                           pool_fraction=config.truthfulqa_pool_fraction, seed=config.seed)


def _is_csv(path: str) -> bool:
    return path.lower().endswith((".csv", ".csv.gz"))


def _chat_template(tokenizer, config: UnlearnConfig) -> ChatTemplate:
    """The config's ChatTemplate (its system turn and template variables), its errors naming the setting that asked
    for it."""
    try:
        return ChatTemplate(tokenizer, config.system, config.chat_template_kwargs)
    except ValueError as exc:
        raise ValueError(f"chat_template (--chat-template): {exc}; use the text template (--template) instead") \
            from None


def load_streams(config: UnlearnConfig, tokenizer, vocab_size: int | None = None) -> UnlearningStreams:
    """The forget, normal and mismatch streams the config describes, tokenized, padded with the id generation pads
    with (`pad_id`: one the model's `vocab_size` input embeddings hold, where given; a pad token added to the
    tokenizer without resizing them, the common Llama-2 recipe, was refused though padding is masked out).

    normal: a TruthfulQA .csv (its train split; its pool rows also feed the mismatch pool unless mismatch_pool is
    given) or a {prompt, answer} jsonl. mismatch_pool: a TruthfulQA .csv or a {prompt, answer} jsonl whose answers
    form the pool, less those that are answers of the normal pairs (and of a normal csv's test rows): the pool is
    kept apart from the normal data whichever files hold them. A stream whose weight is 0 is not loaded (its
    settings given a value are warned of). With chat_template, every example of the three streams is a user turn and
    an assistant turn in the tokenizer's chat template, after a system turn `system` when set, with the template
    variables chat_template_kwargs. With
    answer_eos, every answer of the three streams ends with the tokenizer's EOS id as an answer token (a chat
    template's own end-of-turn token instead, where it writes one; see encoding.answer_end_id).
    """
    _warn_of_settings_of_terms_left_out(config)
    template = _chat_template(tokenizer, config) if config.chat_template else TextTemplate(config.template)
    forget = [pair for path in config.forget for pair in load_pairs(path, config.forget_format)]
    normal_split = _truthfulqa(config, config.normal) if config.normal and _is_csv(config.normal) else None
    normal = pool = None
    if config.normal_weight > 0:
        if not config.normal:
            raise DataError("normal_weight > 0 needs a normal data file (normal=..., --normal FILE), or set "
                            "normal_weight=0 (--normal-weight 0)")
        normal = normal_split.normal_train if normal_split else load_pairs(config.normal, "jsonl")
    if config.mismatch_weight > 0 and config.mismatch_per_prompt > 0:
        if config.mismatch_pool and _is_csv(config.mismatch_pool):
            pool = _truthfulqa(config, config.mismatch_pool).mismatch_pool
        elif config.mismatch_pool:  # {prompt, answer} rows only: a forget-format file's answers are harmful ones
            pool = list(dict.fromkeys(p.answer for p in load_pairs(config.mismatch_pool, "jsonl")))   # distinct
        elif normal_split:
            pool = normal_split.mismatch_pool
        else:
            raise DataError("mismatch_weight > 0 needs a pool of normal answers: give mismatch_pool=... "
                            "(--mismatch-pool FILE) or a TruthfulQA .csv as normal (--normal), or set "
                            "mismatch_weight=0 (--mismatch-weight 0)")
        if not pool:   # only a TruthfulQA .csv gives none: a jsonl without rows or answers is refused as it loads
            raise DataError(f"{config.mismatch_pool or config.normal}: no mismatch pool answer: every answer of its "
                            f"pool rows (truthfulqa_pool_fraction={config.truthfulqa_pool_fraction}) is the Best "
                            "Answer of one of its normal rows; give other answers as mismatch_pool (--mismatch-pool "
                            "FILE), or set mismatch_weight=0 (--mismatch-weight 0) to train without the mismatch term")
        if config.mismatch_pool:   # a pool of its own: kept apart from the normal answers too, as a csv's own pool is
            normal_answers = {p.answer.strip() for p in (normal or []) + (normal_split.normal_test if normal_split
                                                                           else [])}
            pool = [a for a in pool if a.strip() not in normal_answers]
            if not pool:
                raise DataError(f"{config.mismatch_pool}: no mismatch pool answer: every one is the answer of a "
                                f"normal pair of {config.normal}, and the pool is kept apart from them; give other "
                                "answers as mismatch_pool (--mismatch-pool FILE), or set mismatch_weight=0 "
                                "(--mismatch-weight 0) to train without the mismatch term")

    def encode(pairs):
        return encode_pairs(tokenizer, template, pairs, config.max_length, skip_too_long=config.skip_long_prompts,
                            answer_eos=config.answer_eos)

    forget_examples = encode(forget)
    normal_examples = encode(normal) if normal else None
    pool_answers = encode_answers(tokenizer, template, pool, answer_eos=config.answer_eos) if pool else None
    if pool_answers and config.skip_long_prompts:   # else UnlearningStreams names the first one
        fit = mismatch_fit(forget_examples, pool_answers, config.max_length)
        forget_examples = [e for e, ok in zip(forget_examples, fit) if ok]
    skipped = {"forget": len(forget) - len(forget_examples),
               "normal": len(normal) - len(normal_examples) if normal else 0}
    for name, given, kept in (("forget", forget, forget_examples), ("normal", normal, normal_examples)):
        if given and not kept:
            raise DataError(f"every {name} example's prompt leaves no answer token within max_length="
                            f"{config.max_length}; raise max_length")
    return UnlearningStreams(
        forget_examples, normal=normal_examples,
        mismatch_pool=pool_answers, batch_size=config.batch_size, mismatch_per_prompt=config.mismatch_per_prompt,
        normal_batch_size=config.normal_batch_size, max_length=config.max_length,
        filler_id=pad_id(tokenizer, vocab_size), seed=config.seed, skipped=skipped)


def _warn_of_settings_of_terms_left_out(config: UnlearnConfig) -> None:
    """Warns of the settings, given a value, of a term that load_streams leaves out (its weight 0, or no mismatch
    answer per prompt): it reads no rows for it, and builds no reference without normal rows."""
    said = []
    mismatch_on = config.mismatch_weight != 0 and config.mismatch_per_prompt != 0
    if config.normal_weight == 0:
        # a TruthfulQA .csv still gives the mismatch term its pool, or keeps its normal answers out of one
        normal = () if mismatch_on and config.normal and _is_csv(config.normal) else ("normal",)
        # a cached reference still freezes the lm_head (its cache's storage is what has no effect)
        reference = ("reference_cache",) if config.reference_mode == "cached" else ("reference",)
        said += config.without_effect(normal + ("normal_batch_size",) + reference, "with normal_weight=0 "
                                      "(--normal-weight 0): no normal rows are drawn, and no reference is built for "
                                      "them")
    if config.mismatch_weight == 0:
        said += config.without_effect(("mismatch_per_prompt", "mismatch_pool"), "with mismatch_weight=0 "
                                      "(--mismatch-weight 0): no mismatch rows are drawn")
    elif not mismatch_on:
        said += config.without_effect(("mismatch_pool",), "with mismatch_per_prompt=0: no mismatch rows are drawn")
    for message in said:
        warnings.warn(message, stacklevel=3)


def load_model_and_tokenizer(config: UnlearnConfig):
    """The causal LM (bf16 weights for precision='bf16', fp32 otherwise; the attention implementation
    config.attn_implementation names, else transformers' default) and its fast tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    if not os.path.exists(config.model) and os.path.sep in config.model:
        raise FileNotFoundError(f"model not found: {config.model}")
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
    attention = {} if config.attn_implementation is None else {"attn_implementation": config.attn_implementation}
    try:
        tokenizer = load_tokenizer(config.model)
        return load_pretrained(AutoModelForCausalLM, config.model, dtype=dtype, **attention), tokenizer
    except OSError as e:  # a directory without weights, a name that is neither a directory nor a known model
        raise FileNotFoundError(f"model {config.model} cannot be loaded: {e}") from None
    except ValueError as e:
        if not attention:
            raise
        # flash_attention_2 without flash-attn installed, a name transformers does not know, a model without it
        raise ValueError(f"attn_implementation {config.attn_implementation!r}: {e}") from None


def run_unlearning(config: UnlearnConfig, *, accelerator: Any = None,
                   step_callback: Callable[[StepRecord], None] | None = None) -> RunSummary:
    """Loads, validates and trains; returns the trainer's RunSummary. A missing extra (MissingExtraError), and an
    output_dir that holds a finished or unresumed run or that another fastalign process is writing, are refused
    before the model and data load."""
    from fastalign.unlearn.checkpoint import resume_point
    from fastalign.unlearn.extras import require_extras
    from fastalign.unlearn.trainer import UnlearningTrainer

    require_extras(config)
    config.check_paths()
    with output_lock(config.output_dir, "output_dir (--output-dir)", directory=True, ranks_share=True):
        resume_point(config)
        model, tokenizer = load_model_and_tokenizer(config)
        streams = load_streams(config, tokenizer, input_vocabulary(model))
        return UnlearningTrainer(model, streams, config, tokenizer=tokenizer, accelerator=accelerator,
                                 step_callback=step_callback).train()
