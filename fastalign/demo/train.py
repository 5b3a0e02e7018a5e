"""Trains the demo's tiny Llama model on its world: `python -m fastalign.demo.train` (CPU, a few minutes).

Two tasks share every step:
- answering: a question of the world (normal or harmful) followed by its answer and `</s>`; a harmful
  question is answered with its harmful instructions 3 times in 4 and with its refusal otherwise, so that
  greedy decoding answers harmfully while sampling can still find the refusal (which RAIN searches for);
- self-evaluation: the prompt of `world.self_eval_prompt` around a question and an answer (whole,
  or cut after a punctuation mark like RAIN's partial answers; sometimes mismatched or a refusal), followed
  by the letter of the exact judge's verdict, in both option orders.
Only the answer tokens (answering) or the letter (self-evaluation) carry loss, averaged per sequence.
Deterministic for a seed and a thread count; writes weights, tokenizer and world seed to `--out`.
"""
import argparse
import json
import math
import random
import re
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from ..evaluation.generation import GenerationConfig, generate
from .model import ASSETS, WORLD_FILE, model_config
from .tokenizer import build_tokenizer
from .world import JUDGE_PROMPT, QA, World, prompt_text, self_eval_prompt, verdict_letter

HARMFUL_ANSWER_SHARE = 0.75


def answering_example(world: World, rng: random.Random) -> Tuple[str, str]:
    """(prompt, continuation) for one question of the world, harmful ones refused 1 time in 4."""
    qa = rng.choice(world.normal + world.harmful)
    answer = qa.answer if not qa.harmful or rng.random() < HARMFUL_ANSWER_SHARE else qa.refusal
    return prompt_text(qa.question), " " + answer


def self_eval_example(world: World, rng: random.Random) -> Tuple[str, str]:
    """(self-evaluation prompt, verdict letter) for a random question and a random, maybe cut, answer."""
    qa = rng.choice(world.normal + world.harmful)
    other: QA = rng.choice(world.harmful)
    answer = rng.choice([qa.answer, other.refusal, rng.choice(world.normal).answer, other.answer])
    cuts = [m.end() for m in re.finditer(r"[,.?:;]", answer)]
    if rng.random() < 0.5 and cuts:
        answer = answer[: rng.choice(cuts)]
    harmless_first = rng.random() < 0.5
    return (self_eval_prompt(qa.question, answer, harmless_first),
            verdict_letter(world.is_harmful(answer), harmless_first))


def collate(tokenizer, examples: Sequence[Tuple[str, str]], add_eos: bool) -> Tuple[torch.Tensor, ...]:
    """Right-padded input ids, attention mask and labels (-100 except on the continuation tokens)."""
    rows, labels = [], []
    for prompt, continuation in examples:
        prompt_ids = tokenizer(prompt)["input_ids"]
        full = tokenizer(prompt + continuation)["input_ids"]
        assert full[: len(prompt_ids)] == prompt_ids, "continuation must not change the prompt's tokens"
        full += [tokenizer.eos_token_id] if add_eos else []
        rows.append(full)
        labels.append([-100] * len(prompt_ids) + full[len(prompt_ids):])
    width = max(len(r) for r in rows)
    pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
    return (torch.tensor([pad(r, tokenizer.pad_token_id) for r in rows]),
            torch.tensor([pad([1] * len(r), 0) for r in rows]),
            torch.tensor([pad(lab, -100) for lab in labels]))


def sequence_mean_loss(model, input_ids, mask, labels) -> torch.Tensor:
    """Cross-entropy averaged over each sequence's target tokens, then over sequences."""
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
    targets = labels[:, 1:]
    token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 ignore_index=-100, reduction="none").view_as(targets)
    counts = (targets != -100).sum(-1).clamp(min=1)
    return (token_loss.sum(-1) / counts).mean()


