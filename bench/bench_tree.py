"""Benchmark of the tree KV runtime (issue 3): decode attention over shared prefixes, and the TreeRunner.

Sections (each prints its own table; the JSON holds every row with its section):

attention   Decode attention of R rows that share a prefix of P tokens (its full blocks stored once, the
            partly filled last block copied per row, as copy-on-write leaves it) plus a private suffix.
              fastalign paged   fastalign.ops.paged_attention (Triton on CUDA; the torch path on CPU, and
                                the Triton kernel there too when TRITON_INTERPRET=1 is set)
              ... cascade       the same with shared_prefix from plan_shared_prefix (Triton only): the
                                shared blocks are read once for all rows; "plan us" is the host-side
                                planning, once per forward (not per layer), not included in the time
              dense sdpa        torch scaled_dot_product_attention over per-row contiguous copies of the KV
                                (what a cache without paging holds; building the copies is not timed)
            Bandwidth counts unique KV bytes: every pool token that some row reads, once, whatever the
            number of rows reading it, against the device's measured copy bandwidth (read + write of a
            large buffer); target 60%. Consecutive calls read distinct copies of the pool, together at
            least 4x the device's L2 cache, as a model's layers do: the same few MiB read call after call
            would come from L2, not HBM. On CUDA each call is timed inside a CUDA graph (kernel time
            without Python launch cost, "graph us") and eagerly ("eager us"). The largest output
            difference to dense sdpa is printed as a sanity check.
extend      A random Llama (Llama-3.2-1B shape in bf16 on CUDA) holding a prefix of 1,500 tokens: one
            batched extend of 10 children by 10 tokens each against one child by 10 tokens; target 1.5x.
            On CUDA both with the runner's cascade attention (the children read the prefix blocks once)
            and without it (cascade_attention=False: once per child).
rewind      Releasing a branch of L tokens below the prefix (what a search does when it rewinds), and
            extending the prefix by one token afterwards, for growing L: both should stay flat.
decode      Plain batch-1 greedy decoding: TreeRunner (one extend per token) against Hugging Face
            generate with its cache, same model and prompt; target: runner time <= 1.3x generate's.
            "kernels/token": the torch operators (views and allocations aside) and Triton launches of one step, the
            runner's extend against the model's cached forward: what a step bound by launches pays for (on
            the CPU with --attention-backend triton under TRITON_INTERPRET=1, the count a GPU's run launches; in
            the CUDA graphs row, the operators the host still dispatches around a replay, which counts as none).
            --family phi3 runs these three sections on a random Phi-3 of the same shape instead: a family
            that the runner takes through transformers' attention interface (PagedHF), not by its layout.
            --family gemma3: Gemma 3's layers on the same shape, five of each six sliding a window of 512
            (Gemma-3-1B's), shorter than the prefix: the cascade's shared pass reads each query's window only.
            --family qwen3_5: Qwen3.5's hybrid on the same shape, three Gated DeltaNet layers to one of full
            attention (HFStateCacheModel: Hugging Face's forward, each span's recurrent state kept).
            The extend section also times the model's own forward over the children's whole sequences, with
            no cache: what a search without one (the reference RAIN code) runs for them.

    python bench/bench_tree.py            # CUDA, bf16, the shapes above
    python bench/bench_tree.py --quick    # small fp32 shapes, runs anywhere (CPU smoke run)
    python bench/bench_tree.py --sections runner --family phi3
    python bench/bench_tree.py --sections runner --family gemma3
    python bench/bench_tree.py --sections runner --family qwen3_5
    TRITON_INTERPRET=1 python bench/bench_tree.py --quick --sections runner --attention-backend triton
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # this checkout's fastalign
from bench import harness  # noqa: E402

from fastalign.ops.backend import triton_interpreting  # noqa: E402
from fastalign.ops.paged_attention import check_paged_metadata, paged_attention, plan_shared_prefix  # noqa: E402
from fastalign.runtime.graphed_forward import capture_cuda_graph  # noqa: E402

BANDWIDTH_TARGET = 0.6  # issue 3: decode attention reaches 60% of measured HBM bandwidth (unique KV bytes)
BATCHED_EXTEND_TARGET = 1.5  # 10 children x 10 tokens cost at most 1.5x one child x 10 tokens
DECODE_TARGET = 1.3  # runner greedy decoding within 1.3x the time of Hugging Face generate


def shared_prefix_batch(rows, prefix, suffix, heads, kv_heads, head_dim, page, dtype, device):
    """Queries of one decode token per row, a pool holding the rows' contexts, and the paged metadata.

    Returns (batch for paged_attention, unique tokens read from the pool, its shared_prefix plan or None,
    planning time in us)."""
    shared_blocks = prefix // page
    private_tokens = prefix - shared_blocks * page + suffix + 1  # copied tail of the prefix, suffix, new token
    private_blocks = -(-private_tokens // page)
    num_blocks = shared_blocks + rows * private_blocks
    private_ids = shared_blocks + torch.randperm(rows * private_blocks).view(rows, private_blocks)
    table = torch.cat([torch.arange(shared_blocks).expand(rows, shared_blocks), private_ids], 1).int()
    seq_len = prefix + suffix + 1
    pool_shape = (num_blocks, page, kv_heads, head_dim)
    batch = dict(q=torch.randn(rows, heads, head_dim, device=device, dtype=dtype),
                 k_cache=torch.randn(pool_shape, device=device, dtype=dtype),
                 v_cache=torch.randn(pool_shape, device=device, dtype=dtype),
                 block_table=table.to(device), seq_lens=torch.full((rows,), seq_len, dtype=torch.int32, device=device),
                 cu_q_lens=torch.arange(rows + 1, dtype=torch.int32, device=device))
    host_seq_lens, host_cu_q_lens = batch["seq_lens"].cpu(), batch["cu_q_lens"].cpu()
    check_paged_metadata(table, host_seq_lens, host_cu_q_lens, num_tokens=rows, num_blocks=num_blocks, block_size=page)
    start = time.perf_counter()
    plan = plan_shared_prefix(table, host_seq_lens, host_cu_q_lens, page)
    plan_us = (time.perf_counter() - start) * 1e6
    shared_prefix = None if plan is None else tuple(t.to(device) for t in plan)
    return batch, shared_blocks * page + rows * private_tokens, shared_prefix, plan_us


def dense_copies(batch, seq_len):
    """Each row's context as contiguous [R, kv_heads, seq_len, head_dim] K and V (gathered, not timed)."""
    def gather(cache):
        rows = cache[batch["block_table"].long()].flatten(1, 2)[:, :seq_len]  # [R, S, kv_heads, D]
        return rows.transpose(1, 2).contiguous()
    return gather(batch["k_cache"]), gather(batch["v_cache"])


