#!/usr/bin/env bash
# Every GPU check the open issues ask for, in two device-tool calls of under ten minutes each (lent GPU sessions
# have 15 minutes of device time in all, start-up included).
#
#   bash bench/gpu_session.sh --prepare   # here, with network: wheels into .whl/, the shared data (from
#                                         # FASTALIGN_SHARED_DATA, else ../shared/data) and the commit into .carry/
#                                         # (prepare again after committing)
#   then the device tool, fixing what the first call finds before the second:
#   run(command="bash bench/gpu_session.sh tests", carry=[".whl", ".carry"], timeout_s=280)   (at most ~4 min)
#   run(command="bash bench/gpu_session.sh benches", carry=[".whl", ".carry"], timeout_s=600)   (10 min; with less
#   device time left, timeout_s=T and command="CALL_LIMIT_S=T bash bench/gpu_session.sh benches", so that each
#   step, cut to what the call has left, ends, and its rows are bundled, before the tool's limit)
#   at 1800a8f an H200 took 3.2 and 4.6 min; each call starts a machine (~1 min)
#   benches ends with the 8B preset of bench_unlearn in what is left of its call (under 2 minutes left: skipped);
#   a session that did not get it there, or the 8B numbers alone (a full run leaves under the 4 minutes a machine
#   needs to start):
#   run(command="bash bench/gpu_session.sh 8b", ...)   # bench_unlearn --preset 8b alone
#
# On the GPU machine (no network) it installs the carried wheels (liger-kernel, cut-cross-entropy, trl and torchao,
# the baselines of bench_loss.py, bench_causal_lm_loss.py and bench_optimizer.py, and the packages TRL imports that
# the machine's image lacks) and fastalign itself, then runs, each step under its own time limit so that the whole
# fits: the tests that need CUDA and the Triton kernel tests on the GPU, then bench_loss (the 8B head at N=8192, and
# the 1B head at the token counts of bench_unlearn's batch), bench_optimizer (the 1B's parameters), bench_tree,
# bench_unlearn (1B, each way profiled once), bench_rain (random 1B Llama on HH prompts, the tree engine's run
# profiled once), bench_causal_lm_loss (a 1B training step, CausalLMLoss and CausalLMKLDiv against the logits' losses)
# and, in the call's time left, bench_unlearn's 8B preset (LoRA; full weights with the cached reference). The log, the
# two pytest logs and bench_results.tar (every bench JSON: the device tool returns at most 8 files) land in $OUT:
# extract the tar into bench/results/ and commit the JSON files. The benches rewrite their JSON after each row
# (atomically) and the tar is rewritten after each step, so a step cut at its limit still returns what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
    set -e
    # the shared data sets, where the tests read them (beside the checkout unless FASTALIGN_SHARED_DATA says), checked
    # before anything here is replaced
    data=${FASTALIGN_SHARED_DATA:-../shared/data}
    files=("$data/hh-harmless-base-test.jsonl.gz" "$data/TruthfulQA.csv")
    for file in "${files[@]}"; do
        [[ -f $file ]] || { echo "--prepare: no $file (FASTALIGN_SHARED_DATA: the folder of the shared data)"; exit 1; }
    done
    mkdir -p .carry/data
    # -f: a copy left read-only by the last --prepare (the shared data's mode) is replaced, not refused
    cp -f "${files[@]}" .carry/data/
    # the device's copy of the tree has no .git: the bench JSON takes the commit from here
    git rev-parse --short HEAD | tr -d '\n' > .carry/commit
    [[ -z "$(git status --porcelain --untracked-files=no)" ]] || echo -n "-dirty" >> .carry/commit
    # and what the tracked files held then (bench/results aside: the session empties it), so that results of a
    # tree changed since this --prepare are labelled <commit>-stale, not with a commit they did not measure
    # (a file deleted since the last commit is left out)
    git ls-files -z -- . ':!bench/results' | xargs -0 sha256sum > .carry/tracked.sha256 2>/dev/null || true
    # one version of each wheel (two stop the install there): downloaded aside, replacing .whl only on success
    rm -rf .whl.new && mkdir -p .whl.new/apart
    download=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
              --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    "${download[@]}" -d .whl.new liger-kernel==0.8.5 cut-cross-entropy==25.1.1
    # TRL (and what its trainer utilities import that the machine's image lacks) and torchao, installed apart (see
    # gpu_benches' with_apart)
    "${download[@]}" -d .whl.new/apart trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 torchao==0.18.0
    rm -rf .whl && mv .whl.new .whl
    ls -la .whl .carry/data
    exit 0
fi

