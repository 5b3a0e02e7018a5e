"""RAIN: the tree engine against the batch-1 reference engine, and against plain KV-cached greedy decoding.

Both engines run with the keyed sampler, so they make the same decisions and commit the same tokens; the
table compares tokens through the model, model calls and wall time per committed token, and the tree
engine's tokens against the tree's minimum. Then the tree engine's throughput at several concurrencies.

    python bench/bench_rain.py --quick                 # CPU: tiny random Llama, short answers
    python bench/bench_rain.py --model DIR --hh /path/hh-harmless-base-test.jsonl.gz --dtype bfloat16
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.harness import print_table, write_results  # noqa: E402
from fastalign.rain import RainConfig, rain_generate  # noqa: E402
from fastalign.rain.cli import greedy_answer, hh_prompts  # noqa: E402


def load(args):
    if args.quick:
        from fastalign.rain import JudgePrompt
        from tests.rain.tiny import PROMPTS, tiny_llama, tokenizer
        return tiny_llama(hidden=64).to(args.device), tokenizer(), PROMPTS, JudgePrompt()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from fastalign.rain import JudgePrompt
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    return model, tok, hh_prompts(args.hh), JudgePrompt()


def row(name, run, extra=None):
    s = run.stats
    out = {"engine": name, "prompts": len(run.results), "committed": s.committed_tokens, "calls": s.model_calls,
           "rows_per_call": s.rows_per_call, "tokens": s.tokens, "tokens_per_commit": s.tokens_per_committed_token,
           "minimum": s.minimum_tokens, "over_minimum": s.tokens_over_minimum, "recomputed": s.recomputed_tokens,
           "calls_per_commit": s.model_calls / max(s.committed_tokens, 1), "wall_s": s.wall_seconds,
           "s_per_commit": s.wall_seconds / max(s.committed_tokens, 1),
           "commits_per_s": s.committed_tokens / max(s.wall_seconds, 1e-9),
           "phases_s": dict(s.seconds), "errors": sum(r.error is not None for r in run.results)}
    out.update(extra or {})
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random Llama on CPU")
    parser.add_argument("--model")
    parser.add_argument("--hh")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--root-visits", type=int, default=None)
    parser.add_argument("--embedding", default="hidden", choices=("hidden", "minilm"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--skip-slow", action="store_true")
    args = parser.parse_args()
    if not args.quick and not (args.model and args.hh):
        parser.error("give --quick, or --model and --hh")
    model, tok, prompts, judge = load(args)
    config = RainConfig(max_new_tokens=args.max_new_tokens or (8 if args.quick else 64),
                        root_visits=args.root_visits or (10 if args.quick else 50))
    prompts = prompts[:args.prompts]
    common = dict(judge_prompt=judge, embedding=args.embedding, sampler="keyed", runner_tokens=1 << 15)
    rows = []
    tree = rain_generate(model, tok, prompts, config, engine="tree", concurrency=1, **common)
    start = time.perf_counter()
    for p, r in zip(prompts, tree.results):
        greedy_answer(model, tok, p, max(len(r.answer_ids), 1), config.turn_marker)
    greedy_s = time.perf_counter() - start
    rows.append(row("tree", tree, {"greedy_s_same_length": greedy_s,
                                   "rain_over_greedy": tree.stats.wall_seconds / greedy_s}))
    if not args.skip_slow:
        slow = rain_generate(model, tok, prompts, config, engine="slow", **common)
        same = [r.answer_ids for r in slow.results] == [r.answer_ids for r in tree.results]
        rows.append(row("slow", slow, {"same_decisions": same}))
        rows[0]["speedup_per_commit"] = rows[1]["s_per_commit"] / rows[0]["s_per_commit"]
        rows[0]["token_ratio_vs_slow"] = rows[1]["tokens_per_commit"] / rows[0]["tokens_per_commit"]
    for c in args.concurrency:
        batch = (prompts * c)[:c]
        rows.append(row(f"tree x{c}", rain_generate(model, tok, batch, config, engine="tree", concurrency=c,
                                                   **dict(common, sampler="torch"))))
    print_table(rows, [("engine", "engine", "{}"), ("prompts", "prompts", "{}"), ("committed", "commit", "{}"),
                       ("calls", "calls", "{}"), ("rows_per_call", "rows/call", "{:.1f}"),
                       ("tokens_per_commit", "tok/commit", "{:.1f}"), ("over_minimum", "tok/min", "{:.3f}"),
                       ("recomputed", "recomp", "{}"), ("calls_per_commit", "calls/commit", "{:.1f}"),
                       ("s_per_commit", "s/commit", "{:.4f}"), ("commits_per_s", "commit/s", "{:.2f}")])
    extra = {k: v for k, v in rows[0].items() if k in ("speedup_per_commit", "token_ratio_vs_slow",
                                                       "rain_over_greedy", "greedy_s_same_length")}
    print(extra)
    path = write_results("rain", args.device, {"quick": args.quick, "model": args.model or "tiny random Llama",
                                               "dtype": "float32" if args.quick else args.dtype,
                                               "config": vars(config), "embedding": args.embedding,
                                               "note": "GPU numbers unmeasured in the session that wrote this"
                                               if args.device == "cpu" else ""}, rows)
    print("wrote", path)


if __name__ == "__main__":
    main()
