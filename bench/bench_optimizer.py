"""Benchmark of the optimizer step of weights trained in bf16: fastalign.KahanAdamW against what users would otherwise
run, on the parameters of a Llama-architecture model (random values of a trained model's scale, random gradients):

- KahanAdamW:              bf16 weights, moments and compensation (8 bytes a weight); one Triton kernel a parameter
                           on CUDA;
- torch AdamW, bf16:       torch's AdamW on the bf16 weights (fused on CUDA; 6 bytes a weight), whose rounding of
                           each updated weight to bf16 drops updates below half its last place;
- torch AdamW, fp32:       torch's AdamW on fp32 weights (fused on CUDA; 12 bytes a weight), what mixed precision
                           keeps (it also keeps the bf16 copy it computes with, not counted here);
- torchao AdamW, bf16 stochastic rounding: where torchao is importable, its AdamW on the bf16 weights with each
                           update rounded at random in proportion (6 bytes a weight), small updates kept on average.

Columns: the step of all parameters (median ms), its peak memory beyond the state (step extra), the bytes a weight
of weights and optimizer state, and the fidelity of the training the step does: after --fidelity-steps steps at the
SPEC's learning rate (2e-6) on one tensor of weights of 0.02 with gradients whose sign holds per weight under noise,
the distance of the weights (with KahanAdamW, weights + compensation) to float64 AdamW's from the same start, over
the distance that AdamW moved them (0: the updates kept, 1: as if the weights never moved); "weights alone" the same
of the weights the model computes with (KahanAdamW's without their compensation), against the bf16 floor: float64
AdamW's weights rounded to bf16, the least any bf16 weights can be off.

    python bench/bench_optimizer.py                  # Llama-3.2-1B's parameters, CUDA
    python bench/bench_optimizer.py --quick          # a small model's, any device (CPU smoke run)
    python bench/bench_optimizer.py --quick --fidelity-steps 300   # the fidelity column in full, on a CPU
"""
import argparse
import os
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # this checkout's fastalign
from bench import harness  # noqa: E402

from fastalign.optim import KahanAdamW  # noqa: E402

QUICK_SHAPE = dict(vocab_size=1000, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64)
COLUMNS = [("method", "method", "{}"), ("step_ms", "step ms", "{:.3f}"), ("step_extra_mib", "step extra MiB", "{:.1f}"),
           ("bytes_per_weight", "bytes/weight", "{:.1f}"), ("fidelity_error", "fidelity error", "{:.4f}"),
           ("weights_fidelity_error", "weights alone", "{:.4f}"), ("bf16_floor", "bf16 floor", "{:.4f}"),
           ("speedup_vs_fp32", "vs fp32 AdamW", "{:.2f}x"), ("error", "error", "{}")]


def kahan(params):
    return KahanAdamW(params, lr=2e-6)


def torch_adamw(params):
    return torch.optim.AdamW(params, lr=2e-6, fused=True if params[0].device.type == "cuda" else None)


def torchao_adamw_stochastic_rounding():
    """torchao's AdamW with bf16 stochastic rounding (torchao.optim._AdamW(bf16_stochastic_round=True), what torchao
    offers for training bf16 weights: each updated weight rounded up or down at random, in proportion, so that small
    updates are kept on average; one torch.compile'd step a parameter); ImportError without torchao."""
    from torchao.optim import _AdamW
    return lambda params: _AdamW(params, lr=2e-6, bf16_stochastic_round=True)


FP32 = "torch AdamW, fp32"   # the way the others' speed-ups are taken against


def parameter_shapes(shape):
    """The shapes of the parameters of a Llama model of `shape` (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shape))
    return [tuple(p.shape) for p in model.parameters()]


def state_bytes(optimizer):
    """Bytes of the optimizer's parameters and of the tensors of its state, each storage once."""
    tensors = [p for group in optimizer.param_groups for p in group["params"]]
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t) and t.dim()]
    return sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in tensors}.values())


