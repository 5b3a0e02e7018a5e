"""Benchmark of one unlearning step (forward + backward + the trainer's AdamW: KahanAdamW on bf16 weights, one kernel
a parameter on CUDA) of a Llama-architecture model on the same batch (2 harmful prompts, K=5 mismatch answers each,
2 normal examples), nine ways:

- fastalign:          one policy forward (rows packed into prefix trees where the estimate says it pays: each
                      prompt computed once for its forget and mismatch rows, no padding), fused signed CE + fused
                      KL on the answer tokens, frozen copy in the model's dtype, each weight stepped by AdamW as
                      the backward completes its gradient (the trainer's default in one process: the model's
                      gradients never all exist at once);
- unfused baseline:   a well-written plain-torch step: dynamic padding, model dtype, one forward returning
                      the full logits, vectorised weighted CE and KL (fp32) on the answer targets' rows, frozen
                      copy;
- unfused, answer rows only: the same, but the lm_head applied only to the final hidden states at the answer
                      targets (the logits of those rows still materialised): the strongest plain-torch way;
- reference recipe:   the published code's shape: every row padded to max length, separate forwards for the
                      forget / mismatch / normal rows, a per-sample Python loss loop, KL over every position
                      (padding included) against an fp32 copy;
- fastalign cached:   fastalign with the reference hidden states of the normal set cached up front (no
                      reference model; lm_head frozen);
- fastalign, padded rows: fastalign with packing off (what packing alone changes);
- fastalign, AdamW after backward: fastalign with AdamW's step after the backward (optimizer_in_backward=False:
                      the model's gradients all held at the step's end, as under accumulation or several processes);
- fastalign, grads in forward: fastalign with the fused losses' gradients taken in their forward pass
                      (grads_in_forward: one product with the lm_head fewer);
- fastalign, unfused layers: fastalign without fused_layers (the model's own RMSNorm and MLP modules, which
                      keep fp32 copies of the norms' inputs, act(gate) and the product for the backward).
Each row also gives the rows x width of its policy forwards (`grid`, padding included) and their positions (`slots`).
`--preset 8b` instead runs the 8B-class model the ways that fit one GPU: LoRA with the adapter-disabled
reference, and full weights with the cached reference (gradient checkpointing on);
peak memory reported.

Weights are random (configs only, nothing downloaded): speed and memory do not depend on their values.
Median step time after a first step that warms up and records the loss and the norm of each parameter's gradient
(the same policy and reference in every way: the ways that compute SPEC §1 must agree on both, the reference recipe
computes its own objective); peak memory =
torch.cuda.max_memory_allocated over the steps (model, optimizer state, activations: everything), CUDA only;
step extra = the peak of one more step beyond what is allocated between steps (model, reference, optimizer
state): the working memory of the step itself (activations, logits, loss buffers), which is what fusing the
losses changes; with weights and AdamW state in the total, a small batch's logits are a small part of it (on a CPU,
from the profiler's allocations and frees: harness.peak_extra_mib);
held = what autograd keeps for the backward of one more step (each storage once, what existed before it aside), on
any device: the activations that packing and the training layers (fused_layers) cut; GPU busy = the kernels' time in
one more step over the step's time, CUDA only: well under 100%, the step waits for the host's launches.

    python bench/bench_unlearn.py                  # Llama-3.2-1B shape, bf16, CUDA
    python bench/bench_unlearn.py --preset 8b      # Llama-3-8B shape, bf16, CUDA
    python bench/bench_unlearn.py --quick          # tiny fp32 model on any device (CPU smoke run)
    python bench/bench_unlearn.py --quick --preset 8b --dtype bfloat16   # the 8B preset's ways on that model
    python bench/bench_unlearn.py --preset cpu --max-length 512   # fp32 on a CPU, a model whose matmuls dominate
"""
import argparse
import contextlib
import copy
import functools
import gc
import os
import sys
import zlib
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # this checkout's fastalign
from bench import harness  # noqa: E402