def dense_sdpa(q, k, v):
    """Decode attention of q [R, heads, D] over dense k, v [R, kv_heads, S, D] (one query: no mask)."""
    return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True).squeeze(2)


def copy_bandwidth_gbs(device):
    """Measured device memory bandwidth: bytes read + written by copying a large buffer, per second."""
    n = (1 << 30 if torch.device(device).type == "cuda" else 1 << 26) // 4
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    ms = harness.median_ms(lambda: dst.copy_(src), device, warmup=3, reps=10)
    return 2 * n * 4 / ms / 1e6


def l2_cache_bytes(device):
    """The device's L2 cache size (0 off CUDA, where the bench measures no bandwidth target)."""
    if torch.device(device).type != "cuda":
        return 0
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20


def copies_past_l2(nbytes, device):
    """How many distinct copies of nbytes of KV, read in turn, touch at least 4x the L2 cache: each call then
    reads its KV from HBM, not from L2 where the previous call left it (in a model, the other layers' KV come in
    between)."""
    return max(1, -(-4 * l2_cache_bytes(device) // nbytes))


def pool_copies(batch, unique_bytes, device):
    """batch, then copies of it with K and V pools of their own (same metadata): copies_past_l2 in all."""
    copies = copies_past_l2(unique_bytes, device)
    return [batch] + [{**batch, "k_cache": torch.randn_like(batch["k_cache"]),
                       "v_cache": torch.randn_like(batch["v_cache"])} for _ in range(copies - 1)]


def per_call_us(fn, device, iters):
    """(graph us, eager us) per call of fn(i) for i in range(iters); graph us is None off CUDA or when capture
    fails."""
    eager = harness.median_ms(lambda: [fn(i) for i in range(iters)], device) * 1e3 / iters
    if torch.device(device).type != "cuda":
        return None, eager
    try:   # on the device's own stream, with it current (as TreeRunner's graphs: graphed_forward.py)
        replay, _ = capture_cuda_graph(lambda: [fn(i) for i in range(iters)], None, torch.device(device))
    except RuntimeError as err:
        print(f"  (CUDA graph capture failed: {err}; graph time left empty)")
        return None, eager
    return harness.median_ms(replay, device) * 1e3 / iters, eager


def attention_rows(args, device, dtype, copy_gbs, report=lambda rows: None):
    """Table rows of the decode attention section; report(rows so far) after each row, so that a run cut short
    keeps the rows it measured. A (prefix, rows) pair whose inputs cannot be built (out of memory) gives an error
    row and the next pairs still run, as do the runner sections after them."""
    backends = ["triton" if device.type == "cuda" or triton_interpreting() else None, "torch"]
    if device.type == "cuda":
        backends.remove("torch")  # the torch path is the CPU path: a per-row loop with a host sync on CUDA
    out_rows = []

    def add(row):
        out_rows.append(row)
        report(out_rows)
    for prefix in args.prefix:
        for rows in args.rows:
            try:
                pair_rows(args, prefix, rows, backends, device, dtype, copy_gbs, add)
            except Exception as err:
                add({"section": "attention", "prefix": prefix, "rows": rows, **harness.failure_row("inputs", err)})
    return out_rows


def pair_rows(args, prefix, rows, backends, device, dtype, copy_gbs, add):
    """add(row) for each method on R = rows rows sharing a prefix of `prefix` tokens."""
    batch, unique_tokens, shared_prefix, plan_us = shared_prefix_batch(
        rows, prefix, args.suffix, args.heads, args.kv_heads, args.head_dim, args.page, dtype, device)
    seq_len = prefix + args.suffix + 1
    token_bytes = 2 * args.kv_heads * args.head_dim * dtype.itemsize  # K and V of one token
    unique_bytes = unique_tokens * token_bytes
    common = {"section": "attention", "prefix": prefix, "rows": rows, "unique_mib": unique_bytes / 2 ** 20}
    batches = pool_copies(batch, unique_bytes, device)
    calls = max(args.iters, len(batches))  # every copy read once per timed run of calls
    candidates = [(f"fastalign paged ({b})", lambda i, b=b: paged_attention(
        **batches[i % len(batches)], backend=b, validate=False)) for b in backends if b]
    if shared_prefix is not None and backends[0] == "triton":
        candidates.append(("fastalign paged cascade (triton)", lambda i: paged_attention(
            **batches[i % len(batches)], backend="triton", validate=False, shared_prefix=shared_prefix)))
    if backends[0] == "triton":   # the kernel with each key split count asked for, beside the count it picks itself
        from fastalign.kernels.paged_attention import paged_attention_triton
        scale = args.head_dim ** -0.5
        candidates += [(f"fastalign paged (triton, {s} splits)", lambda i, s=s: paged_attention_triton(
            **batches[i % len(batches)], scale=scale, num_splits=s)) for s in args.splits]
    dense_bytes = rows * seq_len * token_bytes
    expected = None
    if dense_bytes > args.dense_limit_gib * 2 ** 30:
        add({**common, "method": "dense sdpa", "error": "per-row copies over --dense-limit-gib"})
    else:
        try:  # the per-row copies (the largest inputs here) and the reference output
            dense = [dense_copies(b, seq_len) for b in batches[:copies_past_l2(dense_bytes, device)]]
            expected = dense_sdpa(batch["q"], *dense[0]).float()
            candidates.append(("dense sdpa", lambda i: dense_sdpa(batch["q"], *dense[i % len(dense)])))
        except Exception as err:  # no reference output: the paged rows are still timed, not compared
            add({**common, **harness.failure_row("dense sdpa", err)})
    for name, fn in candidates:
        try:  # one failing method (a kernel that does not build or launch here) leaves the others' rows
            graph_us, eager_us = per_call_us(fn, device, calls)
            diff = None if expected is None else (fn(0).float() - expected).abs().max().item()
        except Exception as err:
            add({**common, **harness.failure_row(name, err)})
            continue
        best_us = graph_us or eager_us
        gbs = unique_bytes / best_us / 1e3
        add({**common, "method": name, "graph_us": graph_us, "eager_us": eager_us,
             "plan_us": plan_us if "cascade" in name else None,
             "unique_gbs": gbs, "of_copy_bw": gbs / copy_gbs, "max_diff": diff})


ATTENTION_COLUMNS = [("prefix", "prefix", "{}"), ("rows", "rows", "{}"), ("unique_mib", "unique KV MiB", "{:.2f}"),
                     ("method", "method", "{}"), ("graph_us", "graph us", "{:.1f}"), ("eager_us", "eager us", "{:.1f}"),
                     ("plan_us", "plan us", "{:.0f}"),
                     ("unique_gbs", "unique GB/s", "{:.0f}"), ("of_copy_bw", "of copy bw", "{:.0%}"),
                     ("max_diff", "max |diff| vs sdpa", "{:.2e}"), ("error", "error", "{}")]


EXTEND_COLUMNS = [("prefix", "prefix", "{}"), ("children", "children", "{}"), ("tokens_each", "tokens each", "{}"),
                  ("method", "method", "{}"), ("cascade", "cascade", "{}"), ("ms", "ms", "{:.2f}"),
                  ("vs_one_child", "vs runner's one child", "{:.2f}x"), ("error", "error", "{}")]
REWIND_COLUMNS = [("prefix", "prefix", "{}"), ("branch_tokens", "branch tokens", "{}"),
                  ("release_us", "release us", "{:.1f}"), ("extend_after_us", "extend 1 token after, us", "{:.0f}"),
                  ("error", "error", "{}")]
DECODE_COLUMNS = [("prompt", "prompt", "{}"), ("new_tokens", "new tokens", "{}"), ("method", "method", "{}"),
                  ("ms", "ms", "{:.1f}"), ("tokens_per_s", "tokens/s", "{:.1f}"), ("vs_hf", "time vs HF", "{:.2f}x"),
                  ("same_greedy_tokens", "same greedy tokens", "{}"), ("max_logit_diff", "max logit diff", "{:.1e}"),
                  ("kernels_per_token", "kernels/token", "{}"),
                  ("triton_launches", "of them Triton", "{}"), ("error", "error", "{}")]
def random_model(quick, device, dtype, family="llama"):
    """A random-weight causal LM of `family` ("llama"; "phi3": Phi-3's fused projections on the same shape;
    "gemma3": Gemma 3's layers, five of six sliding a window of 512, 8 with --quick): Llama-3.2-1B's shape, or a
    tiny one with --quick."""
    import transformers
    config_class, model_class = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                                 "phi3": ("Phi3Config", "Phi3ForCausalLM"),
                                 "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
                                 "qwen3_5": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM")}[family]
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # Phi-3's defaults lie past the tiny vocabulary
    if quick:
        shape = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
    else:
        shape = dict(harness.LLAMA_SHAPES["1b"], max_position_embeddings=131072)
    if family == "gemma3":   # Gemma 3's pattern of layers (with --quick, one of each)
        kinds = ["sliding_attention", "full_attention"] if quick else [
            "full_attention" if i % 6 == 5 else "sliding_attention" for i in range(shape["num_hidden_layers"])]
        shape.update(sliding_window=8 if quick else 512, query_pre_attn_scalar=shape["head_dim"], layer_types=kinds)
    if family == "qwen3_5":   # Qwen3.5's hybrid: three Gated DeltaNet layers for each full attention layer
        shape["layer_types"] = harness.qwen3_5_layer_types(shape["num_hidden_layers"])
        heads = dict(linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16,
                     linear_value_head_dim=16) if quick else {}   # else Qwen3.5's own: 16 key heads, 32 value
        shape.update(heads)
    config = getattr(transformers, config_class)(**shape, **ids)
    with torch.device(device):
        model = getattr(transformers, model_class)(config)
    model.generation_config.eos_token_id = None  # random weights: decode exactly the asked number of tokens
    model.generation_config.pad_token_id = 0
    return model.to(dtype).eval()


def median_ms_of_steps(step, cleanup, device, *, prepare=tuple, warmup=2, reps=5):
    """Median time of step(*prepare()) in ms; prepare() (the step's host-side inputs) runs before each and
    cleanup(result) after each, both untimed."""
    times = []
    for i in range(warmup + reps):
        inputs = prepare()
        harness.synchronize(device)
        start = time.perf_counter()
        result = step(*inputs)
        harness.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
        cleanup(result)
    return statistics.median(times)


def random_tokens(n, vocab):
    return torch.randint(0, vocab, (n,)).tolist()


def extend_rows(runner, root, vocab, device, children_counts, tokens_each, cascade, baseline):
    """Time of one batched extend of k children of root by tokens_each tokens, for each k (the tokens drawn
    beforehand); with `baseline`, also of the model's forward over the same children's whole sequences."""
    rows, one_child_ms = [], None
    for k in children_counts:
        def draw(k=k):
            return ([random_tokens(tokens_each, vocab) for _ in range(k)],)

        def step(token_lists, k=k):
            return runner.extend([root] * k, token_lists)[0]
        ms = median_ms_of_steps(step, runner.release, device, prepare=draw)
        one_child_ms = ms if k == 1 else one_child_ms
        common = {"section": "extend", "prefix": root.length, "children": k, "tokens_each": tokens_each}
        rows.append({**common, "method": f"TreeRunner ({type(runner.model_runner).__name__})", "cascade": cascade,
                     "ms": ms, "vs_one_child": None if one_child_ms is None else ms / one_child_ms})
        if baseline:
            ms = whole_sequences_ms(runner.model, root.tokens, vocab, device, k, tokens_each)
            rows.append({**common, "method": "HF forward, whole sequences", "cascade": "-", "ms": ms,
                         "vs_one_child": ms / one_child_ms})   # against the runner's one child
    return rows


def whole_sequences_ms(model, prefix, vocab, device, k, tokens_each):
    """Time of the model's own forward over k whole sequences of the prefix and tokens_each tokens each, with no
    cache and the last token's logits only: what a search without a cache runs for the same children (the reference
    RAIN code, and TreeRunner's last fallback, HFRecomputeModel)."""
    def draw():
        return (torch.tensor([list(prefix) + random_tokens(tokens_each, vocab) for _ in range(k)], device=device),)

    def step(ids):
        with torch.inference_mode():
            return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
    return median_ms_of_steps(step, lambda out: None, device, prepare=draw)


def rewind_rows(runner, root, vocab, device, branch_lengths, reps=5):
    """Release of a branch of L tokens under root, then one-token extend of root, for each L (us)."""
    rows = []
    for length in branch_lengths:
        release_us, extend_us = [], []
        for _ in range(reps):
            (branch,), _ = runner.extend([root], [random_tokens(length, vocab)], logits=None)
            harness.synchronize(device)
            start = time.perf_counter()
            runner.release(branch)
            release_us.append((time.perf_counter() - start) * 1e6)
            token = random_tokens(1, vocab)
            start = time.perf_counter()
            (child,), _ = runner.extend([root], [token])
            harness.synchronize(device)
            extend_us.append((time.perf_counter() - start) * 1e6)
            runner.release(child)
        rows.append({"section": "rewind", "prefix": root.length, "branch_tokens": length,
                     "release_us": statistics.median(release_us), "extend_after_us": statistics.median(extend_us)})
    return rows


def decode_rows(model, runner, prompt, new_tokens, device, label="fastalign TreeRunner"):
    """Greedy batch-1 decoding of new_tokens tokens: TreeRunner (its row's method `label`) against Hugging Face
    generate. Besides the tokens, the largest difference of the runner's logits at each step from those of one
    Hugging Face forward over the same sequence (greedy tokens of a random model rarely tell a wrong attention)."""
    def runner_decode(step_logits=None):
        """As generate: the prompt's forward gives the first token, one forward per further token (none after the
        last); each step's logits appended to step_logits when given."""
        (span,), logits = runner.extend([None], [prompt])
        produced = [int(logits[0].argmax())]
        kept = step_logits.append if step_logits is not None else lambda step: None
        kept(logits[0])
        while len(produced) < new_tokens:
            (child,), logits = runner.extend([span], [produced[-1:]])
            runner.release(span)
            span = child
            produced.append(int(logits[0].argmax()))
            kept(logits[0])
        runner.release(span)
        return produced

    ids = torch.tensor([prompt], device=device)

    def hf_generate():
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, use_cache=True)
        return out[0, len(prompt):].tolist()

    def runner_step_kernels():
        (span,), logits = runner.extend([None], [prompt])
        children = []
        counts = harness.kernels_of_call(lambda: children.extend(runner.extend([span], [[int(logits[0].argmax())]])[0]))
        runner.release([span] + children)
        return counts

    def hf_step_kernels():
        from fastalign.runtime.hf_cache_argument import cache_kwargs, returned_cache
        with torch.inference_mode():
            out = model(ids, attention_mask=torch.ones_like(ids), use_cache=True)
            step = out.logits[:, -1:].argmax(-1)
            mask = torch.ones(1, ids.shape[1] + 1, dtype=ids.dtype, device=device)
            cache = cache_kwargs(model, returned_cache(out))
            return harness.kernels_of_call(lambda: model(step, attention_mask=mask, use_cache=True, **cache))

    step_logits = []
    ours, theirs = runner_decode(step_logits), hf_generate()
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
    with torch.inference_mode():
        whole = model(torch.tensor([prompt + ours[:-1]], device=device)).logits[0, len(prompt) - 1:]
    max_logit_diff = float((torch.stack(step_logits).float() - whole.float()).abs().max())
    del step_logits, whole
    hf_ms = harness.median_ms(hf_generate, device, warmup=1, reps=3)
    runner_ms = harness.median_ms(runner_decode, device, warmup=1, reps=3)
    common = {"section": "decode", "prompt": len(prompt), "new_tokens": new_tokens}
    return [{**common, "method": label, "ms": runner_ms, "tokens_per_s": new_tokens / runner_ms * 1e3,
             "vs_hf": runner_ms / hf_ms, "same_greedy_tokens": same, "max_logit_diff": max_logit_diff,
             **kernel_counts(runner_step_kernels())},
            {**common, "method": "HF generate (cache)", "ms": hf_ms, "tokens_per_s": new_tokens / hf_ms * 1e3,
             "vs_hf": 1.0, **kernel_counts(hf_step_kernels())}]


def kernel_counts(counts):
    """A decode row's kernels of one step (the runner's extend by one token, or the model's cached forward), from
    harness.kernels_of_call."""
    torch_ops, triton_launches = counts
    return {"kernels_per_token": torch_ops + triton_launches, "triton_launches": triton_launches}


def runner_rows(args, device, dtype, report=lambda rows: None):
    """Rows of the extend, rewind and decode sections; report(rows so far) after each section, so that a run cut
    short keeps the sections it finished. A section that raises becomes an error row; the next ones still run."""
    from fastalign.runtime import TreeRunner
    model = random_model(args.quick, device, dtype, args.family)
    vocab = model.config.vocab_size
    prefix = random_tokens(args.tree_prefix, vocab)
    rows, runner, root, runner_error = [], None, None, None

    def section(name, measure):
        try:
            rows.extend(measure())
        except Exception as err:
            rows.append({"section": name, **harness.failure_row(name, err)})
        report(rows)

    def extend(cascade, graphs=False):
        nonlocal runner, root, runner_error
        runner, root = None, None
        try:
            runner = TreeRunner(model, max_tokens=args.pool_tokens, cascade_attention=cascade == "on",
                                cuda_graphs=graphs, attention_backend=args.attention_backend)
            root = runner.prefill(prefix)
        except Exception as err:
            runner_error = err
            raise
        runner.pin(root)
        return extend_rows(runner, root, vocab, device, [1, args.children], args.child_tokens, cascade,
                           baseline=cascade in ("off", "-") and not graphs)   # once
    for cascade in ("off", "on") if device.type == "cuda" else ("-",):  # the torch backend has no cascade
        section("extend", lambda: extend(cascade))
    def built_runner():
        """The runner the last extend section built; an error saying why there is none where it could not build it
        (an AttributeError of None once stood in those sections' rows)."""
        if root is None:
            raise RuntimeError(f"no TreeRunner: the extend section could not build one ({runner_error})")
        return runner
    # the last runner (with the cascade, where there is one) serves the rewind and decode sections
    section("rewind", lambda: rewind_rows(built_runner(), root, vocab, device, args.branch_lengths))
    decode_prompt = random_tokens(args.decode_prompt, vocab)
    section("decode", lambda: decode_rows(model, built_runner(), decode_prompt, args.decode_tokens, device))
    if device.type == "cuda" and args.family == "llama":   # CUDA graphs (graphed_forward.py): PagedLlama only
        section("extend", lambda: extend("off", graphs=True))
        section("decode", lambda: decode_rows(model, built_runner(), decode_prompt, args.decode_tokens, device,
                                              label="fastalign TreeRunner, CUDA graphs")[:1])
    return rows



def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small fp32 shapes for any device (smoke run)")
    parser.add_argument("--device", type=harness.device_argument,
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        help="default: bfloat16 on CUDA, float32 elsewhere")
    parser.add_argument("--sections", nargs="+", choices=["attention", "runner"], default=["attention", "runner"],
                        help="runner = the extend, rewind and decode sections")
    group = parser.add_argument_group("attention")
    group.add_argument("--heads", type=harness.count_at_least(1), default=32)
    group.add_argument("--kv-heads", type=harness.count_at_least(1), default=8)
    group.add_argument("--head-dim", type=harness.count_at_least(1), default=64)
    group.add_argument("--page", type=harness.count_at_least(1), default=16, help="tokens per pool block")
    group.add_argument("--prefix", type=harness.count_at_least(1), nargs="+", default=[1500, 8000, 32000])
    group.add_argument("--rows", type=harness.count_at_least(1), nargs="+", default=[1, 10, 64])
    group.add_argument("--suffix", type=harness.count_at_least(0), default=10,
                       help="private tokens of each row before its new token")
    group.add_argument("--iters", type=harness.count_at_least(1), default=20, help="calls per timed measurement")
    group.add_argument("--dense-limit-gib", type=float, default=8.0)
    group.add_argument("--splits", type=harness.count_at_least(1), nargs="*", default=[],
                       help="also time the Triton kernel with each of these key split counts (its own choice aside)")
    group = parser.add_argument_group("runner")
    group.add_argument("--tree-prefix", type=harness.count_at_least(1), default=1500)
    group.add_argument("--children", type=harness.count_at_least(1), default=10)
    group.add_argument("--child-tokens", type=harness.count_at_least(1), default=10)
    group.add_argument("--branch-lengths", type=harness.count_at_least(1), nargs="+", default=[16, 256, 2048, 8192])
    group.add_argument("--decode-prompt", type=harness.count_at_least(1), default=128)
    group.add_argument("--decode-tokens", type=harness.count_at_least(1), default=128)
    group.add_argument("--pool-tokens", type=harness.count_at_least(1), default=1 << 16)
    group.add_argument("--attention-backend", choices=["auto", "torch", "triton"], default="auto",
                       help="the runner's (auto: Triton on CUDA; triton on the CPU needs TRITON_INTERPRET=1)")
    group.add_argument("--family", choices=["llama", "phi3", "gemma3", "qwen3_5"], default="llama",
                       help="the random model's family (phi3: run through transformers' attention interface; gemma3: "
                            "layers sliding a window shorter than the prefix; qwen3_5: Qwen3.5's linear-attention "
                            "hybrid, on Hugging Face's cache with each span's recurrent state kept)")
    args = parser.parse_args()
    if args.quick:   # small shapes, each where the command line left the default
        quick = dict(heads=4, kv_heads=2, head_dim=32, prefix=[100], rows=[1, 4], iters=2, tree_prefix=100,
                     branch_lengths=[16, 64, 256], decode_prompt=16, decode_tokens=16, pool_tokens=4096,
                     dtype="float32")
        for key, value in quick.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    # what cannot run is a usage error, not a record of error rows (which replaced the last good one)
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads} (grouped queries)")
    triton_here = torch.device(args.device).type == "cuda" or triton_interpreting()
    for given, option in ((args.attention_backend == "triton" and "runner" in args.sections, "--attention-backend "
                           "triton"), (args.splits and "attention" in args.sections, "--splits")):
        if given and not triton_here:
            parser.error(f"{option} runs the Triton kernels: it needs --device cuda (or TRITON_INTERPRET=1, Triton's "
                         "interpreter, on the CPU)")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)
    print(f"device: {harness.device_name(device)}   dtype: {dtype}")
    rows, config = [], {"dtype": str(dtype), "quick": args.quick}

    def write(record_rows):   # another family, backend or one section alone is a variant, beside the default run
        variant = [args.family] * (args.family != "llama") + [f"{args.attention_backend}-backend"] * (
            args.attention_backend != "auto") + (args.sections if len(set(args.sections)) == 1 else [])
        return harness.write_results("bench_tree", device, config, record_rows, tag="-".join(variant) or None,
                                     quick=args.quick)
    if "attention" in args.sections:
        copy_gbs = copy_bandwidth_gbs(device)
        config.update({key: getattr(args, key) for key in ("heads", "kv_heads", "head_dim", "page", "prefix",
                                                             "rows", "suffix", "iters")},
                      copy_bandwidth_gbs=copy_gbs, bandwidth_target=BANDWIDTH_TARGET)
        attention = attention_rows(args, device, dtype, copy_gbs, report=write)
        print(f"\n[attention] heads {args.heads}/{args.kv_heads} kv, head_dim {args.head_dim}, page {args.page}, "
              f"suffix {args.suffix}; measured copy bandwidth {copy_gbs:.0f} GB/s; target {BANDWIDTH_TARGET:.0%} of it")
        harness.print_table(attention, ATTENTION_COLUMNS)
        rows += attention
    if "runner" in args.sections:
        config.update({key: getattr(args, key) for key in ("tree_prefix", "children", "child_tokens",
                                                             "branch_lengths", "decode_prompt", "decode_tokens",
                                                             "pool_tokens", "family", "attention_backend")},
                      batched_extend_target=BATCHED_EXTEND_TARGET, decode_target=DECODE_TARGET)
        runner = runner_rows(args, device, dtype, report=lambda section_rows: write(rows + section_rows))
        for section, columns, note in (
                ("extend", EXTEND_COLUMNS, f"target: {args.children} children <= {BATCHED_EXTEND_TARGET}x one child"),
                ("rewind", REWIND_COLUMNS, "target: flat in the branch length"),
                ("decode", DECODE_COLUMNS, f"target: runner time <= {DECODE_TARGET}x HF generate")):
            shape = "tiny" if args.quick else "Llama-3.2-1B shape"
            print(f"\n[{section}] random {args.family} ({shape}); {note}")
            harness.print_table([row for row in runner if row["section"] == section], columns)
        rows += runner
    print("\nwrote", write(rows))


if __name__ == "__main__":
    main()
