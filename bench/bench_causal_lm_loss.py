"""Benchmark of a causal LM's training step on its labels: fastalign.CausalLMLoss, and the model's forward after
fastalign.fuse_causal_lm_loss, against the model's own loss (model(**batch, labels=labels).loss, which materialises
the [tokens x vocab] logits, then an fp32 copy of them), and against fused ops of others on the decoder's hidden
states (what their user writes without patching the model's class): torch's own linear_cross_entropy on its chunked
path (in torch 2.13), and Liger-Kernel's fused linear cross-entropy where liger-kernel is importable; TRL's fused LM
head as its SFT trainer patches it onto the model, where trl is importable; also
CausalLMLoss with fastalign's training layers (fused_layers: RMSNorms and gated MLPs that keep less for the backward);
and the KL to a frozen reference (another model of the same shape), fastalign.CausalLMKLDiv against
the KL from both models' logits and, where trl is importable, TRL's chunked divergence (its distillation trainer's) on
both decoders' hidden states.

One forward and backward of the whole model (every weight trained) on B rows of T tokens whose first quarter is the
prompt (labels -100). Columns: the step's median time, its peak memory beyond what existed before it (the weights'
gradients included, allocated by each step), the same less those gradients (`extra MiB`: what the loss and the
activations take), and against the first way of the same loss (the model's own cross-entropy; the KL from both
models' logits): the speed-up, how much less extra memory, and the loss and gradients' relative difference (in bf16
the fused losses round their sums differently, so ~1e-3 is agreement there).

    python bench/bench_causal_lm_loss.py                # Llama-3.2-1B shape (V 128256), bf16, 8 rows of 1024, CUDA
    python bench/bench_causal_lm_loss.py --preset cpu   # 2 small layers with V 128256, fp32, 2 rows of 512, a CPU
    python bench/bench_causal_lm_loss.py --quick        # a small model in fp32, any device (CPU smoke run)
"""
import argparse
import os
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # this checkout's fastalign
from bench import harness  # noqa: E402

import fastalign  # noqa: E402
from fastalign.unlearn import fused_layers  # noqa: E402

# preset -> (LlamaConfig keywords, dtype, rows, tokens per row)
PRESETS = {
    "1b": (harness.LLAMA_SHAPES["1b"], torch.bfloat16, 8, 1024),
    # a CPU-sized model with Llama-3's vocabulary, whose logits are what dominates a step's memory there too
    "cpu": (dict(vocab_size=128256, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
            torch.float32, 2, 512),
    "quick": (dict(vocab_size=1001, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, tie_word_embeddings=False), torch.float32, 2, 32),
}
COLUMNS = [("quantity", "loss", "{}"), ("method", "method", "{}"), ("loss_rel_diff", "loss diff", "{:.1e}"),
           ("grad_rel_diff", "grad diff", "{:.1e}"), ("step_ms", "step ms", "{:.2f}"),
           ("speedup", "vs first", "{:.2f}x"), ("peak_mib", "peak MiB", "{:.1f}"),
           ("extra_mib", "extra MiB", "{:.1f}"), ("leaner", "leaner than first", "{:.2f}x"), ("error", "error", "{}")]


def own_loss(model):
    return lambda batch: model(**batch).loss


def fastalign_loss(model, **options):
    loss_fn = fastalign.CausalLMLoss(model, **options)
    return lambda batch: loss_fn(**batch)


def fused_model_forward(model):
    """The model's own forward after fastalign.fuse_causal_lm_loss(model): what a Trainer calls. It fuses `model` in
    place, so it is measured after the model's own loss (no later way calls the model's forward with labels)."""
    fastalign.fuse_causal_lm_loss(model)
    return lambda batch: model(**batch).loss


def fastalign_fused_layers(model):
    """CausalLMLoss with the model's RMSNorms and gated MLPs stood in for by fastalign's training layers, which keep
    less for the backward (fastalign.unlearn.fused_layers)."""
    loss_fn = fastalign.CausalLMLoss(model)

    def loss(batch):
        with fused_layers(model):
            return loss_fn(**batch)
    return loss


def logits_kl(model, reference):
    """KL(P || Q) of the reference's and the model's next-token distributions, the token mean over the labelled
    positions, from both models' logits in fp32 (what a user writes without fused losses)."""
    def loss(batch):
        inputs = {name: t for name, t in batch.items() if name != "labels"}
        counted = batch["labels"][:, 1:] != -100
        log_q = torch.log_softmax(model(**inputs).logits[:, :-1][counted].float(), dim=-1)
        with torch.no_grad():
            log_p = torch.log_softmax(reference(**inputs).logits[:, :-1][counted].float(), dim=-1)
        return torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    return loss


def fastalign_kl(model, reference):
    loss_fn = fastalign.CausalLMKLDiv(model, reference)
    return lambda batch: loss_fn(**batch)


def loss_on_hidden_states(fused):
    """A builder of the loss fused(hidden [N, H], lm_head weight [V, H], labels [N]) on the decoder's hidden states,
    shifted as the model shifts its labels: what the user of a fused op writes without patching the model's class."""
    def build(model):
        def loss(batch):
            hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 use_cache=False).last_hidden_state
            return fused(hidden[:, :-1].flatten(0, 1), model.lm_head.weight, batch["labels"][:, 1:].flatten())
        return loss
    return build