from fastalign.unlearn.backward_step import step_in_backward  # noqa: E402
from fastalign.unlearn.encoding import EncodedExample  # noqa: E402
from fastalign.unlearn.layer_stand_ins import fused_layers  # noqa: E402
from fastalign.unlearn.models import enable_activation_checkpointing  # noqa: E402
from fastalign.unlearn.objective import LossWeights, UnlearningObjective  # noqa: E402
from fastalign.unlearn.optimizer import adamw  # noqa: E402
from fastalign.unlearn.reference import (AdapterDisabledReference, CachedReference,  # noqa: E402
                                         FrozenCopyReference)
from fastalign.unlearn.streams import UnlearningStreams  # noqa: E402

PRESETS = {  # Llama shapes (LlamaConfig arguments)
    "quick": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=1000),
    # a CPU-sized model whose step is mostly matmuls, not per-op overhead: the ways compare there as their work does
    # (as in Llama-3.2-1B, the decoder's weights are ~4x the lm_head's)
    "cpu": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=2048, vocab_size=8000),
    **harness.LLAMA_SHAPES,
}
WEIGHTS = LossWeights()


def synthetic_batch(vocab, args):
    """The step's batch: random ids, prompt and answer lengths drawn from the configured ranges."""
    rng = np.random.default_rng(0)

    def examples(n, name):
        out = []
        for i in range(n):
            p, a = rng.integers(*args.prompt_tokens), rng.integers(*args.answer_tokens)
            out.append(EncodedExample(tuple(int(t) for t in rng.integers(1, vocab, p + a)), int(p), int(p + a),
                                      f"{name} {i}"))
        return out

    pool = [tuple(int(t) for t in rng.integers(1, vocab, rng.integers(*args.answer_tokens))) for _ in range(32)]
    normal = examples(args.batch_size, "normal")
    streams = UnlearningStreams(examples(args.batch_size, "forget"), normal=normal, mismatch_pool=pool,
                                batch_size=args.batch_size, mismatch_per_prompt=5, max_length=args.max_length)
    return streams.batch(0), normal


def make_model(args, device, dtype):
    torch.manual_seed(0)
    # an lm_head of its own, as unlearning trains it (Llama-3.2-1B ties it to the embeddings)
    config = LlamaConfig(**{**PRESETS[args.preset], "max_position_embeddings": max(args.max_length, 256),
                            "tie_word_embeddings": False})
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model.train()


def drift(model):
    """Moves the policy's decoder weights a little (seeded, the same in every way) away from the reference that each
    way built from the initial model, as a few training steps would: the first step's KL term is then not zero, and
    the ways' first-step losses compare all three terms."""
    generator = torch.Generator(model.device).manual_seed(1)
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype), alpha=0.005)


def optimizer_step(model, in_backward=False):
    """The end of a step: AdamW's step and the gradients dropped; with in_backward, the step each weight took in the
    backward (backward_step.py) and nothing left to do. Its `release()` removes the backward's hooks: each holds the
    optimizer, which holds the parameters, a cycle that kept every such way's model and AdamW state alive (and on
    the GPU) through the rows measured after it."""
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-6)   # the trainer's, every way
    hooks = step_in_backward(optimizer) if in_backward else []

    def step():
        if not in_backward:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step.release = lambda: [hook.remove() for hook in hooks]
    return step


# ---- the ways: each returns a no-argument function that performs one full step and returns its loss ----

def fastalign_step(model, batch, normal, args, reference, packing="auto", in_backward=True, grads_in_forward=False,
                   fuse_layers=True):
    objective = UnlearningObjective(model, WEIGHTS, reference, packing=packing, grads_in_forward=grads_in_forward)
    finish = optimizer_step(model, in_backward)
    packed = objective.packer.plan(batch.tokens)
    # entered once, as the trainer enters it for its run (its config's fused_layers, on by default), not in every
    # timed step (an enter and exit walk the model: 5,600 Python calls a step at 1B); left by release()
    layers = contextlib.ExitStack()
    if fuse_layers:
        layers.enter_context(fused_layers(model))

    def step():
        loss = objective(batch).total
        loss.backward()
        finish()
        return loss.detach()
    step.grid = (len(batch.tokens.input_ids), batch.tokens.width) if packed is None else packed.shape
    step.release = lambda: (finish.release(), layers.close())
    return step


