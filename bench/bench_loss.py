"""Benchmark of the fused linear losses against what users would otherwise run.

linear_cross_entropy: fastalign (plain and with signed token weights; each also with grads_in_forward=True, the
gradients taken in the forward pass from blocks of whole logits rows), naive torch (materialised logits),
a chunked torch.compile version (checkpointed row chunks), torch's own torch.nn.functional.linear_cross_entropy on
its chunked path (in torch 2.13; with signed weights, its per-token losses weighted), Liger-Kernel's fused linear
cross-entropy, Cut Cross-Entropy and TRL's chunked log-probabilities (its trainers' fused LM head; with signed
weights, its per-token log-probabilities weighted) when importable. linear_kl_div: fastalign (separate and shared
lm_head, each also with grads_in_forward=True), naive torch, and when importable Liger's fused linear JSD and TRL's
chunked divergence (its distillation trainer's), each with beta=0 (forward KL).
Forward and forward+backward; median time, peak extra memory (CUDA), achieved TFLOP/s counted on the products
the math needs: 2*N*H*V per logits product forward, 4*N*H*V more for the backward of a product with gradients
(cross-entropy: 2NHV forward, 6NHV with the backward, the issue's definition; KL: 4NHV forward, the frozen
reference's product included, 8NHV with the backward), and the measured bf16 matmul peak of the same device.
Every method of a quantity gets the same inputs, and each row records its loss and its relative difference
from the first method's, and the same for the gradients of hidden and weight, so that the table compares methods
that compute the same thing (a baseline that could not be loaded is named, with its error, in the config).

    python bench/bench_loss.py               # Llama-3-8B head (H 4096, V 128256) in bf16, N 2048..16384, CUDA
    python bench/bench_loss.py --quick       # a small fp32 shape, runs anywhere (CPU smoke run)
"""
import argparse
import functools
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # this checkout's fastalign
from bench import harness  # noqa: E402

import fastalign  # noqa: E402
from fastalign.ops.backend import triton_interpreting  # noqa: E402

IGNORE = -100


# ---- cross-entropy candidates: (hidden, weight, target, token_weight) -> scalar loss ----

def fastalign_ce(h, w, y, tw):
    return fastalign.linear_cross_entropy(h, w, y)


def fastalign_ce_signed(h, w, y, tw):
    return fastalign.linear_cross_entropy(h, w, y, token_weight=tw, reduction="sum")


def fastalign_ce_in_forward(h, w, y, tw):
    return fastalign.linear_cross_entropy(h, w, y, grads_in_forward=True)


def fastalign_ce_signed_in_forward(h, w, y, tw):
    return fastalign.linear_cross_entropy(h, w, y, token_weight=tw, reduction="sum", grads_in_forward=True)


def naive_ce(h, w, y, tw):
    return F.cross_entropy((h @ w.t()).float(), y, ignore_index=IGNORE)


def _chunk_ce_sum(h, w, y):
    return F.cross_entropy((h @ w.t()).float(), y, ignore_index=IGNORE, reduction="sum")


def compiled_chunked_ce(h, w, y, tw, *, chunk=1024, _compiled={}):
    fn = _compiled.setdefault("fn", torch.compile(_chunk_ce_sum, dynamic=False))
    total = sum(checkpoint(fn, h[i:i + chunk], w, y[i:i + chunk], use_reentrant=False)
                for i in range(0, h.shape[0], chunk))
    return total / (y != IGNORE).sum().clamp(min=1)


def liger_ce():
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
    return lambda h, w, y, tw: loss(w, h, y)


def cce_ce():
    """Cut Cross-Entropy as users call it: by default its backward skips the gradient tiles whose entries all
    fall under a threshold (filter_eps; near half of them on this bench's inputs), an approximate gradient."""
    from cut_cross_entropy import linear_cross_entropy as cce
    return lambda h, w, y, tw: cce(h, w, y, ignore_index=IGNORE)


def cce_exact_ce():
    """Cut Cross-Entropy with every gradient tile computed (filter_eps=None): the same work as the others."""
    from cut_cross_entropy import linear_cross_entropy as cce
    return lambda h, w, y, tw: cce(h, w, y, ignore_index=IGNORE, filter_eps=None)


