"""`fastalign unlearn`: make a model stop answering harmful prompts, from harmful examples only.

Each option maps to one UnlearnConfig field; a --config file (JSON/YAML, same names) sets any of them and
options given on the command line win over it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields

from fastalign.cli import INTERRUPTED_HINTS, check_model_dir, template_kwargs_argument
from fastalign.config_files import read_config_file
from fastalign.ops.backend import BACKENDS
from fastalign.unlearn.config import PRECISIONS, UnlearnConfig
from fastalign.unlearn.formats import FORMATS
from fastalign.unlearn.lora_merge import MERGE_ERROR_WARNING
from fastalign.unlearn.packing import MODES as PACKING_MODES
from fastalign.unlearn.reference import CACHE_STORAGES, REFERENCE_MODES
from fastalign.writable import DiskFullError

DESCRIPTION = """\
Unlearning (Yao et al. 2023): gradient ascent on harmful answers (forget), gradient descent on the same
prompts paired with random normal answers (mismatch), and a KL term that keeps normal answers close to
the original model. Only answer tokens carry loss. The loss is fused: it never holds the [tokens x vocab]
logits in memory.

data formats:
  forget  jsonl: PKU-SafeRLHF rows (prompt, response_0/1, is_response_0/1_safe; unsafe responses are
          forgotten), Anthropic HH rows (chosen/rejected; the final Human turn and the rejected final
          Assistant turn) or plain {"prompt": ..., "answer": ...} rows; .jsonl.gz works too.
  normal  TruthfulQA.csv (Question + Best Answer; a held-out share of its rows supplies the mismatch
          answers) or plain {"prompt", "answer"} jsonl.

outputs in --output-dir: model/ (the unlearned model, LoRA merged, with its tokenizer), adapter/ (with
--lora: the unmerged PEFT adapter, the update exactly as trained; load it with PeftModel.from_pretrained(base,
"out/adapter") on the base model in the dtype it trained in; adapter_config.json names --model as the base only
where it is a Hub id, else null: no path of this machine), log.jsonl (one line every --log-every steps and
at the last: loss, forget NLL, mismatch NLL, normal KL, lr, tokens, FLOPs, seconds; a term turned off,
--mismatch-weight or --mismatch-per-prompt 0, --normal-weight 0, is null: not computed), run.json (summary, the
last step's line, and compute spent; with --lora, merge_rounding_error: the share of the update that merging it
into model/'s weights rounded away, warned of when large: see --precision), checkpoints/ (with --save-every;
continue a killed run with --resume). One process (or launched run) at a time writes an --output-dir: another
one started on it stops with an error.

examples:
  fastalign unlearn --model ./opt-1.3b --forget pku_train.jsonl --normal TruthfulQA.csv --output-dir out
  fastalign unlearn --config run.yaml --max-steps 200 --lora --precision bf16-mixed
  fastalign unlearn --config run.yaml --check      # load and validate everything, train nothing

several GPUs (the same command under accelerate; --batch-size is per process, the KL is averaged over the
normal tokens of all processes, checkpoints and model/ hold full weights; LoRA runs under DDP only):
  accelerate launch --num_processes 8 -m fastalign.cli unlearn --config run.yaml                  # DDP
  accelerate launch --num_processes 8 --use_fsdp --fsdp_version 2 \\
      --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP -m fastalign.cli unlearn --config run.yaml   # FSDP
  ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m fastalign.cli unlearn --config run.yaml   # CPUs (gloo)