def torch_chunked_loss():
    """torch's own fused op, torch.nn.functional.linear_cross_entropy (in torch 2.13; AttributeError in a torch
    without it), on its chunked path, on the hidden states."""
    options = torch.nn.LinearCrossEntropyOptions()
    return loss_on_hidden_states(lambda h, w, y: torch.nn.functional.linear_cross_entropy(h, w, y, ignore_index=-100,
                                                                                        options=options))


def liger_loss():
    """Liger-Kernel's fused linear cross-entropy on the hidden states (ImportError without liger-kernel)."""
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    fused = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
    return loss_on_hidden_states(lambda h, w, y: fused(w, h, y))


def trl_divergence_on_hidden_states():
    """A builder of TRL's chunked divergence with beta=0, KL(reference || model) (trl.kernels.chunked_divergence, what
    its distillation trainer runs), on both decoders' hidden states at the labelled positions, the token mean
    (ImportError without trl)."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    def build(model, reference):
        def loss(batch):
            inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            counted = batch["labels"][:, 1:] != -100
            hidden = model.model(**inputs).last_hidden_state[:, :-1][counted]
            with torch.no_grad():
                ref_hidden = reference.model(**inputs).last_hidden_state[:, :-1][counted]
            return ChunkedDivergenceFunction.apply(hidden, model.lm_head.weight, None, ref_hidden,
                                                   reference.lm_head.weight, None, 0.0)[0].mean()
        return loss
    return build


def trl_fused_head_loss():
    """TRL's fused LM head as its SFT trainer puts it on a model (trl.trainer.utils.add_fused_lm_head, with the
    entropy and top-1 outputs its metrics read): model(**batch, fused_lm_head=True).loss, the token mean of -log p
    from its chunked log-probabilities (ImportError without trl). It patches the model's forward in place, so it is
    the last way measured (a call without fused_lm_head goes to the forward it wrapped)."""
    from trl.trainer.utils import add_fused_lm_head

    def build(model):
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        return lambda batch: model(**batch, fused_lm_head=True).loss
    return build


def make_batch(rows, tokens, vocab, device):
    """B rows of T random tokens (seed 0: every call the same batch); labels are the ids with the first quarter of
    each row (the prompt) at -100."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (rows, tokens), generator=generator)
    labels = input_ids.clone()
    labels[:, :tokens // 4] = -100
    return {name: t.to(device) for name, t in (("input_ids", input_ids), ("attention_mask", torch.ones_like(input_ids)),
                                               ("labels", labels))}


def measure(name, loss_of, model, batch, device, reps):
    """(row, gradients of every parameter from one more step) of one way; (failure row, None) where it raised."""
    params = list(model.parameters())

    def step():
        for p in params:
            p.grad = None
        loss = loss_of(batch)
        loss.backward()
        return loss

    try:
        loss = float(step())
        ms = harness.median_ms(step, device, reps=reps)
        for p in params:   # dropped before the peak is taken, so that the step's own gradients count in it
            p.grad = None
        peak = harness.peak_extra_mib(step, device)
        step()
        grads = [p.grad for p in params]
    except Exception as err:
        return harness.failure_row(name, err), None
    grad_mib = sum(p.numel() * p.element_size() for p in params) / 2 ** 20
    return {"method": name, "loss": loss, "step_ms": ms, "peak_mib": peak,
            "extra_mib": None if peak is None else peak - grad_mib}, grads


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=harness.device_argument,
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=PRESETS, default="1b",
                        help="1b: Llama-3.2-1B's shape in bf16, 8 rows of 1024 tokens; cpu: 2 layers of width 256 "
                             "with its 128256 words in fp32, 2 rows of 512; quick: a small fp32 model, 2 rows of 32")
    parser.add_argument("--quick", action="store_true", help="--preset quick (any device, in seconds)")
    parser.add_argument("--rows", type=harness.count_at_least(1), default=None, help="B (default: the preset's)")
    parser.add_argument("--tokens", type=harness.count_at_least(1), default=None, help="T (default: the preset's)")
    parser.add_argument("--reps", type=harness.count_at_least(1), default=5)
    args = parser.parse_args()
    preset = "quick" if args.quick else args.preset
    device = torch.device(args.device)
    shape, dtype, preset_rows, preset_tokens = PRESETS[preset]
    rows, tokens = args.rows or preset_rows, args.tokens or preset_tokens
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(dtype).train()
    batch = make_batch(rows, tokens, shape["vocab_size"], device)
    config = {"preset": preset, "dtype": str(dtype).removeprefix("torch."), "layers": shape["num_hidden_layers"],
              "hidden": shape["hidden_size"],
              "rows": rows, "tokens": tokens, "vocab": shape["vocab_size"], "reps": args.reps,
              "logits_mib": rows * tokens * shape["vocab_size"] * dtype.itemsize / 2 ** 20, "unavailable": {}}
    print(f"device: {harness.device_name(device)}   {rows} x {tokens} tokens, V {shape['vocab_size']}, "
          f"{config['dtype']}")
    torch.manual_seed(1)   # the KL's reference: another model of the same shape, frozen (a teacher's stand-in)
    with torch.device(device):
        reference_model = LlamaForCausalLM(LlamaConfig(**shape)).to(dtype).requires_grad_(False)
    trl_kl = harness.optional(trl_divergence_on_hidden_states, config["unavailable"])
    ways = [("CE", "model's own loss", own_loss), ("CE", "fastalign CausalLMLoss", fastalign_loss),
            ("CE", "fastalign fused model forward", fused_model_forward),
            ("CE", "fastalign grads-in-forward", lambda m: fastalign_loss(m, grads_in_forward=True)),
            ("CE", "fastalign + fused layers", fastalign_fused_layers),
            ("KL", "KL from both models' logits", lambda m: logits_kl(m, reference_model)),
            ("KL", "fastalign CausalLMKLDiv", lambda m: fastalign_kl(m, reference_model)),
            ("CE", "torch linear_cross_entropy chunked on hidden states",
             harness.optional(torch_chunked_loss, config["unavailable"])),
            ("CE", "liger on hidden states", harness.optional(liger_loss, config["unavailable"])),
            ("KL", "trl chunked divergence on hidden states", trl_kl and (lambda m: trl_kl(m, reference_model))),
            ("CE", "trl fused LM head", harness.optional(trl_fused_head_loss, config["unavailable"]))]
    results, first_of = [], {}   # quantity -> (row, gradients) of its first measured way
    for quantity, name, build in ways:
        if build is None:
            continue
        row, grads = measure(name, build(model), model, batch, device, args.reps)
        row["quantity"] = quantity
        if grads is not None:   # against the first way of the same quantity
            first, first_grads = first_of.setdefault(quantity, (row, grads))
            row["loss_rel_diff"] = abs(row["loss"] - first["loss"]) / abs(first["loss"])
            row["grad_rel_diff"] = harness.gradients_difference(grads, first_grads)
            row["speedup"] = first["step_ms"] / row["step_ms"]
            if (row["extra_mib"] or 0) > 0 and (first["extra_mib"] or 0) > 0:   # (None off CUDA and CPU)
                row["leaner"] = first["extra_mib"] / row["extra_mib"]
        del grads
        results.append(row)
        # after each row: a cut run keeps them (the last row's write is the whole record)
        path = harness.write_results("bench_causal_lm_loss", device, config, results, quick=args.quick)
        harness.print_table(results[-1:], COLUMNS)
    print()
    harness.print_table(results, COLUMNS)
    print("wrote", path)


if __name__ == "__main__":
    main()