def torch_chunked_ce():
    """torch's own fused op, torch.nn.functional.linear_cross_entropy (in torch 2.13; AttributeError in a torch
    without it), on its chunked path (LinearCrossEntropyOptions(): chunks of rows, the gradients taken in the forward
    pass): what a user of torch alone writes."""
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda h, w, y, tw: F.linear_cross_entropy(h, w, y, ignore_index=IGNORE, options=options)


def torch_chunked_ce_signed():
    """The same op's per-token losses (reduction "none") times the signed token weights, summed: torch's op weighs
    classes, not tokens."""
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda h, w, y, tw: (F.linear_cross_entropy(h, w, y, ignore_index=IGNORE, reduction="none",
                                                       options=options) * tw).sum()


TRL_VOCAB_CHUNK = 32768   # the vocabulary width of TRL's tiles in its fused LM head


def trl_target_log_probs():
    """(counted rows, log p of their targets) by TRL's chunked log-probabilities (trl.kernels.ChunkedLogProbFunction,
    what its trainers' fused LM head runs: cuBLAS products of [4096, 32768] tiles, each folded by a Triton kernel,
    recomputed in the backward), given the targets' rows as TRL's head gives them; ImportError without trl."""
    from trl.kernels import ChunkedLogProbFunction

    def log_probs(h, w, y):
        live = y != IGNORE
        return live, ChunkedLogProbFunction.apply(h[live], w, None, y[live], 1.0, TRL_VOCAB_CHUNK, None, 1.0,
                                                  ("log_probs",))[0]
    return log_probs


def trl_ce():
    """TRL's chunked log-probabilities, the loss the mean of the targets' -log p."""
    log_probs = trl_target_log_probs()

    def loss(h, w, y, tw):
        live, log_p = log_probs(h, w, y)
        return -log_p.sum() / live.sum().clamp(min=1)
    return loss


def trl_ce_signed():
    """The same per-token log-probabilities, weighted by the signed token weights: sum_t w_t CE_t."""
    log_probs = trl_target_log_probs()

    def loss(h, w, y, tw):
        live, log_p = log_probs(h, w, y)
        return -(tw[live] * log_p).sum()
    return loss


# ---- KL candidates: (hidden, weight, ref_hidden, ref_weight) -> scalar loss ----

def fastalign_kl(h, w, rh, rw):
    return fastalign.linear_kl_div(h, w, rh, rw)


def fastalign_kl_in_forward(h, w, rh, rw):
    return fastalign.linear_kl_div(h, w, rh, rw, grads_in_forward=True)


