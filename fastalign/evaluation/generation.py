"""Batched generation for any Hugging Face causal LM: left padding, one KV cache per batch, stop rules.

A batch is left-padded so that every row's last prompt token sits in the last column; position ids count
only real tokens, so a row computes the same thing as it would alone. A model whose logits padding changes (RWKV
reads no attention mask, and its pads run through its state; Pegasus and Marian place their sinusoidal positions by
the sequence's length), found by one small probe per call, runs the prompts of each batch that have one token length
together instead, so that an answer never depends on the batch. Each step feeds one new token per row
on top of the cache. A row stops at an end-of-sequence token (the tokenizer's, or any the model's generation
config lists, as `model.generate` does), at `max_new_tokens`, or as soon as its text contains one of
`stop_strings` (the answer is cut before it). Greedy decoding picks the arg-max; sampling draws from
softmax(logits / temperature), optionally restricted to the top k, with one generator per prompt seeded from
(seed, the prompt's index), so that an answer depends neither on the batch size nor on the other prompts.

`generations` returns, beside each answer's text, the token ids behind it (the prompt as generation read it,
the answer as the model wrote it, through the token that ended it), so that a metric can score exactly the
sequence the model produced; `generate` returns the texts alone.
"""
import math
import random
from dataclasses import dataclass
from typing import AbstractSet, Iterator, List, Optional, Sequence, Set, Tuple

import torch

from fastalign.eval_mode import eval_mode
from fastalign.model_context import model_positions
from fastalign.model_devices import input_device
from fastalign.model_vocabulary import check_embedded, input_vocabulary, pad_id, probe_ids
from fastalign.ops.checks import check_seed, is_integer, refuse_one_string
from fastalign.runtime.hf_cache_argument import (cache_kwargs, prefix_start, refuse_prompt_adapter_over_a_cache,
                                                 returned_cache, takes_logits_to_keep)
from fastalign.prompt_templates import end_of_turn_id
from fastalign.prompt_tokens import tokenize_prompts
from fastalign.token_text import CONTEXT, ending_text, text_after
from fastalign.unlearn.models import function_source


@dataclass(frozen=True)
class Generation:
    """One generated answer. `text`: special tokens dropped, cut before any stop string. `prompt_ids`: the
    prompt's tokens as generation read them. `answer_ids`: every token the model wrote for the answer, through
    the one that ended it: the end token (EOS, a chat template's end of turn) when it stopped on one, the token
    that completed a stop string when it stopped on that (the text is cut before it), none when it ran out of
    max_new_tokens. Re-tokenizing prompt + text would not give these ids back in general (BPE merges across
    the boundary, SentencePiece's leading space), nor any end token."""
    text: str
    prompt_ids: Tuple[int, ...]
    answer_ids: Tuple[int, ...]


@dataclass(frozen=True)
class GenerationConfig:
    """How answers are generated; the defaults are greedy decoding of at most 64 tokens."""
    max_new_tokens: int = 64
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    stop_strings: Tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self):
        for name, least in (("max_new_tokens", 1), ("batch_size", 1), ("top_k", 0)):   # (top_k 0: no limit)
            value = getattr(self, name)
            if not is_integer(value):   # 16.0 failed inside generation, naming no setting
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if value < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        # as RainConfig's and UnlearnConfig's: each prompt's generator is seeded from the text f"{seed}:{i}", where
        # 1.0, True and "1" drew otherwise than 1, and None, -1 or 2**70 were taken
        object.__setattr__(self, "seed", check_seed("seed", self.seed))
        if self.do_sample and not 0 < self.temperature < math.inf:   # inf: every logit 0, a uniform draw; NaN
            raise ValueError(f"temperature must be a finite number > 0 when sampling, got {self.temperature}")
        refuse_one_string("stop_strings", self.stop_strings)   # "Human:" would be the stop strings H, u, m, a, ...
        for stop in self.stop_strings:   # (None failed inside generation, naming no setting)
            if not isinstance(stop, str):
                raise ValueError(f"stop_strings must hold strings, got {stop!r}")


