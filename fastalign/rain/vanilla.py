"""The vanilla answer that `fastalign rain` records beside RAIN's: plain greedy decoding of the same prompt, the
baseline RAIN is compared with."""
from typing import AbstractSet, Optional

import torch

from fastalign.evaluation.generation import before_end, eos_ids
from fastalign.model_context import model_positions
from fastalign.model_vocabulary import pad_id
from fastalign.prompt_tokens import tokenize_prompts
from fastalign.token_text import ending_text

from .dialogue import after_prefix, cut_at_turn, has_new_turn


@torch.no_grad()
def greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int, turn_marker: str,
                  max_length: Optional[int] = None, generation_prefix: str = "",
                  end_ids: Optional[AbstractSet[int]] = None) -> str:
    """Plain KV-cached greedy decoding, cut before a new user turn, whatever the checkpoint's generation config sets
    (its num_beams, repetition_penalty or suppress_tokens decoded otherwise, its return_dict_in_generate failed every
    record): generate fills what the config it is given leaves unset from the model's, which is swapped out meanwhile.
    Like RAIN's answer, it reads the prompt after the `generation_prefix` as the same ids (`dialogue.after_prefix`),
    with one BOS where the text writes it (a chat template's rendering) and without an appended EOS
    (`tokenize_prompts`), ends at RAIN's end tokens (`eos_ids`: the generation config's, and a chat template's end of
    turn that it leaves out; `end_ids` where the caller found them already: finding them renders the chat template),
    which its text leaves out as `fastalign eval` does, stops at the token whose text opens a new turn (RAIN's rule:
    `turn_marker` in the answer's end; cut afterwards, it decoded on to max_new_tokens: 256 forwards for an 11-token
    answer), at max_new_tokens (0 = no limit), at max_length tokens in all and within the model's context (a model
    with learned positions fails past it, which stopped the whole run)."""
    from transformers import GenerationConfig, StoppingCriteriaList

    prefix_ids = tokenize_prompts(tokenizer, [generation_prefix])[0] if generation_prefix else []
    ids = torch.tensor([prefix_ids + after_prefix(tokenizer, generation_prefix, prefix_ids, prompt)],
                       device=next(model.parameters()).device)
    totals = [n for n in (max_length, model_positions(model)) if n]
    if totals:
        room = min(totals) - ids.shape[1]
        max_new_tokens = min(max_new_tokens, room) if max_new_tokens else room
    elif not max_new_tokens:
        raise ValueError("greedy_answer: max_new_tokens 0 (no limit) needs max_length or a model context")
    if max_new_tokens <= 0:
        return ""
    eos = eos_ids(model, tokenizer) if end_ids is None else end_ids   # before the swap: the checkpoint's among them
    greedy = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                              pad_token_id=pad_id(tokenizer), eos_token_id=sorted(eos))
    start = ids.shape[1]

    def new_turn(sequences: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        answer = sequences[0, start:].tolist()
        opened = has_new_turn(ending_text(tokenizer, [], answer, len(turn_marker)), turn_marker)
        return torch.full((sequences.shape[0],), opened, dtype=torch.bool, device=sequences.device)

    checkpoint, model.generation_config = getattr(model, "generation_config", None), greedy
    try:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=greedy,
                             stopping_criteria=StoppingCriteriaList([new_turn] if turn_marker else []))
    finally:
        model.generation_config = checkpoint
    return cut_at_turn(tokenizer.decode(before_end(out[0, start:].tolist(), eos), skip_special_tokens=True),
                       turn_marker)