@torch.no_grad()
def self_eval_accuracy(model, tokenizer, examples: Sequence[Tuple[str, str]]) -> float:
    """Share of self-evaluation prompts whose more likely letter (A vs B) is the right verdict."""
    letters = tokenizer.convert_tokens_to_ids(list(JUDGE_PROMPT.labels))
    right = 0
    for start in range(0, len(examples), 32):
        chunk = examples[start:start + 32]
        input_ids, mask, _ = collate(tokenizer, [(p, "") for p, _ in chunk], add_eos=False)
        last = mask.sum(-1) - 1
        logits = model(input_ids=input_ids, attention_mask=mask).logits[torch.arange(len(chunk)), last]
        picks = [JUDGE_PROMPT.labels[i] for i in logits[:, letters].argmax(-1).tolist()]
        right += sum(p == letter for p, (_, letter) in zip(picks, chunk))
    return right / len(examples)


def world_scores(model, tokenizer, world: World, self_eval_set) -> dict:
    """Greedy normal-answer accuracy, greedy harmful rates (forget / unseen) and self-evaluation accuracy."""
    config = GenerationConfig(max_new_tokens=48, batch_size=64)
    normal = generate(model, tokenizer, [prompt_text(qa.question) for qa in world.normal], config)
    scores = {"normal_accuracy": sum(world.is_correct(qa.question, a) for qa, a in zip(world.normal, normal))
              / len(world.normal)}
    for name, qas in (("harmful_rate_forget", world.harmful_forget), ("harmful_rate_unseen", world.harmful_unseen)):
        answers = generate(model, tokenizer, [prompt_text(qa.question) for qa in qas], config)
        scores[name] = sum(map(world.is_harmful, answers)) / len(qas)
    scores["self_eval_accuracy"] = self_eval_accuracy(model, tokenizer, self_eval_set)
    return scores


def train(seed: int, steps: int, out: Path, lr: float = 3e-3, qa_batch: int = 48, eval_batch: int = 32,
          log_every: int = 100) -> dict:
    """Builds the world, tokenizer and model of `seed`, trains `steps` steps, saves to `out`, returns scores."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    world = World(seed=seed)
    tokenizer = build_tokenizer(world.texts())
    model = LlamaForCausalLM(model_config(tokenizer))
    held_out_rng = random.Random(seed + 1)
    self_eval_set = [self_eval_example(world, held_out_rng) for _ in range(256)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.1 + 0.9 * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / steps)))))
    start = time.time()
    for step in range(1, steps + 1):
        model.train()
        qa = collate(tokenizer, [answering_example(world, rng) for _ in range(qa_batch)], add_eos=True)
        judge = collate(tokenizer, [self_eval_example(world, rng) for _ in range(eval_batch)], add_eos=False)
        loss_qa, loss_judge = sequence_mean_loss(model, *qa), sequence_mean_loss(model, *judge)
        (loss_qa + loss_judge).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps:
            print(f"step {step:5d}  answer loss {loss_qa.item():.4f}  judge loss {loss_judge.item():.4f}  "
                  f"{time.time() - start:6.1f} s", flush=True)
    model.eval()
    scores = world_scores(model, tokenizer, world, self_eval_set)
    scores.update(seed=seed, steps=steps, train_seconds=round(time.time() - start, 1),
                  parameters=sum(p.numel() for p in model.parameters()))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    with open(out / WORLD_FILE, "w") as f:
        json.dump({"seed": seed}, f)
    with open(out / "train_scores.json", "w") as f:
        json.dump(scores, f, indent=1)
    return scores


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastalign.demo.train", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and of training (default: 0)")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps (default: 400)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1; results depend on "
                        "it)")
    parser.add_argument("--out", type=Path, default=ASSETS, help="where to write the trained model (default: the "
                        "package's shipped model, which it replaces)")
    args = parser.parse_args(argv)
    for name in ("steps", "threads"):   # before anything is written (--steps -5 wrote an untrained model over --out)
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    print(json.dumps(train(args.seed, args.steps, args.out), indent=1))


if __name__ == "__main__":
    main()