def encode_prompts(tokenizer, prompts: Sequence[str], max_new_tokens: int, model) -> List[List[int]]:
    """Token ids of every prompt, with one BOS also where the prompt text writes it (a chat template's
    rendering) and no EOS appended (see tokenize_prompts); ValueError naming the first prompt that leaves no room
    to answer, or holds a token id the model has no input embedding for."""
    refuse_one_string("prompts", prompts)
    ids = tokenize_prompts(tokenizer, prompts) if prompts else []
    limit, vocab = model_positions(model), input_vocabulary(model)
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"prompt {i} is empty after tokenization")
        check_embedded(row, vocab, f"prompt {i}")
        if limit is not None and len(row) + max_new_tokens > limit:
            raise ValueError(f"prompt {i} has {len(row)} tokens; with max_new_tokens={max_new_tokens} it "
                             f"exceeds the model's context of {limit} positions ({prompts[i][:60]!r}...)")
    return ids


def eos_ids(model, tokenizer) -> Set[int]:
    """The tokens that end an answer: the tokenizer's end of sequence, every one the model's generation
    config lists (e.g. Gemma's end-of-turn token beside its `<eos>`), as `model.generate` stops, and the end of
    an assistant turn in the tokenizer's chat template, which some chat models' configs leave out (the first
    Llama-3-Instruct release listed only <|end_of_text|>, not <|eot_id|>)."""
    listed = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = {tokenizer.eos_token_id, end_of_turn_id(tokenizer),
           *(listed if isinstance(listed, (list, tuple)) else [listed])}
    return {i for i in ids if i is not None}


def before_end(ids: Sequence[int], eos: AbstractSet[int]) -> List[int]:
    """The answer's tokens in `ids`: those before the first end token (of `eos`), which ends the answer and is no
    part of its text, as `generate` leaves it out (decoding with skip_special_tokens drops only a special one, and a
    generation config may list a plain token, one added with add_tokens)."""
    ids = list(ids)
    return next((ids[:at] for at, token in enumerate(ids) if token in eos), ids)


def _prompt_generators(seed: int, first: int, count: int) -> List[torch.Generator]:
    """The sampling generators of prompts first..first+count-1: each seeded from (seed, its index) alone."""
    return [torch.Generator().manual_seed(random.Random(f"{seed}:{i}").getrandbits(63))
            for i in range(first, first + count)]