def fidelity_error(build, dtype, device, steps, numel=1 << 20):
    """(error, error of the weights alone, bf16 floor) after `steps` steps: the distance to float64 AdamW's weights,
    over the distance AdamW moved them, of the optimizer's weights (KahanAdamW's with their compensation), of the
    weights alone (what the model computes with), and of float64 AdamW's own weights rounded to bf16 (the least any
    bf16 weights can be off)."""
    generator = torch.Generator().manual_seed(0)
    start = (0.02 * torch.randn(numel, generator=generator)).bfloat16()
    slope = torch.randn(numel, generator=generator)
    reference = torch.nn.Parameter(start.double())
    weight = torch.nn.Parameter(start.to(device, dtype, copy=True))   # (start itself stays the start)
    optimizers = [torch.optim.AdamW([reference], lr=2e-6), build([weight])]
    for _ in range(steps):
        grad = (slope + torch.randn(numel, generator=generator)).bfloat16()
        reference.grad, weight.grad = grad.double(), grad.to(device, dtype)
        for optimizer in optimizers:
            optimizer.step()
    weights = weight.detach().double().cpu()
    final = weights.clone()
    if "compensation" in optimizers[1].state[weight]:
        final += optimizers[1].state[weight]["compensation"].double().cpu()
    target = reference.detach()
    moved = (target - start.double()).norm()
    return tuple(float((t - target).norm() / moved) for t in (final, weights, target.bfloat16().double()))


def measure(name, build, dtype, shapes, args, device):
    """The row of one way; a way that raises (an OOM, torchao's compile failing) is an error row, so that the
    others' rows and speed-ups are kept."""
    try:
        torch.manual_seed(0)
        params = [torch.nn.Parameter((0.02 * torch.randn(shape, device=device)).to(dtype)) for shape in shapes]
        for p in params:
            p.grad = (1e-3 * torch.randn(p.shape, device=device)).to(dtype)
        optimizer = build(params)
        optimizer.step()   # the state exists from here on: the step's extra memory is beyond it
        row = {"method": name, "dtype": str(dtype).removeprefix("torch."),
               "step_ms": harness.median_ms(optimizer.step, device, reps=args.reps),
               "step_extra_mib": harness.peak_extra_mib(optimizer.step, device),
               "bytes_per_weight": state_bytes(optimizer) / sum(p.numel() for p in params)}
        row["fidelity_error"], row["weights_fidelity_error"], row["bf16_floor"] = fidelity_error(
            build, dtype, device, args.fidelity_steps)
        return row
    except Exception as err:
        return harness.failure_row(name, err)


def add_speedups(rows):
    """Each measured row's speed-up against fp32 AdamW's step, once that row has run (it is measured before
    torchao's, so that a run cut there or failing there keeps the speed-ups of the others)."""
    fp32 = next((row for row in rows if row["method"] == FP32 and "step_ms" in row), None)
    for row in rows:
        if fp32 is not None and "step_ms" in row:
            row["speedup_vs_fp32"] = fp32["step_ms"] / row["step_ms"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=harness.device_argument,
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a small model's parameters (CPU smoke run)")
    parser.add_argument("--reps", type=harness.count_at_least(1), default=5)
    parser.add_argument("--fidelity-steps", type=harness.count_at_least(1), default=None,
                        help="default: 300 (30 with --quick)")
    args = parser.parse_args()
    if args.fidelity_steps is None:
        args.fidelity_steps = 30 if args.quick else 300
    device = torch.device(args.device)
    shape = QUICK_SHAPE if args.quick else harness.LLAMA_SHAPES["1b"]
    shapes = parameter_shapes(shape)
    config = {"model": "quick" if args.quick else "Llama-3.2-1B shape", "parameters": len(shapes),
              "weights": sum(torch.Size(s).numel() for s in shapes), "lr": 2e-6,
              "fidelity_steps": args.fidelity_steps, "reps": args.reps}
    print(f"device: {harness.device_name(device)}   {config['weights'] / 1e6:.1f}M weights in {len(shapes)} tensors")
    ways = [("KahanAdamW", kahan, torch.bfloat16), ("torch AdamW, bf16", torch_adamw, torch.bfloat16),
            (FP32, torch_adamw, torch.float32),
            ("torchao AdamW, bf16 stochastic rounding",
             harness.optional(torchao_adamw_stochastic_rounding, config.setdefault("unavailable", {})), torch.bfloat16)]
    rows = []
    for name, build, dtype in ways:
        if build is None:
            continue
        rows.append(measure(name, build, dtype, shapes, args, device))
        add_speedups(rows)
        # after each row: a cut run keeps them (the last row's write is the whole record)
        path = harness.write_results("bench_optimizer", device, config, rows, quick=args.quick)
        harness.print_table(rows[-1:], COLUMNS)
    print()
    harness.print_table(rows, COLUMNS)
    print("wrote", path)


if __name__ == "__main__":
    main()