def fastalign_frozen_copy(model, batch, normal, args, **options):
    return fastalign_step(model, batch, normal, args, FrozenCopyReference(model), **options)


def fastalign_cached(model, batch, normal, args, **options):
    model.lm_head.weight.requires_grad_(False)
    return fastalign_step(model, batch, normal, args, CachedReference(model, normal, batch_size=args.batch_size),
                          **options)


def fastalign_lora(model, batch, normal, args):
    import peft
    model = peft.get_peft_model(model, peft.LoraConfig(r=32, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    return fastalign_step(model, batch, normal, args, AdapterDisabledReference(model))


def full_logits_at_answers(net, tokens):
    """The usual way: the model's forward returns logits at every position; the answer targets' rows are taken."""
    logits = net(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).logits
    return logits[:, :-1][tokens.target_mask]


def sliced_logits_at_answers(net, tokens):
    """The careful way: final hidden states at the answer targets only, then the lm_head on those rows."""
    hidden = net.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    return net.lm_head(hidden[:, :-1][tokens.target_mask])


def user_padded(examples, device):
    """The batch's rows right-padded as a user pads them, from the examples alone (not fastalign's collate): ids,
    attention mask, and the mask of the answer targets (position t predicts token t + 1)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    target_mask = torch.zeros(len(examples), width - 1, dtype=torch.bool)
    for row, e in enumerate(examples):
        ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
        target_mask[row, e.answer_start - 1:e.answer_end - 1] = True
    lengths = torch.tensor([len(e.input_ids) for e in examples])
    attention_mask = (torch.arange(width) < lengths[:, None]).long()
    return SimpleNamespace(input_ids=ids.to(device), attention_mask=attention_mask.to(device),
                           target_mask=target_mask.to(device))


def unfused_step(model, batch, logits_at):
    """A well-written plain-torch step: one policy forward over all rows, `logits_at` materialising the logits of
    the answer targets, signed weighted CE and KL on them in fp32, a frozen copy for the reference, run over the
    normal rows padded to their own longest row (as fastalign's reference is), not to the whole batch's."""
    reference = copy.deepcopy(model).requires_grad_(False).eval()
    finish = optimizer_step(model)
    nf, nm, examples = batch.num_forget, batch.num_mismatch, batch.examples
    device = next(model.parameters()).device
    tokens = user_padded(examples, device)
    normal_tokens = user_padded(examples[nf + nm:], device)
    policy_mask = tokens.target_mask[:nf + nm]
    # SPEC §1 as a user writes it: each row's answer mean, averaged over its stream, ascent on the forget rows
    row_weight = torch.tensor([-WEIGHTS.forget / nf] * nf + [WEIGHTS.mismatch / nm] * nm, device=policy_mask.device)
    signed = (row_weight[:, None] / policy_mask.sum(1, keepdim=True)).expand_as(policy_mask)[policy_mask]
    targets = tokens.input_ids[:nf + nm, 1:][policy_mask]

    def step():
        logits = logits_at(model, tokens)
        ce = F.cross_entropy(logits[:len(targets)].float(), targets, reduction="none")
        with torch.no_grad():
            ref_logits = logits_at(reference, normal_tokens)
        log_q = torch.log_softmax(logits[len(targets):].float(), -1)
        log_p = torch.log_softmax(ref_logits.float(), -1)
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
        loss = (ce * signed).sum() + WEIGHTS.normal * kl
        loss.backward()
        finish()
        return loss.detach()
    step.grid = tuple(tokens.input_ids.shape)
    return step


def unfused_baseline(model, batch, normal, args):
    return unfused_step(model, batch, full_logits_at_answers)


def unfused_sliced(model, batch, normal, args):
    return unfused_step(model, batch, sliced_logits_at_answers)


def reference_recipe(model, batch, normal, args):
    reference = copy.deepcopy(model).float().requires_grad_(False).eval()
    finish = optimizer_step(model)
    nf, nm, examples = batch.num_forget, batch.num_mismatch, batch.examples

    device = next(model.parameters()).device

    def padded(rows):
        tokens = user_padded(rows, device)
        pad = args.max_length - tokens.input_ids.shape[1]
        return F.pad(tokens.input_ids, (0, pad)), F.pad(tokens.attention_mask, (0, pad))

    streams = {name: padded(rows) for name, rows in (("forget", examples[:nf]), ("mismatch", examples[nf:nf + nm]),
                                                     ("normal", examples[nf + nm:]))}

    def answer_loss(name, rows):
        ids, attention = streams[name]
        logits = model(input_ids=ids, attention_mask=attention).logits
        losses = []
        for b, e in enumerate(rows):  # the reference's per-sample loop
            ce = F.cross_entropy(logits[b, :-1], ids[b, 1:], reduction="none")
            position = torch.zeros_like(ce)
            position[e.answer_start - 1:e.answer_end - 1] = 1
            losses.append((ce * position / position.sum()).sum())
        return torch.stack(losses).mean()

    def step():
        forget = -answer_loss("forget", examples[:nf])
        mismatch = answer_loss("mismatch", examples[nf:nf + nm])
        ids, attention = streams["normal"]
        q = torch.softmax(model(input_ids=ids, attention_mask=attention).logits, -1)
        with torch.no_grad():
            p = torch.softmax(reference(input_ids=ids, attention_mask=attention).logits, -1)
        kl = -(p * torch.log(q.float() + 1e-12)).sum(-1).mean()  # every position, padding included
        loss = WEIGHTS.forget * forget + WEIGHTS.mismatch * mismatch + WEIGHTS.normal * kl
        loss.backward()
        finish()
        return loss.detach()
    step.grid = (len(examples), args.max_length)
    return step


COMPARE = [("fastalign", fastalign_frozen_copy), ("unfused baseline", unfused_baseline),
           ("reference recipe", reference_recipe), ("fastalign cached", fastalign_cached),
           ("unfused, answer rows only", unfused_sliced),
           ("fastalign, padded rows", functools.partial(fastalign_frozen_copy, packing="off")),
           ("fastalign, AdamW after backward", functools.partial(fastalign_frozen_copy, in_backward=False)),
           ("fastalign, grads in forward", functools.partial(fastalign_frozen_copy, grads_in_forward=True)),
           ("fastalign, unfused layers", functools.partial(fastalign_frozen_copy, fuse_layers=False))]
# (the four ways first: a run cut short keeps them)
ON_ONE_GPU_8B = [("fastalign LoRA", fastalign_lora), ("fastalign full + cached", fastalign_cached)]
UNFUSED_BASELINES = {"unfused baseline": "unfused", "unfused, answer rows only": "sliced"}  # row -> ratio key
# Its own objective (the published code's defects: KL over every position, padding included): not compared.
NOT_SPEC_OBJECTIVE = {"reference recipe"}


def gradient_signature(name, grad, chunk=1 << 20):
    """[L2 norm, projection on a random +-1 vector seeded by the parameter's name] of grad, in fp32 over chunks of
    its elements: the norm, and a direction (a gradient of the right size and the wrong sign or order projects
    elsewhere); no fp32 copy of a large gradient adds to the step's peak memory."""
    flat = grad.reshape(-1)
    generator = torch.Generator(device=flat.device).manual_seed(zlib.crc32(name.encode()))
    squares = projection = 0.0
    for i in range(0, flat.numel(), chunk):
        part = flat[i:i + chunk].float()
        signs = torch.empty_like(part).bernoulli_(0.5, generator=generator).mul_(2).sub_(1)
        squares += float(part.square().sum())
        projection += float(part.dot(signs))
    return [squares ** 0.5, projection]


def first_step_gradient_signatures(model, step):
    """(step()'s result, {parameter name: gradient_signature of its gradient} as step() calls an optimizer's step:
    once for all of them, or with the optimizer in the backward once for each)."""
    signatures = {}

    def record(optimizer, args, kwargs):
        signatures.update({name: gradient_signature(name, p.grad) for name, p in model.named_parameters()
                           if p.grad is not None and name not in signatures})
    handle = register_optimizer_step_pre_hook(record)
    try:
        return step(), signatures
    finally:
        handle.remove()


def gradient_difference(signatures, reference):
    """||s - r|| / ||r|| over the gradient signatures (norm and projection) of the parameters both trained (None if
    none)."""
    common = sorted(set(signatures) & set(reference))
    if not common:
        return None
    s, r = (torch.tensor([d[k] for k in common], dtype=torch.float64) for d in (signatures, reference))
    return float((s - r).norm() / r.norm().clamp(min=1e-30))


def measure(name, build, batch, normal, args, device, dtype):
    """Builds a fresh model for one way, then times its steps and records their peak memory (from the end of
    the build: the model is made in fp32 and cast, a transient no step needs) and its first step's gradient
    signatures. A failure becomes the row's error."""
    gc.collect()
    step = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        model = make_model(args, device, dtype)
        step = build(model, batch.to(device), normal, args)
        grid = getattr(step, "grid", None)   # rows x width of its policy forwards, where the way gives it
        if args.ways != "8b":  # the 8B ways (LoRA) have no like-for-like comparison to make
            drift(model)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # the first step, on the same policy and reference in every way; it warms up too
        loss, grad_signatures = first_step_gradient_signatures(model, step)
        loss = float(loss)
        # one more untimed step: the first allocated AdamW's state, so the second is the first whose activations
        # the caching allocator may have to cudaMalloc anew around it
        ms = harness.median_ms(step, device, warmup=1, reps=args.reps)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
        extra = harness.peak_extra_mib(step, device)
        busy = harness.device_busy_ms(step, device)   # against the step's time: how long the GPU waits for the host
        held = harness.held_for_backward_mib(step)
        profile = harness.profile_top(step, device) if args.profile else None
    except Exception as err:
        return harness.failure_row(name, err)
    finally:
        getattr(step, "release", lambda: None)()   # the optimizer's hooks in the backward, which hold the model
        step = None
        gc.collect()
    return {"method": name, "grid": grid and "{} x {}".format(*grid), "slots": grid and grid[0] * grid[1],
            "first_step_loss": loss, "step_ms": ms, "gpu_busy": None if busy is None else busy / ms, "peak_gib": peak,
            "step_extra_gib": None if extra is None else extra / 2 ** 10, "held_mib": held,
            "grad_signatures": grad_signatures,
            **({"profile": profile} if profile else {})}


def add_ratios(rows):
    """Each measured row against the reference recipe and the two unfused baselines, where those were measured, and
    its first step's loss and gradient signatures against the first measured row's (the ways that compute SPEC §1 must
    agree)."""
    by_name = {r["method"]: r for r in rows if "step_ms" in r}
    spec = [r for r in by_name.values() if r["method"] not in NOT_SPEC_OBJECTIVE]
    for r in rows:
        if "step_ms" not in r:
            continue
        if r["method"] not in NOT_SPEC_OBJECTIVE:
            first = spec[0]["first_step_loss"]
            r["loss_rel_diff"] = abs(r["first_step_loss"] - first) / max(abs(first), 1e-30)
            if "grad_signatures" in r and "grad_signatures" in spec[0]:
                r["grad_rel_diff"] = gradient_difference(r["grad_signatures"], spec[0]["grad_signatures"])
                # what the first row trains and this one does not (the cached reference freezes the lm_head): a
                # step of less work, which grad_rel_diff, over the parameters both train, does not show
                r["not_trained"] = sorted(set(spec[0]["grad_signatures"]) - set(r["grad_signatures"])) or None
        if "reference recipe" in by_name:
            r["speedup_vs_reference"] = by_name["reference recipe"]["step_ms"] / r["step_ms"]
        for baseline, key in UNFUSED_BASELINES.items():
            if baseline not in by_name:
                continue
            base = by_name[baseline]
            r[f"speedup_vs_{key}"] = base["step_ms"] / r["step_ms"]
            r[f"held_vs_{key}"] = r["held_mib"] / base["held_mib"]
            if r["peak_gib"] is not None:
                r[f"memory_vs_{key}"] = r["peak_gib"] / base["peak_gib"]
            if r["step_extra_gib"] is not None:
                r[f"extra_memory_vs_{key}"] = r["step_extra_gib"] / base["step_extra_gib"]


COLUMNS = [("method", "method", "{}"), ("grid", "grid", "{}"), ("slots", "slots", "{}"),
           ("first_step_loss", "step-1 loss", "{:.5g}"),
           ("loss_rel_diff", "loss diff", "{:.1e}"), ("grad_rel_diff", "grad diff", "{:.1e}"),
           ("step_ms", "step ms", "{:.1f}"), ("gpu_busy", "GPU busy", "{:.0%}"),
           ("peak_gib", "peak GiB", "{:.2f}"),
           ("speedup_vs_reference", "x vs reference", "{:.1f}"), ("speedup_vs_unfused", "x vs unfused", "{:.2f}"),
           ("memory_vs_unfused", "mem / unfused", "{:.2f}"), ("step_extra_gib", "step extra GiB", "{:.2f}"),
           ("held_mib", "held MiB", "{:.1f}"), ("held_vs_unfused", "held / unfused", "{:.2f}"),
           ("extra_memory_vs_unfused", "extra / unfused", "{:.2f}"), ("speedup_vs_sliced", "x vs sliced", "{:.2f}"),
           ("extra_memory_vs_sliced", "extra / sliced", "{:.2f}"), ("not_trained", "not trained", "{}"),
           ("error", "error", "{}")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny fp32 model, short rows: runs on a CPU (with --preset 8b: that preset's ways)")
    parser.add_argument("--preset", choices=PRESETS, default="1b")
    parser.add_argument("--device", type=harness.device_argument,
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: bfloat16 on CUDA, float32 elsewhere")
    parser.add_argument("--batch-size", type=harness.count_at_least(1), default=2,
                        help="harmful prompts (and normal rows) per step")
    parser.add_argument("--prompt-tokens", type=harness.count_at_least(1), nargs=2, default=[32, 128],
                        help="range of prompt lengths")
    parser.add_argument("--answer-tokens", type=harness.count_at_least(1), nargs=2, default=[32, 256],
                        help="range of answer lengths")
    parser.add_argument("--max-length", type=harness.count_at_least(1), default=2048,
                        help="the reference recipe pads to this")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--reps", type=harness.count_at_least(1), default=3)
    parser.add_argument("--profile", action="store_true",
                        help="also profile one more step of each way: its top operators and kernels by self time")
    args = parser.parse_args()
    args.ways = "8b" if args.preset == "8b" else "compare"   # --quick keeps them, on its tiny model
    if args.quick:
        args.preset, args.prompt_tokens, args.answer_tokens, args.max_length = "quick", [4, 16], [4, 24], 128
        args.dtype = args.dtype or "float32"
    if args.ways == "8b":
        args.gradient_checkpointing = True
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    batch, normal = synthetic_batch(PRESETS[args.preset]["vocab_size"], args)
    tokens = batch.tokens
    config = {"preset": args.preset, "ways": args.ways, **PRESETS[args.preset], "tie_word_embeddings": False,
              "dtype": str(dtype), "reps": args.reps,
              "batch_size": args.batch_size,
              "mismatch_per_prompt": 5, "rows": list(tokens.input_ids.shape), "max_length": args.max_length,
              "tokens": tokens.num_tokens, "answer_tokens": int(tokens.target_mask.sum()),
              "gradient_checkpointing": args.gradient_checkpointing}
    print(f"device: {harness.device_name(device)}   dtype: {str(dtype).split('.')[-1]}   preset: {args.preset}   "
          f"rows: {tokens.input_ids.shape[0]} x {tokens.input_ids.shape[1]} (reference recipe: x {args.max_length})"
          f"   answer tokens: {int(tokens.target_mask.sum())}")
    rows = []
    for name, build in ON_ONE_GPU_8B if args.ways == "8b" else COMPARE:
        rows.append(measure(name, build, batch, normal, args, device, dtype))
        add_ratios(rows)
        # after each row: a cut run keeps them; the 8B ways' record beside the comparison's (gpu_session.sh runs
        # both in one call, on one device and commit)
        path = harness.write_results("bench_unlearn", device, config, rows, tag="8b" if args.ways == "8b" else None,
                                      quick=args.quick)
        harness.print_table(rows[-1:], COLUMNS)
        if rows[-1].get("profile"):
            harness.print_table(rows[-1]["profile"], harness.PROFILE_COLUMNS)
    print()
    harness.print_table(rows, COLUMNS)
    print("wrote", path)


if __name__ == "__main__":
    main()