if [[ ! "${1:-}" =~ ^(tests|benches|8b)$ || $# -ne 1 ]]; then   # before anything is installed into this python3
    echo "expected one part, --prepare, tests, benches or 8b; got: $*"
    exit 2
fi
if ! nvidia-smi -L >/dev/null 2>&1; then   # a part runs on the GPU machine only (off it: installs, then fails)
    echo "no NVIDIA GPU here (nvidia-smi): run this part on the GPU machine, through the device tool"
    exit 2
fi

OUT="${OUT:-/tmp/gpu_session}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FASTALIGN_SHARED_DATA="$PWD/.carry/data" FASTALIGN_COMMIT="$(cat .carry/commit 2>/dev/null)"
# bench/harness.py writes each record here as its rows are measured; after each step they are bundled into one file of
# $OUT (bundle_results: the device tool returns at most 8 files, and a benches call writes more records than that)
RESULTS="${RESULTS:-/tmp/gpu_session_results}"
mkdir -p "$RESULTS"
export FASTALIGN_BENCH_RESULTS="$RESULTS"
[[ -f .carry/tracked.sha256 ]] && export FASTALIGN_COMMIT_SUMS="$PWD/.carry/tracked.sha256"
HH=.carry/data/hh-harmless-base-test.jsonl.gz

# the device tool's longest call: each part's steps, the install before them included, end within it; a call given
# less (the session's device time left, which the tool's limit_s then says) passes it: CALL_LIMIT_S=420 bash ...
CALL_LIMIT_S=${CALL_LIMIT_S:-600}

step() {  # step SECONDS NAME COMMAND...: runs COMMAND under a time limit, cut to what the call has left
    local limit=$1 name=$2; shift 2
    # less 15 s to return $OUT and the 5 s of timeout's --kill-after: a step past the call's limit is killed with the
    # command, its rows never bundled
    local left=$(( CALL_LIMIT_S - 15 - 5 - SECONDS ))
    if (( left < 10 )); then echo "=== $name: skipped (${left}s of the call left)"; return; fi
    (( limit <= left )) || limit=$left
    echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
    timeout --kill-after=5 "$limit" "$@"
    echo "=== $name: exit $? $(date -u +%H:%M:%S)"
    rm -f "$RESULTS"/*.partial   # a record being rewritten when the limit struck: the previous one stands
    bundle_results
}

bundle_results() {  # every bench record so far, as $OUT/bench_results.tar (replaced whole, never left half written)
    compgen -G "$RESULTS/*.json" >/dev/null || return 0
    tar -cf "$OUT/bench_results.tar.partial" -C "$RESULTS" . \
        && mv "$OUT/bench_results.tar.partial" "$OUT/bench_results.tar"
}

gpu_tests() {
    # pytest writes to files (a step killed at its limit takes its pipeline with it); 12 workers (of 16 cores) share
    # the Triton compiles, which dominate these tests on a fresh machine; the sm_90 builds without a GPU are skipped;
    # -v logs each test's outcome as it ends, so that a run cut at the limit still names what passed and failed
    # (each run under its own limit, so that a slow first one leaves the second its time; the step's exit status is
    # pytest's, not that of the tail of its log)
    step 110 "tests needing CUDA" bash -c "
        python3 -m pytest -v -n 12 -rfE -m gpu tests > $OUT/pytest-gpu.log 2>&1; status=\$?
        tail -25 $OUT/pytest-gpu.log; exit \$status"
    # (and the trainer's resume: on the GPU it saves and restores the CUDA generator, which LoRA's dropout draws from)
    step 90 "the Triton kernels, the runner's cascade, fused norms, rotation and MLP activation, the training layers" \
        bash -c "python3 -m pytest -v -n 12 -rfE -m 'not gpu' -k 'not compile_for_sm90' tests/kernels \
            tests/runtime/test_tree_runner_cascade.py tests/runtime/test_rms_norms.py tests/runtime/test_rotary.py \
            tests/runtime/test_gated_mlps.py tests/ops/test_rms_norm.py tests/ops/test_gated_linear.py \
            tests/unlearn/test_layer_stand_ins.py \
            tests/unlearn/test_trainer.py::test_killed_and_resumed_run_is_bit_identical \
            tests/runtime/test_tree_runner.py::test_random_tree_on_the_triton_backend_matches_hugging_face_fp32 \
            tests/runtime/test_tree_runner.py::test_the_triton_backend_runs_no_norm_rotation_or_activation_op_of_torch \
            > $OUT/pytest-triton.log 2>&1; status=\$?; tail -8 $OUT/pytest-triton.log; exit \$status"
}

gpu_benches() {
    # the packages installed apart on the path of the benches that compare with them alone, so that nothing else imports
    # them (transformers' Trainer imports datasets wherever it is installed, and checks for torchao)
    local with_apart=(env "PYTHONPATH=/tmp/site-apart${PYTHONPATH:+:$PYTHONPATH}")
    # the row blocks of the forward with gradients, other than the default 192 MiB: at N=8192 the rows of a block are
    # N/32 = 256 at least (the default's), so the larger blocks there (512 and 1024 rows), the smaller at N=2048
    # (128 rows against 256)
    step 110 "bench_loss" "${with_apart[@]}" python3 bench/bench_loss.py --tokens 8192 --verbose --stages \
        --row-block-mib 384 768
    step 45 "bench_loss, 1B head" "${with_apart[@]}" python3 bench/bench_loss.py --hidden 2048 --tokens 256 2048 \
        --verbose --stages --row-block-mib 96
    # (the fidelity column, the same bits as the CPU records', at 30 steps: its float64 reference runs on the host,
    # ~7 s a way at 300 steps, which left torchao's compile no time)
    step 25 "bench_optimizer" "${with_apart[@]}" python3 bench/bench_optimizer.py --fidelity-steps 30
    step 95 "bench_tree" python3 bench/bench_tree.py --prefix 1500 8000 32000 131072 --rows 1 10 64 \
        --branch-lengths 16 2048 8192 --decode-tokens 64 --splits 8 32 64
    step 95 "bench_unlearn" python3 bench/bench_unlearn.py --reps 3 --profile
    step 115 "bench_rain" python3 bench/bench_rain.py --random-model --hh "$HH" --prompts 1 --max-new-tokens 8 \
        --concurrency 1 8 32 --judge-prompts 16 --cuda-graphs --profile
    step 25 "bench_causal_lm_loss" "${with_apart[@]}" python3 bench/bench_causal_lm_loss.py --reps 2
    # what the call has left (SECONDS: since this script started), less 15 s to return $OUT, for the 8B preset; it
    # writes each way's row as measured, so that one cut at the limit keeps those before it
    local left=$(( CALL_LIMIT_S - 15 - SECONDS ))
    if (( left >= 120 )); then unlearn_8b "$left"
    else echo "=== bench_unlearn 8b: skipped (${left}s of the call left)"; fi
}

unlearn_8b() {  # unlearn_8b SECONDS: bench_unlearn's 8B preset under that time limit
    step "$1" "bench_unlearn 8b (LoRA; full weights + cached reference)" \
        python3 bench/bench_unlearn.py --preset 8b --reps 2
}

session() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl && export PYTHONPATH=/tmp/site
    fi
    if ls .whl/apart/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-apart \
            .whl/apart/*.whl
    fi
    # fastalign itself; should the editable install fail, rather than losing the whole call: a setuptools older
    # than 77 (the image's, which --no-build-isolation uses) reads the licence only in the table form, so the
    # install is retried with it (this copy's pyproject.toml is put back after), then an in-place build and the
    # layout of a checkout (kernels/ seen as fastalign.kernels) serve instead
    if ! python3 -m pip install -q --no-deps --no-build-isolation -e .; then
        echo "editable install failed (setuptools $(python3 -c 'import setuptools; print(setuptools.__version__)'))"
        cp pyproject.toml /tmp/pyproject.toml.orig
        sed -i 's/^license = "\(.*\)"$/license = { text = "\1" }/' pyproject.toml
        python3 -m pip install -q --no-deps --no-build-isolation -e . || {
            echo "editable install failed again: building fastalign._C in place"
            python3 setup.py -q build_ext --inplace && ln -sfn ../kernels fastalign/kernels \
                && export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
        }
        installed=$?
        cp /tmp/pyproject.toml.orig pyproject.toml
        [[ $installed == 0 ]] || exit 1
    fi
    python3 -c "import torch, triton, transformers, fastalign, fastalign.kernels, fastalign._C
print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" || exit 1
    python3 -c "import sys; sys.path.insert(0, 'bench'); import harness
print('results labelled', harness.git_commit())"

    case "${1:-}" in
        8b) left=$(( CALL_LIMIT_S - 15 - SECONDS ))   # (the set-up above took SECONDS of the call)
            if (( left >= 120 )); then unlearn_8b "$left"
            else echo "=== bench_unlearn 8b: skipped (${left}s of the call left)"; fi ;;
        tests) gpu_tests ;;
        benches) gpu_benches ;;
    esac
    ls -la "$OUT"
}

session "$@" 2>&1 | tee "$OUT/session.log"