def naive_kl(h, w, rh, rw):
    """The logits materialised; the reference's a constant (its head detached, one head shared by both or not)."""
    log_q = torch.log_softmax((h @ w.t()).float(), dim=-1)
    log_p = torch.log_softmax((rh.detach() @ rw.detach().t()).float(), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def liger_kl():
    from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
    loss = LigerFusedLinearJSD(jsd_beta=0.0, ignore_index=IGNORE)
    return lambda h, w, rh, rw: loss(h, w, rh, rw, None)


def trl_kl():
    """TRL's chunked divergence with beta=0, the forward KL(teacher || student) (trl.kernels.chunked_divergence, what
    its distillation trainer runs: both heads' products in fp32 [4096, 32768] tiles), the token mean."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
    return lambda h, w, rh, rw: ChunkedDivergenceFunction.apply(h, w, None, rh, rw, None, 0.0)[0].mean()


def matmul_peak_tflops(device, dtype):
    """Achieved TFLOP/s of one large square matmul: the reference point for 'fraction of peak'. Fifty products
    (about 70 ms on an H100) warm it up first: a GPU still raising its clocks would give a low peak, and every
    fraction of it would look too good."""
    n = 8192 if torch.device(device).type == "cuda" else 512
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / harness.median_ms(lambda: a @ b, device, warmup=50, reps=20) / 1e9


def measure(name, loss_fn, make_inputs, grad_inputs, flops_fwd, flops_fwd_bwd, device, grad_bytes, logits_bytes):
    """(table row, gradients): the row holds the loss, and forward-only and forward+backward time and memory of
    loss_fn; the gradients are those of grad_inputs from one more, untimed backward (None when loss_fn raised)."""
    args = make_inputs()
    # Forward only on detached inputs: Liger computes its gradients inside the forward whenever the inputs
    # require them, even under no_grad. One detached tensor per input tensor: a head passed twice (shared by the
    # policy and the reference) stays one tensor, and the shared-head path runs.
    detached_of = {}
    detached = [detached_of.setdefault(id(a), a.detach()) if isinstance(a, torch.Tensor) else a for a in args]

    def forward():
        with torch.no_grad():
            return loss_fn(*detached)

    def forward_backward():
        for t in grad_inputs(args):
            t.grad = None
        loss_fn(*args).backward()

    try:
        loss = float(forward())
        fwd_ms = harness.median_ms(forward, device)
        fwd_mib = harness.peak_extra_mib(forward, device)
        fb_ms = harness.median_ms(forward_backward, device)
        for t in grad_inputs(args):
            t.grad = None
        fb_mib = harness.peak_extra_mib(forward_backward, device)
        forward_backward()  # untimed: the gradients that the quantity's methods compare
        grads = [t.grad for t in grad_inputs(args)]
    except Exception as err:
        return harness.failure_row(name, err), None
    extra = None if fb_mib is None else fb_mib - grad_bytes / 2 ** 20
    return {"method": name, "loss": loss, "fwd_ms": fwd_ms, "fwd_bwd_ms": fb_ms,
            "fwd_tflops": flops_fwd / fwd_ms / 1e9, "fwd_bwd_tflops": flops_fwd_bwd / fb_ms / 1e9,
            "fwd_peak_mib": fwd_mib, "fwd_bwd_peak_mib": fb_mib,
            "extra_mib": extra, "extra_vs_logits": None if extra is None else extra * 2 ** 20 / logits_bytes}, grads


# (the quantity tells apart the methods of one name on other inputs, and is what the diffs are taken within)
COLUMNS = [("op", "op", "{}"), ("quantity", "quantity", "{}"), ("n", "N", "{}"), ("method", "method", "{}"),
           ("loss_rel_diff", "loss diff", "{:.1e}"),
           ("grad_rel_diff", "grad diff", "{:.1e}"),
           ("fwd_ms", "fwd ms", "{:.2f}"),
           ("fwd_bwd_ms", "fwd+bwd ms", "{:.2f}"), ("fwd_bwd_tflops", "fwd+bwd TFLOP/s", "{:.3g}"),
           ("fwd_bwd_peak_mib", "peak MiB", "{:.0f}"), ("extra_mib", "extra MiB", "{:.1f}"),
           ("extra_vs_logits", "extra/logits", "{:.2%}"), ("error", "error", "{}")]


def write(args, config, rows):
    """The JSON record of the run so far; a shape other than the default 8B head's is a variant beside it."""
    default = (args.hidden, args.vocab) == (4096, 128256) or args.quick
    return harness.write_results("bench_loss", args.device, config, rows,
                                 tag=None if default else f"h{args.hidden}-v{args.vocab}", quick=args.quick)


def report(rows, row, args, config):
    """Adds a row, and rewrites the JSON with every row so far (a run cut short keeps what it measured)."""
    if "fwd_bwd_tflops" in row:
        row["fraction_of_matmul_peak"] = row["fwd_bwd_tflops"] / config["matmul_peak_tflops"]
    rows.append(row)
    write(args, config, rows)
    if args.verbose:
        harness.print_table([row], COLUMNS)


def run(args, config):
    """Every (op, method) at every N: fastalign's rows first (seconds in all), then Liger and CCE, which the
    issue's targets compare them with, then the other baselines, the issue's before TRL's, so that a run cut short
    keeps the rows that matter, and a third-party kernel that fails with a sticky CUDA error (an illegal memory
    access leaves every later CUDA call of the process failing) takes no fastalign row with it.
    Methods of one quantity (an op on one kind of inputs) see the same inputs: loss_rel_diff is the relative
    difference of a row's loss from the first row of its quantity at that N, grad_rel_diff the largest of its
    gradients' (hidden, weight)."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    rows, unavailable = [], config.setdefault("unavailable", {})
    ce, kl = "linear_cross_entropy", "linear_kl_div"
    mean_ce, signed_ce, kl_two_heads, kl_one_head = "mean CE", "signed CE", "KL two heads", "KL shared head"
    methods = [(mean_ce, "fastalign", fastalign_ce), (kl_two_heads, "fastalign", fastalign_kl),
               (mean_ce, "fastalign grads-in-forward", fastalign_ce_in_forward),
               (kl_two_heads, "fastalign grads-in-forward", fastalign_kl_in_forward),
               (signed_ce, "fastalign signed-weights", fastalign_ce_signed),
               (signed_ce, "fastalign signed-weights grads-in-forward", fastalign_ce_signed_in_forward),
               (kl_one_head, "fastalign shared-head", fastalign_kl),
               (kl_one_head, "fastalign shared-head grads-in-forward", fastalign_kl_in_forward),
               (mean_ce, "liger", harness.optional(liger_ce, unavailable)),
               (mean_ce, "cut-cross-entropy", harness.optional(cce_ce, unavailable)),
               (mean_ce, "cut-cross-entropy filter_eps=None", harness.optional(cce_exact_ce, unavailable)),
               (kl_two_heads, "liger jsd beta=0", harness.optional(liger_kl, unavailable)),
               (mean_ce, "torch linear_cross_entropy chunked", harness.optional(torch_chunked_ce, unavailable)),
               (signed_ce, "torch linear_cross_entropy chunked signed-weights",
                harness.optional(torch_chunked_ce_signed, unavailable)),
               (mean_ce, "naive torch", naive_ce),
               (kl_two_heads, "naive torch", naive_kl), (kl_one_head, "naive torch", naive_kl),
               (mean_ce, "torch.compile chunked", compiled_chunked_ce),
               (mean_ce, "trl chunked log-probs", harness.optional(trl_ce, unavailable)),
               (signed_ce, "trl chunked log-probs signed-weights", harness.optional(trl_ce_signed, unavailable)),
               (kl_two_heads, "trl chunked divergence beta=0", harness.optional(trl_kl, unavailable))]
    op_of = {mean_ce: ce, signed_ce: ce, kl_two_heads: kl, kl_one_head: kl}
    h, v = args.hidden, args.vocab
    for n in args.tokens:
        product = 2 * n * h * v  # FLOPs of one [N, H] x [H, V] logits product
        flops = {ce: (product, 3 * product), kl: (2 * product, 4 * product)}  # (forward, forward + backward)
        torch.manual_seed(0)   # the same heads in every run (the inputs below are seeded by N)
        weight = (torch.randn(v, h, device=device, dtype=dtype) / h ** 0.5).requires_grad_()
        ref_weight = torch.randn(v, h, device=device, dtype=dtype) / h ** 0.5

        def ce_inputs():
            torch.manual_seed(n)  # the same inputs for every method
            hidden = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
            target = torch.randint(0, v, (n,), device=device)
            return hidden, weight, target, torch.randn(n, device=device)

        def kl_inputs(shared):
            torch.manual_seed(n)
            hidden = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
            ref_hidden = hidden.detach() + 0.1 * torch.randn_like(hidden)
            return hidden, weight, ref_hidden, weight if shared else ref_weight

        inputs = {mean_ce: ce_inputs, signed_ce: ce_inputs, kl_two_heads: functools.partial(kl_inputs, False),
                  kl_one_head: functools.partial(kl_inputs, True)}
        first_loss, first_grads = {}, {}
        for quantity, name, fn in methods:
            if fn is None:
                continue
            op = op_of[quantity]
            row, grads = measure(name, fn, inputs[quantity], lambda a: a[:2], *flops[op], device,
                                 (n * h + v * h) * dtype.itemsize, n * v * dtype.itemsize)
            if "loss" in row:
                first = first_loss.setdefault(quantity, row["loss"])
                row["loss_rel_diff"] = abs(row["loss"] - first) / max(abs(first), 1e-30)
                row["grad_rel_diff"] = harness.gradients_difference(grads, first_grads.setdefault(quantity, grads))
            del grads
            report(rows, {"op": op, "quantity": quantity, "n": n, **row}, args, config)
        weight = ref_weight = first_grads = None   # freed before the next size allocates its own
    return rows


def stage_rows(args, config, earlier_rows):
    """fastalign's cross-entropy at each N, stage by stage on the kernel API (sum of the token losses): the forward
    (logsumexps), then the backward with both gradients, d_hidden alone, d_weight alone, and neither (the
    kernel that writes each chunk of G alone, the recomputation of the logits included): the differences say what
    the G @ W and G^T @ x products, and their accumulation, cost. Then grads_in_forward's one pass, with both
    gradients and with neither (the library matmul of the logits and the kernels that read them), and with both in
    blocks sized for each budget of --row-block-mib (what a larger block, fewer passes over d_weight, buys); the rows
    with gradients in the forward record the block they ran (rows per block, MiB of its buffers), and a budget whose
    block another row already ran is not run again (config's row_block_budgets_skipped says so). One row per
    (N, stage), ms and TFLOP/s on the products each stage computes, and on CUDA the share of the time the GPU runs
    kernels (the rest it waits for the host's launches). The JSON is rewritten after each row, with earlier_rows
    (the table's) first."""
    rows = []
    for n in args.tokens:
        for name, step, flops, block in _stages(args, n, config.setdefault("row_block_budgets_skipped", {})):
            try:
                ms = harness.median_ms(step, args.device)
                tflops = flops / ms / 1e9
                busy_ms = harness.device_busy_ms(step, args.device)
                row = {"method": f"fastalign {name}", "fwd_ms": ms, "tflops": tflops,
                       "fraction_of_matmul_peak": tflops / config["matmul_peak_tflops"],
                       "busy": None if busy_ms is None else busy_ms / ms, **block}
            except Exception as err:
                row = {**harness.failure_row(name, err), **block}
            rows.append({"op": "linear_cross_entropy stages", "n": n, **row})
            write(args, config, earlier_rows + rows)
    return rows


def _stages(args, n, skipped):
    """(name, step, FLOPs of its products, {block: what it is}) of each stage at N = n, on fresh inputs; a
    --row-block-mib budget whose block an earlier stage runs is left out, and said why in skipped."""
    from fastalign.kernels import linear_cross_entropy as kernel
    device, dtype, h, v = torch.device(args.device), getattr(torch, args.dtype), args.hidden, args.vocab
    torch.manual_seed(n)
    hidden = torch.randn(n, h, device=device, dtype=dtype)
    weight = torch.randn(v, h, device=device, dtype=dtype) / h ** 0.5
    target = torch.randint(0, v, (n,), device=device)
    grad_scale = torch.full((n,), 1.0 / n, device=device)
    lse = kernel.forward(hidden, weight, None, target)[0]
    product = 2 * n * h * v
    stages = [("forward", lambda: kernel.forward(hidden, weight, None, target), product, {})]
    for name, need_hidden, need_weight in (("backward", True, True), ("backward, d_hidden only", True, False),
                                            ("backward, d_weight only", False, True),
                                            ("backward, G chunks only", False, False)):
        stages.append((name, functools.partial(kernel.backward, hidden, weight, None, target, lse, grad_scale,
                                               need_weight, False, need_hidden_grad=need_hidden),
                       product * (1 + need_hidden + need_weight), {}))
    default = row_block(n, v, dtype, None)
    for name, need in (("forward with gradients", True), ("forward with gradients, G only", False)):
        stages.append((name, functools.partial(kernel.forward_with_gradients, hidden, weight, None, target, grad_scale,
                                               need, False, need_hidden_grad=need), product * (1 + 2 * need), default))
    run = {default["rows_per_block"]: "forward with gradients"}
    for mib in args.row_block_mib:
        block = row_block(n, v, dtype, mib * 2 ** 20)
        if block["rows_per_block"] in run:   # (row_block_plan keeps d_weight's rounding to 32 segments at most)
            skipped[f"N={n}, {mib} MiB"] = (f"runs the {block['rows_per_block']}-row blocks "
                                            f"({block['block_mib']:.0f} MiB) of '{run[block['rows_per_block']]}'")
            print(f"--row-block-mib {mib} at N={n}: not run, it {skipped[f'N={n}, {mib} MiB']}")
            continue
        name = run[block["rows_per_block"]] = (f"forward with gradients, {block['rows_per_block']}-row blocks "
                                               f"({block['block_mib']:.0f} MiB)")
        stages.append((name, functools.partial(_with_row_block_bytes, mib * 2 ** 20, kernel.forward_with_gradients,
                                               hidden, weight, None, target, grad_scale, True, False), 3 * product,
                       block))
    return stages


def row_block(n, v, dtype, budget):
    """{rows_per_block, block_mib (its buffers), row_block_budget_mib} of the cross-entropy's forward with gradients
    at N = n under a block budget of `budget` bytes (None: the default): row_block_plan's, which raises a budget's
    rows to N/32 at least, so that a small budget may run the default's blocks."""
    from fastalign.kernels import chunked_backward
    bytes_per_logit = 4 + dtype.itemsize   # (linear_cross_entropy.forward_with_gradients' buffers)
    budget = chunked_backward._ROW_BLOCK_BYTES if budget is None else budget
    rows, _ = _with_row_block_bytes(budget, chunked_backward.row_block_plan, n, v, bytes_per_logit)
    return {"rows_per_block": rows, "block_mib": rows * v * bytes_per_logit / 2 ** 20,
            "row_block_budget_mib": budget / 2 ** 20}


def _with_row_block_bytes(budget, fn, *args):
    """fn(*args) with grads_in_forward's blocks of whole logits rows sized for `budget` bytes instead of the default
    (kernels/chunked_backward.py's _ROW_BLOCK_BYTES), to measure what the block size buys."""
    from fastalign.kernels import chunked_backward
    default = chunked_backward._ROW_BLOCK_BYTES
    chunked_backward._ROW_BLOCK_BYTES = budget
    try:
        return fn(*args)
    finally:
        chunked_backward._ROW_BLOCK_BYTES = default


STAGE_COLUMNS = [("op", "op", "{}"), ("n", "N", "{}"), ("method", "stage", "{}"), ("fwd_ms", "ms", "{:.2f}"),
                 ("tflops", "TFLOP/s", "{:.3g}"), ("fraction_of_matmul_peak", "of peak", "{:.0%}"),
                 ("busy", "GPU busy", "{:.0%}"), ("rows_per_block", "block rows", "{}"),
                 ("block_mib", "block MiB", "{:.0f}"), ("error", "error", "{}")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small fp32 shape (N 256, H 128, V 4099) for any device")
    parser.add_argument("--device", type=harness.device_argument,
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        help="default: bfloat16 on CUDA, float32 elsewhere")
    parser.add_argument("--hidden", type=harness.count_at_least(1), help="default: 4096 (--quick: 128)")
    parser.add_argument("--vocab", type=harness.count_at_least(1), help="default: 128256 (--quick: 4099)")
    parser.add_argument("--tokens", type=harness.count_at_least(1), nargs="+",
                        help="default: 2048 4096 8192 16384 (--quick: 256)")
    parser.add_argument("--verbose", action="store_true", help="print each row as it is measured")
    parser.add_argument("--stages", action="store_true",
                        help="also fastalign's cross-entropy stage by stage (forward; backward with both, one or "
                             "neither of the gradients' products; the forward with gradients)")
    parser.add_argument("--row-block-mib", type=harness.count_at_least(1), nargs="*", default=[], metavar="MIB",
                        help="with --stages, also the forward with gradients in blocks of whole logits rows sized for "
                             "each of these budgets (the default is 192 MiB)")
    args = parser.parse_args()
    if args.row_block_mib and not args.stages:   # (measured nothing more, silently)
        parser.error("--row-block-mib sizes the blocks of --stages' forward with gradients: it needs --stages")
    if args.stages and torch.device(args.device).type != "cuda" and not triton_interpreting():
        parser.error("--stages times the Triton kernels: it needs --device cuda (or TRITON_INTERPRET=1, Triton's "
                     "interpreter, on the CPU)")
    # the quick shapes where the command line left the default
    defaults = (128, 4099, [256]) if args.quick else (4096, 128256, [2048, 4096, 8192, 16384])
    for name, default in zip(("hidden", "vocab", "tokens"), defaults):
        setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
    args.dtype = args.dtype or ("bfloat16" if torch.device(args.device).type == "cuda" and not args.quick
                                else "float32")
    peak = matmul_peak_tflops(args.device, getattr(torch, args.dtype))
    config = {"hidden": args.hidden, "vocab": args.vocab, "tokens": args.tokens, "dtype": args.dtype,
              "matmul_peak_tflops": peak}
    rows = run(args, config)
    print(f"device: {harness.device_name(args.device)}   dtype: {args.dtype}   H={args.hidden} V={args.vocab}   "
          f"measured {args.dtype} matmul peak: {peak:.3g} TFLOP/s")
    harness.print_table(rows, COLUMNS + [("fraction_of_matmul_peak", "of peak", "{:.0%}")])
    if args.stages:
        stages = stage_rows(args, config, rows)
        harness.print_table(stages, STAGE_COLUMNS)
        rows = rows + stages
    print("wrote", write(args, config, rows))


if __name__ == "__main__":
    main()