(accelerate's own --gradient_accumulation_steps must stay 1: the trainer accumulates --grad-accum micro-batches)
"""


def _default(name):
    return next(f for f in fields(UnlearnConfig) if f.name == name).default


def _optional_float(text: str) -> float | None:
    """A number, or None for 'none' (argparse shows the ArgumentTypeError's message, not this function's name)."""
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def register(subparsers) -> argparse.ArgumentParser:
    """Adds the `unlearn` command to the `fastalign` parser."""
    p = subparsers.add_parser("unlearn", help="unlearn harmful answers from a causal LM (fine-tuning)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                              argument_default=argparse.SUPPRESS)
    add = p.add_argument
    add("--config", metavar="FILE", help="JSON or YAML file of settings (names as below, '_' or '-', and "
        f"truthfulqa_test_fraction, default {_default('truthfulqa_test_fraction')}, and truthfulqa_pool_fraction, "
        f"default {_default('truthfulqa_pool_fraction')}: the shares of TruthfulQA rows held out as test questions "
        "and as the mismatch answer pool, the pool's > 0 and the two's sum < 1); command-line options override it. "
        "Relative paths in it are read from the directory the command runs in, not the file's")
    add("--check", action="store_true", help="load the model and all data, report, and exit without training")

    g = p.add_argument_group("model and data").add_argument
    g("--model", metavar="PATH", help="local Hugging Face causal LM directory (weights + fast tokenizer)")
    g("--forget", metavar="FILE", nargs="+", help="harmful examples to forget (jsonl, see formats above)")
    g("--forget-format", choices=("auto",) + FORMATS, help="format of the forget files (default: auto, from "
      "the first row)")
    g("--normal", metavar="FILE", help="normal examples kept close to the original model (TruthfulQA .csv "
      "or jsonl)")
    g("--mismatch-pool", metavar="FILE", help="normal answers for the mismatch stream (TruthfulQA .csv or "
      "jsonl; of a .csv, the answers of its pool rows, the config's truthfulqa_pool_fraction, less its normal pairs' "
      "answers); default: the held-out rows of a TruthfulQA --normal")
    g("--output-dir", metavar="DIR", help="where model/, logs and checkpoints go")
    g("--template", help=f"text template with {{prompt}} and {{answer}} (default: {_default('template')!r}, whose "
      "\\n is a line break: in a shell, $'...\\n...' writes one, '...\\n...' a backslash and an n)")
    g("--chat-template", action=argparse.BooleanOptionalAction,
      help="render examples with the tokenizer's chat template instead of --template: the prompt as a user turn "
      "(after a --system turn), the answer as the assistant turn, read with one BOS as `fastalign eval --template "
      "chat` reads its prompts (default: off)")
    g("--system", metavar="TEXT", help="with --chat-template: a system turn before every example's user turn "
      "(forget, mismatch and normal alike), the one `fastalign eval --template chat --system TEXT` prompts with, "
      "so that the model is trained on the prompts it is evaluated on; an error if the chat template has no "
      "system role (default: none)")
    g("--chat-template-kwargs", type=template_kwargs_argument, metavar="JSON",
      help="with --chat-template: variables of the chat template as a JSON object, given to every rendering, the "
      "ones `fastalign eval --template chat --chat-template-kwargs JSON` prompts with. An example whose rendering "
      "puts more than whitespace between the generation prompt and the answer is an error, as the model would be "
      "trained on a prompt it is never asked with: Qwen3's template writes an empty reasoning block there that "
      "its generation prompt holds only with '{\"enable_thinking\": false}' (default: none)")
    g("--answer-eos", action=argparse.BooleanOptionalAction,
      help="end every answer (forget, mismatch and normal) with the tokenizer's end-of-sequence token, trained "
      "like the other answer tokens, so that unlearning keeps the model's chance of stopping after a normal "
      "answer (without it, answers may run on past their end). With --chat-template, a template that ends a "
      "turn with its own token (Llama-3's <|eot_id|>, <|im_end|>) has that end-of-turn token trained instead: "
      "the one the model emits and `fastalign eval` and `fastalign rain` stop at. Added as a token id, not as "
      "text; an error if the tokenizer has no EOS token where one is needed. If the template already puts the "
      "token after the answer (a chat template's end of turn), that one is trained instead of adding a "
      "second; otherwise it goes right after the answer, before the template's own end marker. An answer "
      "cut by --max-length gets none. (default: off, as SPEC §1's template has no end token)")
    g("--max-length", type=int, metavar="N", help=f"longest sequence in tokens; longer answers are cut (counted in "
      f"run.json's answers_cut, and by --check), a prompt that leaves no room is an error "
      f"(default: {_default('max_length')})")
    g("--skip-long-prompts", action=argparse.BooleanOptionalAction,
      help="leave out (and count in run.json) examples whose prompt leaves no answer token within --max-length, "
      "instead of stopping with an error naming the row (default: off)")

    g = p.add_argument_group("loss").add_argument
    g("--forget-weight", type=float, metavar="X", help=f"w_fgt, weight of gradient ascent on harmful answers "
      f"(default: {_default('forget_weight')})")
    g("--mismatch-weight", type=float, metavar="X", help=f"w_rdn, weight of the random-answer term "
      f"(default: {_default('mismatch_weight')}; 0 turns it off)")
    g("--normal-weight", type=float, metavar="X",
      help=f"w_nor, weight of the KL to the original model on normal answers "
      f"(default: {_default('normal_weight')}; 0 turns it off)")
    g("--mismatch-per-prompt", type=int, metavar="N", help=f"K, random normal answers per harmful prompt "
      f"(default: {_default('mismatch_per_prompt')})")
    g("--reference", choices=("auto",) + REFERENCE_MODES,
      help="original model for the KL term: copy = a frozen copy (one more model in memory); adapter = "
      "the LoRA model with its adapter off (needs --lora, no copy); cached = its hidden states on the "
      "normal set computed once up front (no copy; freezes the lm_head); auto = adapter with --lora, else "
      "copy (default)")
    g("--reference-cache", choices=CACHE_STORAGES,
      help="with --reference cached, where the cache lives: device = beside the model (default); host = in host "
      "memory, each batch's rows copied to the device as it trains (for a normal set whose cache, 4 bytes x "
      "hidden size per answer token in fp32, does not fit beside the model)")
    g("--packing", choices=PACKING_MODES,
      help="how the policy's forward lays out a batch: on = the rows merged into prefix trees along a few packed rows, "
      "so that a prompt its mismatch rows repeat and the padding are computed once or not at all (needs a model that "
      "takes position_ids and a 4-D mask, through sdpa or eager attention: checked once at the start; a batch whose "
      "longest row is longer than the model's attention window or chunk runs padded); off = padded rows; auto = "
      "packed where the model allows it and the estimate says it is cheaper (default)")

    g = p.add_argument_group("optimisation").add_argument
    g("--max-steps", type=int, metavar="N", help=f"optimizer steps (default: {_default('max_steps')})")
    g("--batch-size", type=int, metavar="N",
      help=f"harmful prompts per micro-batch and process; a step holds --grad-accum micro-batches "
      f"(default: {_default('batch_size')})")
    g("--normal-batch-size", type=int, metavar="N", help="normal examples per micro-batch and process "
      "(default: --batch-size)")
    g("--grad-accum", type=int, metavar="N", help="micro-batches accumulated per optimizer step (default: 1)")
    g("--lr", type=float, metavar="X", help=f"AdamW learning rate, linear decay to 0 (default: {_default('lr')})")
    g("--weight-decay", type=float, metavar="X",
      help="AdamW weight decay (default: 0.01, torch's default, as in the reference)")
    g("--max-forget-nll", type=_optional_float, metavar="X|none",
      help=f"stop early once the mean NLL of the harmful answers "
      f"exceeds this; 'none' never stops (default: {_default('max_forget_nll')})")
    g("--precision", choices=PRECISIONS, help="fp32; bf16-mixed (fp32 weights, bf16 compute); bf16 (bf16 "
      "weights and optimizer state, least memory; the weights step with KahanAdamW, which keeps the updates far "
      "below a bf16 weight's last place that rounding would drop, at 2 bytes a weight more. With "
      "--lora the adapters train in fp32 and adapter/ keeps their update, but merging it into model/'s bf16 "
      "weights rounds small updates (such as the default --lr gives) largely away too: run.json's "
      f"merge_rounding_error, warned of above {MERGE_ERROR_WARNING * 100:g}%%; serve adapter/ on the bf16 base "
      "model, or use bf16-mixed for a merged model/ that keeps the update) (default: fp32)")
    g("--attn-implementation", metavar="NAME",
      help="the model's attention implementation, as transformers names it: sdpa, eager, or flash_attention_2 "
      "(pip install 'fastalign[gpu]', for flash-attn; it computes padded batches without their padding) "
      "(default: transformers' choice for the model)")
    g("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
      help="recompute activations in the backward pass (less memory, ~30%% more compute) (default: off)")
    g("--optimizer-in-backward", action=argparse.BooleanOptionalAction,
      help="step AdamW on each weight as soon as the backward completes its gradient, then free it, so that the "
      "gradients of the whole model never exist at once (a model's size less memory at the step's peak; the same "
      "updates; one process and --grad-accum 1 only) (default: on where it can be, off under several processes, "
      "FSDP or --grad-accum above 1)")
    g("--grads-in-forward", action=argparse.BooleanOptionalAction,
      help="the fused losses take their gradients in the forward pass, from blocks of whole logits rows: one product "
      "with the lm_head fewer (a quarter of the cross-entropy's work, a third of the KL's), for a buffer of rows "
      "per loss call (at a 128k vocabulary in bf16 ~188 MiB for the cross-entropy, ~157 MiB for the KL; more past "
      "32 blocks of rows) and the gradients (the lm_head's too, where it trains) held from the forward to the backward "
      "(default: off)")
    g("--fused-layers", action=argparse.BooleanOptionalAction,
      help="the model's RMSNorms and gated MLPs (SwiGLU, GeGLU) run as fastalign's training ops: a norm keeps its "
      "input only for the backward, an MLP gate and up only (act(gate) * up is recomputed there), one kernel each way: "
      "nearly half a Llama layer's activation memory (default: on)")
    g("--seed", type=int, metavar="N",
      help="seed of data order, mismatch answers, a TruthfulQA file's split, LoRA initialisation and dropout "
           "(default: 0)")
    g("--backend", choices=BACKENDS, help="backend of the fused ops, the losses and the layers (default: auto)")

    g = p.add_argument_group("LoRA").add_argument
    g("--lora", action=argparse.BooleanOptionalAction,
      help="train a LoRA adapter (saved unmerged in adapter/ and merged into model/ at the end) (default: off)")
    g("--lora-rank", type=int, metavar="N", help=f"(default: {_default('lora_rank')})")
    g("--lora-alpha", type=float, metavar="X", help=f"(default: {_default('lora_alpha')})")
    g("--lora-dropout", type=float, metavar="X", help="(default: 0)")
    g("--lora-targets", nargs="+", metavar="MODULE", help="module names to adapt (default: q_proj v_proj)")

    g = p.add_argument_group("checkpoints and logging").add_argument
    g("--save-every", type=int, metavar="N", help="write a checkpoint every N steps (default: 0, none)")
    g("--keep-checkpoints", type=int, metavar="N", help="checkpoints kept (default: 2; 0 keeps all)")
    g("--resume", action=argparse.BooleanOptionalAction,
      help="continue the run in --output-dir from its latest checkpoint (default: off)")
    g("--log-every", type=int, metavar="N", help="write a log line every N steps (default: 1)")
    g("--progress", action=argparse.BooleanOptionalAction, help="show a progress bar (default: on)")
    p.set_defaults(func=main)
    return p


def config_from_args(args: argparse.Namespace) -> UnlearnConfig:
    """Defaults, then the --config file, then the options given on the command line."""
    given = {k: v for k, v in vars(args).items() if k not in ("config", "check", "func", "command")}
    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    return UnlearnConfig.from_dict({**values, **given}, origin=getattr(args, "config", "command line"))


def resume_hint(config: UnlearnConfig) -> str:
    """The --resume hint (an interrupted run's) for a run that failed with a checkpoint in its output directory to
    continue from, else ""."""
    from fastalign.unlearn.checkpoint import latest_checkpoint

    try:
        latest = latest_checkpoint(config.output_dir)
    except ValueError:   # `latest` names no complete checkpoint: none to continue from
        return ""
    return f"; {INTERRUPTED_HINTS['unlearn']} ({latest})" if latest else ""


def end_process_group():
    """Under `accelerate launch` the command owns the process: it ends the process group the trainer's Accelerator
    started, which left to the interpreter's exit can abort the process after a finished run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True except in the ranks other than 0 of a launcher's processes (RANK set by accelerate or torchrun):
    the report is printed once, so that the command's stdout stays one JSON object."""
    return os.environ.get("RANK", "0") == "0"


def main(args: argparse.Namespace) -> int:
    from fastalign.data_files import DataError
    from fastalign.model_vocabulary import input_vocabulary
    from fastalign.unlearn.checkpoint import resume_point
    from fastalign.unlearn.extras import MissingExtraError, require_extras
    from fastalign.unlearn.packing import RowPacker
    from fastalign.unlearn.run import load_model_and_tokenizer, load_streams, run_unlearning
    from fastalign.unlearn.trainer import UnlearningTrainer

    try:
        config = config_from_args(args)
        if config.model:   # a local checkpoint: another name would have transformers retry the Hub
            check_model_dir(config.model, "--model")
        if getattr(args, "check", False):
            require_extras(config)
            config.check_paths()
            resume_point(config)
            model, tokenizer = load_model_and_tokenizer(config)
            streams = load_streams(config, tokenizer, input_vocabulary(model))
            # the run's own checks of the model, the data against it, the launch, the LoRA targets and the backend on
            # the accelerator's device: the trainer makes them as it is built, and writes nothing before train()
            UnlearningTrainer(model, streams, config, tokenizer=tokenizer)
            packer = RowPacker(model, config.packing)   # --packing on: an error for a model it is not exact for
            if is_main_process():
                print(json.dumps({"model": type(model).__name__, "forget": len(streams.forget),
                                  "normal": len(streams.normal), "mismatch_pool": len(streams.pool),
                                  "skipped": streams.skipped, "answers_cut": streams.answers_cut,
                                  # (none built without normal rows: --normal-weight 0)
                                  "reference": config.reference_mode if streams.normal else None,
                                  "packing": config.packing,
                                  "packing_unavailable": packer.unavailable}, indent=1))
            return 0
        summary = run_unlearning(config)
    except (DataError, ValueError, FileNotFoundError, FileExistsError, TypeError, FloatingPointError, MissingExtraError,
            NotImplementedError) as e:   # the last: a model or setting the fused path does not serve
        print(f"fastalign unlearn: error: {e}", file=sys.stderr)
        return 2
    except DiskFullError as e:   # a checkpoint, log line, model/ or run.json that did not fit
        print(f"fastalign unlearn: error: {e}{resume_hint(config)}", file=sys.stderr)
        return 2
    finally:
        end_process_group()
    if is_main_process():
        print(json.dumps({"steps": summary.steps, "stop_reason": summary.stop_reason,
                          "model_dir": summary.model_dir, "adapter_dir": summary.adapter_dir,
                          "merge_rounding_error": summary.merge_rounding_error,
                          "packing_unavailable": summary.packing_unavailable,
                          "optimizer": summary.optimizer, "optimizer_in_backward": summary.optimizer_in_backward,
                          "compute": summary.compute},
                         indent=1))
    return 0