def _next_tokens(logits: torch.Tensor, config: GenerationConfig, generators: List[torch.Generator]) -> torch.Tensor:
    if not config.do_sample:
        return logits.argmax(-1)
    # softmax(logits / T) as (logits - max) / T, the top logits 0 whatever T: at a tiny T (1e-40, or 1e-300, 0 in
    # fp32) logits / T are +-inf and the softmax NaN; this way the others go to -inf, the limit's greedy draw
    logits = logits.float()
    shifted = logits - logits.max(-1, keepdim=True).values
    logits = torch.where(shifted == 0, 0.0, shifted / config.temperature)
    if config.top_k:
        kth = logits.topk(min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1).cpu()
    return torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generators)]).to(logits.device)


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> Tuple[str, bool]:
    cuts = [text.find(s) for s in stop_strings if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _no_mask_when_cached(model_class) -> bool:
    """Whether transformers' generate gives a model of this class no attention mask once it has a cache (Mamba's:
    its mixers multiply their inputs by the mask, which would stretch the new token over the whole sequence and
    gave answers the model does not write); its prepare_inputs_for_generation says so."""
    prepare = getattr(model_class, "prepare_inputs_for_generation", None)
    return prepare is not None and 'model_inputs["attention_mask"] = None' in (function_source(prepare) or "")


def _last_logits_only(model) -> dict:
    """The forward's argument that computes the last position's logits alone (the only ones read), if it takes it."""
    return dict(logits_to_keep=1) if takes_logits_to_keep(model) else {}


def _prompt_forward(model, tokenizer, rows: List[List[int]]):
    """(the model decoding steps run, token ids, attention mask, position ids, its outputs with a cache) of `rows`
    left-padded into one batch, every row's last token in the last column, its positions counting its real tokens
    alone. A prefix-tuned PEFT model's runs on the model it wraps, over a cache that starts with the prefix's K/V
    (prefix_start), with the prefix's ones before each row's mask and its length added to the positions."""
    device = input_device(model, "generation")
    width, pad = max(len(r) for r in rows), pad_id(tokenizer, input_vocabulary(model))
    sequence = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    runner, start, prefix = prefix_start(model, len(rows))
    mask = torch.tensor([[1] * prefix + [0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    positions = prefix + (mask[:, prefix:].cumsum(-1) - 1).clamp(min=0)
    out = runner(input_ids=sequence, attention_mask=mask, position_ids=positions, use_cache=True, **start,
                 **_last_logits_only(runner))
    return runner, sequence, mask, positions, out


@torch.no_grad()
def pads_exactly(model, tokenizer) -> bool:
    """Whether a prompt's next-token logits left-padded in a batch (as generation pads it) are its logits alone,
    within rounding of the model's dtype: not for a model that reads no attention mask (RWKV: the pads run through
    its state) or places its positions by the sequence's length (Pegasus', Marian's sinusoidal ones), whose answers
    then depended on the batch. One forward of 2 rows (2 and 4 tokens) and one of the short row alone."""
    # imported here: hf_cache imports transformers, which building the CLI's parser (rain/cli.py imports this module)
    # must not load (tests/test_cli.py)
    from fastalign.runtime.hf_cache import agree_within_rounding

    short, long = probe_ids(model, [1, 0]), probe_ids(model, [2, 3, 1, 1])
    padded = _prompt_forward(model, tokenizer, [short, long])[-1].logits[0, -1]
    alone = _prompt_forward(model, tokenizer, [short])[-1].logits[0, -1]
    return agree_within_rounding(model.dtype, alone, (padded, alone))


def _generate_rows(model, tokenizer, rows: List[List[int]], config: GenerationConfig, eos: Set[int],
                   generators: List[torch.Generator], padding_is_exact: bool) -> List[Generation]:
    """The Generations of `rows` (in their order): in one batch where padding is exact or needs none, else the rows
    of each token length in a batch of their own, which pads nothing."""
    lengths = [len(r) for r in rows]
    if padding_is_exact or len(set(lengths)) == 1:
        return _generate_batch(model, tokenizer, rows, config, eos, generators)
    result: List[Optional[Generation]] = [None] * len(rows)
    for length in set(lengths):
        at = [i for i, n in enumerate(lengths) if n == length]
        for i, generation in zip(at, _generate_batch(model, tokenizer, [rows[i] for i in at], config, eos,
                                                     [generators[i] for i in at])):
            result[i] = generation
    return result


@torch.no_grad()
def _generate_batch(model, tokenizer, rows: List[List[int]], config: GenerationConfig, eos: Set[int],
                    generators: List[torch.Generator]) -> List[Generation]:
    model, sequence, mask, positions, out = _prompt_forward(model, tokenizer, rows)
    last = _last_logits_only(model)
    generated: List[List[int]] = [[] for _ in rows]
    ended_by: List[Tuple[int, ...]] = [() for _ in rows]   # the end token a row stopped on, if any
    done = [False] * len(rows)
    longest = max(map(len, config.stop_strings), default=0)
    for step in range(config.max_new_tokens):
        next_ids = _next_tokens(out.logits[:, -1, :], config, generators)
        for i, token in enumerate(next_ids.tolist()):
            if done[i]:
                continue
            if token in eos:
                done[i], ended_by[i] = True, (token,)
                continue
            generated[i].append(token)
            if config.stop_strings:   # on the text the answer will be: decoded alone, a SentencePiece first
                # word loses its space, and a stop string that starts with one is missed there (the prompt's last
                # tokens give that context; the whole prompt, decoded at every step, cost O(prompt) per token).
                # No stop string was found before this token, so a new one ends in its text: only the answer's end
                # is read (the whole answer, decoded at every step, cost O(answer) per token)
                text = ending_text(tokenizer, rows[i][-CONTEXT:], generated[i], longest)
                done[i] = _cut_at_stop(text, config.stop_strings)[1]
        if all(done) or step + 1 == config.max_new_tokens:
            break
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        sequence = torch.cat([sequence, next_ids[:, None].to(sequence.device)], dim=1)
        cache = returned_cache(out)
        if cache is None:   # a cache the forward does not hand back (RWKV's state, RecurrentGemma's kept inside)
            # cannot be passed on: the whole sequence runs again, or each step would see its last token alone
            out = model(input_ids=sequence, attention_mask=mask, position_ids=positions, use_cache=False, **last)
        else:
            step_mask = None if _no_mask_when_cached(type(model)) else mask
            out = model(input_ids=next_ids[:, None], attention_mask=step_mask, position_ids=positions[:, -1:],
                        use_cache=True, **cache_kwargs(model, cache))
    return [Generation(_cut_at_stop(text_after(tokenizer, row, ids), config.stop_strings)[0], tuple(row),
                       tuple(ids) + end)
            for row, ids, end in zip(rows, generated, ended_by)]


def check_stop_strings(tokenizer, stop_strings: Sequence[str]) -> None:
    """ValueError for a stop string holding a special token's text: answers are decoded without special tokens, so
    it never showed and never stopped an answer ('<|im_start|>' ran to max_new_tokens)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    special = {t for t in getattr(tokenizer, "all_special_tokens", ()) if t} | {t.content for t in added if t.special}
    for stop in stop_strings:
        held = sorted(t for t in special if t in stop)
        if held:
            raise ValueError(f"stop string {stop!r} holds the special token {held[0]!r}, which answers are decoded "
                             "without: it would never stop one (the model's end-of-turn and EOS tokens end answers "
                             "already)")


def iter_generations(model, tokenizer, prompts: Sequence[str],
                     config: GenerationConfig = GenerationConfig()) -> Iterator[Tuple[int, List[Generation]]]:
    """Yields (index of the batch's first prompt, the batch's Generations), batch after batch.

    Every prompt is tokenized and checked against the context first, so a too-long prompt fails before
    any compute is spent; so is a PEFT adapter that puts virtual tokens before the inputs (prompt tuning, P-tuning),
    which a forward per new token over the KV cache would prepend again at every step. A prefix-tuned (or cartridge)
    model decodes over a cache that starts with the prefix's K/V (see _prompt_forward).
    """
    refuse_prompt_adapter_over_a_cache(model, "generation")
    check_stop_strings(tokenizer, config.stop_strings)
    rows = encode_prompts(tokenizer, prompts, config.max_new_tokens, model)
    eos = eos_ids(model, tokenizer)   # once per call: finding a chat template's end of turn renders it
    starts = range(0, len(rows), config.batch_size)
    # the model is in eval mode (every module's own mode back afterwards) for the probe and each batch's generation,
    # never across a yield: the caller's loop body (a training step on each batch) runs in the mode the caller set,
    # and a mode it sets there neither changes the next batches' answers nor is undone when the loop ends
    with eval_mode(model):
        # probed once, where some batch is padded; a model that pads exactly runs each batch as one
        padding_is_exact = all(len({len(r) for r in rows[s:s + config.batch_size]}) == 1 for s in starts) or \
            pads_exactly(model, tokenizer)
    for start in starts:
        batch = rows[start:start + config.batch_size]
        with eval_mode(model):
            generated = _generate_rows(model, tokenizer, batch, config, eos,
                                       _prompt_generators(config.seed, start, len(batch)), padding_is_exact)
        yield start, generated


def iter_generate(model, tokenizer, prompts: Sequence[str],
                  config: GenerationConfig = GenerationConfig()) -> Iterator[Tuple[int, List[str]]]:
    """Yields (index of the batch's first prompt, answer texts of the batch), batch after batch."""
    for start, batch in iter_generations(model, tokenizer, prompts, config):
        yield start, [g.text for g in batch]


def generations(model, tokenizer, prompts: Sequence[str],
                config: GenerationConfig = GenerationConfig()) -> List[Generation]:
    """The Generation (answer text and the token ids behind it) of every prompt."""
    return [g for _, batch in iter_generations(model, tokenizer, prompts, config) for g in batch]


def generate(model, tokenizer, prompts: Sequence[str],
             config: GenerationConfig = GenerationConfig()) -> List[str]:
    """The answer text generated for every prompt (special tokens dropped, cut before any stop string)."""
    return [g.text for g in generations(model, tokenizer, prompts, config)]
