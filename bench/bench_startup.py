"""Start-up cost: what a user's process pays to import fastalign, take its fused ops or start its commands.

Each row runs in a fresh interpreter (TRITON_INTERPRET unset), --reps times; the table gives the median wall
seconds, the seconds over `import torch` (which any use of fastalign pays) and the heavy libraries the row left
imported (read from one more run under -X importtime). Two rows are the baselines a user pays anyway: torch alone,
and a Hugging Face model class (transformers imports torch._dynamo, triton and accelerate with it).
"first fused loss" also runs one small forward and backward of linear_cross_entropy on the CPU: the first call
imports torch._dynamo (the op keeps out of compiled graphs; dynamo imports triton), once per process.

    python bench/bench_startup.py             # any machine: nothing here uses a GPU
    python bench/bench_startup.py --quick     # one interpreter per row, timed with its -X importtime logging
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import harness

HEAVY = ("transformers", "accelerate", "peft", "triton", "torch._dynamo")
FIRST_LOSS = ("import torch, fastalign\n"
              "h = torch.randn(4, 8, requires_grad=True)\n"
              "fastalign.linear_cross_entropy(h, torch.randn(16, 8), torch.tensor([0, 1, 2, 3])).backward()")
# (what, python arguments): baselines first
ROWS = [
    ("import torch", ["-c", "import torch"]),
    ("import a transformers model class", ["-c", "from transformers import LlamaForCausalLM"]),
    ("import fastalign", ["-c", "import fastalign"]),
    ("from fastalign import linear_cross_entropy", ["-c", "from fastalign import linear_cross_entropy"]),
    ("first fused loss", ["-c", FIRST_LOSS]),
    ("fastalign --version", ["-m", "fastalign", "--version"]),
    ("fastalign --help", ["-m", "fastalign", "--help"]),
    ("fastalign unlearn --help", ["-m", "fastalign", "unlearn", "--help"]),
    ("fastalign rain --help", ["-m", "fastalign", "rain", "--help"]),
    ("fastalign eval --help", ["-m", "fastalign", "eval", "--help"]),
]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fresh_env():
    """The environment of a user's process: no Triton interpreter; the checkout first on the path."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    return env


def run(args, extra=()):
    """Seconds one fresh interpreter takes to run `args`, and its stderr; raises when it fails."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *extra, *args], capture_output=True, text=True, env=fresh_env(),
                          cwd=ROOT, timeout=600)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {done.stderr[-300:]}")
    return seconds, done.stderr


def imported(importtime_log):
    """The HEAVY modules in a -X importtime log ("import time: self | cumulative | name" lines)."""
    names = {line.rsplit("|", 1)[1].strip() for line in importtime_log.splitlines() if line.startswith("import time:")}
    return [name for name in HEAVY if name in names]


def measure(what, args, reps):
    """The row of `args`: the median of `reps` timed runs (with reps 0, the seconds of the -X importtime run, its
    logging included) and the heavy modules that run imported."""
    try:
        seconds, log = run(args, ("-X", "importtime"))
        if reps:
            seconds = statistics.median(run(args)[0] for _ in range(reps))
        return {"what": what, "median_s": seconds, "heavy_modules": imported(log)}
    except (RuntimeError, subprocess.SubprocessError) as err:
        return {"what": what, "error": str(err)[:300]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=harness.count_at_least(1), default=5,
                        help="fresh interpreters per row (default: 5)")
    parser.add_argument("--quick", action="store_true",
                        help="one interpreter per row, timed with its -X importtime logging (a smoke run)")
    args = parser.parse_args(argv)
    args.reps = 0 if args.quick else args.reps
    rows = [measure(what, command, args.reps) for what, command in ROWS]
    torch_s = rows[0].get("median_s")
    for row in rows:
        if torch_s is not None and "median_s" in row:
            row["over_torch_s"] = row["median_s"] - torch_s
        row["modules"] = " ".join(row.get("heavy_modules", [])) or "-"
    config = {"reps": args.reps, "python": sys.version.split()[0]}
    path = harness.write_results("startup", "cpu", config, rows, quick=args.quick)
    harness.print_table(rows, [("what", "what", "{}"), ("median_s", "median s", "{:.2f}"),
                               ("over_torch_s", "over torch s", "{:+.2f}"), ("modules", "heavy modules", "{}"),
                               ("error", "error", "{}")])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
