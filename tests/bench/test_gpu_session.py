"""bench/gpu_session.sh: each of its parts (tests, benches, 8b) must fit one device-tool call of at most 600 s: its
steps' time limits, with the install before them, leave the call time to return what was measured; benches gives
the 8B preset what its call has left."""
import os
import pathlib
import re
import subprocess

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "bench" / "gpu_session.sh"
CALL_LIMIT_S = 600
INSTALL_S = 40   # nvidia-smi, the carried wheels and the editable install of fastalign, before the first step
RETURN_S, KILL_S = 15, 5   # the call's time to return $OUT; timeout's --kill-after, past each step's limit


def function(text, name):
    """The definition of the shell function `name` in the script's text."""
    return re.search(rf"^{name}\(\) {{.*?^}}$", text, re.MULTILINE | re.DOTALL).group(0)


def step_limits(text):
    """Each part's fixed `step SECONDS NAME ...` limits: {"tests": [...], "benches": [...]} (the 8b part takes what
    the call has left: test_the_8b_part_takes_what_the_call_has_left)."""
    pattern = re.compile(r"^\s*step (\d+)", re.MULTILINE)
    return {name: [int(n) for n in pattern.findall(function(text, name))] for name in ("gpu_tests", "gpu_benches")}


def test_every_session_fits_one_device_call():
    text = SCRIPT.read_text()
    assert re.search(rf"^CALL_LIMIT_S=\${{CALL_LIMIT_S:-{CALL_LIMIT_S}}}$", text, re.MULTILINE)
    limits = step_limits(text)
    assert [len(v) for v in limits.values()] == [2, 7], limits
    for name, part in limits.items():   # (each step may run to its limit and the kill after it)
        assert INSTALL_S + sum(part) + KILL_S * len(part) + RETURN_S <= CALL_LIMIT_S, (name, part)


def benches_ends(seconds_used, call_limit):
    """The time each step of gpu_benches (the real `step`) would end, in seconds of a call of call_limit s, every
    command running to its limit and the kill after it, the script `seconds_used` s old at the first step."""
    text = SCRIPT.read_text()
    limit = re.search(r"^CALL_LIMIT_S=.*$", text, re.MULTILINE).group(0)
    timeout = 'timeout() { SECONDS=$(( SECONDS + $2 + 5 )); echo "end $SECONDS"; }'   # $1: --kill-after=5
    program = "\n".join([f"CALL_LIMIT_S={call_limit}", limit, "RESULTS=/nonexistent", "bundle_results() { :; }",
                          timeout, function(text, "step"), function(text, "gpu_benches"), function(text, "unlearn_8b"),
                          f"SECONDS={seconds_used}", "gpu_benches"])
    out = subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True).stdout
    return out, [int(line.split()[1]) for line in out.splitlines() if line.startswith("end ")]


def test_every_step_ends_within_the_calls_limit_with_the_time_to_return_its_rows():
    """CALL_LIMIT_S=420 shortened the 8B step alone: the fixed steps ran to 585 s of a 420 s call, the tool killing
    bench_rain mid-run and its rows never bundled. Each step is cut to what the call has left; one with under 10 s
    left is skipped, and said so."""
    for call_limit in (CALL_LIMIT_S, 420, 200):
        out, ends = benches_ends(INSTALL_S, call_limit)
        assert ends and max(ends) <= call_limit - RETURN_S, out
    out, ends = benches_ends(INSTALL_S, 200)   # bench_loss's two steps, the second cut to 25 s; the rest skipped
    assert "=== bench_loss, 1B head (limit 25s)" in out and "=== bench_optimizer: skipped (-5s of the call left)" \
        in out and len(ends) == 2, out


def benches_steps(seconds_used, call_limit=None):
    """The steps gpu_benches runs (limit, name), with `step` replaced by a stub and the script `seconds_used` s old;
    call_limit: the CALL_LIMIT_S the call is given (None: the default)."""
    text = SCRIPT.read_text()
    limit = re.search(r"^CALL_LIMIT_S=.*$", text, re.MULTILINE).group(0)
    given = "" if call_limit is None else f"CALL_LIMIT_S={call_limit}"
    program = "\n".join([given, limit, function(text, "gpu_benches"), function(text, "unlearn_8b"),
                         'step() { echo "$1|$2"; }', f"SECONDS={seconds_used}", "gpu_benches"])
    out = subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True).stdout
    return [line.split("|") for line in out.splitlines()]


def test_benches_give_the_8b_preset_what_the_call_has_left():
    fixed = sum(step_limits(SCRIPT.read_text())["gpu_benches"])
    for used in (INSTALL_S + 200, INSTALL_S + fixed - 120):
        *_, (limit, name) = benches_steps(used)
        assert name.startswith("bench_unlearn 8b") and int(limit) == CALL_LIMIT_S - 15 - used
    *_, last = benches_steps(CALL_LIMIT_S - 15 - 119)   # under 2 minutes left: skipped, said so
    assert last == ["=== bench_unlearn 8b: skipped (119s of the call left)"]
    # a call given less (the session's device time left): the 8B preset ends within it
    *_, (limit, name) = benches_steps(200, call_limit=420)
    assert name.startswith("bench_unlearn 8b") and int(limit) == 420 - 15 - 200


def test_the_8b_part_takes_what_the_call_has_left():
    """Its limit was a fixed 540 s: a set-up of over 45 s left the 8B rows to the tool's limit, before their
    bundling."""
    text = SCRIPT.read_text()
    limit = re.search(r"^CALL_LIMIT_S=.*$", text, re.MULTILINE).group(0)
    case = "case " + text.split("case ")[1].split("esac")[0].replace('"${1:-}"', "8b", 1) + "esac"
    program = "\n".join([limit, 'unlearn_8b() { echo "$1"; }', "SECONDS=70", case])
    out = subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True).stdout
    assert int(out) == CALL_LIMIT_S - 15 - 70


def test_each_step_bundles_the_records_so_far_into_one_file_of_out(tmp_path):
    """The device tool returns at most 8 files of $OUT, and a benches call writes more records: after each step, every
    record so far is in $OUT/bench_results.tar, alone there, and a record cut mid-rewrite (.partial) is left out."""
    import tarfile

    text = SCRIPT.read_text()
    out, results = tmp_path / "out", tmp_path / "results"
    out.mkdir()
    results.mkdir()
    def bench(name):   # a bench's command: its record, and one cut mid-rewrite
        return f"""bash -c 'echo {{}} > "$RESULTS/{name}.json"; echo {{ > "$RESULTS/{name}.json.partial"'"""
    program = "\n".join([f'OUT="{out}"', f'export RESULTS="{results}"', "CALL_LIMIT_S=600", function(text, "step"),
                         function(text, "bundle_results"), f"step 5 first {bench('bench_a')}",
                         f"step 5 second {bench('bench_b')}"])
    subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True)
    assert [path.name for path in out.iterdir()] == ["bench_results.tar"]
    with tarfile.open(out / "bench_results.tar") as bundle:
        assert sorted(name.removeprefix("./") for name in bundle.getnames() if name.endswith("json")) == [
            "bench_a.json", "bench_b.json"]
        assert not [name for name in bundle.getnames() if name.endswith(".partial")]


def test_the_test_steps_exit_with_pytests_status(tmp_path):
    """Each test step ran `pytest > LOG; tail LOG`: failing GPU tests logged "exit 0" (tail's status)."""
    text = SCRIPT.read_text()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text('#!/bin/bash\necho "1 failed, 3 passed"\nexit 1\n')   # a failing pytest
    (bin_dir / "python3").chmod(0o755)
    program = "\n".join([f'OUT="{tmp_path}"', f'RESULTS="{tmp_path}"', "CALL_LIMIT_S=600", "bundle_results() { :; }",
                         function(text, "step"), function(text, "gpu_tests"), "gpu_tests"])
    out = subprocess.run(["bash", "-c", program], env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                         capture_output=True, text=True, check=True).stdout
    exits = re.findall(r"^=== .*: exit (\d+) ", out, re.MULTILINE)
    assert exits == ["1", "1"] and out.count("1 failed, 3 passed") == 2, out


def test_prepare_takes_the_shared_data_from_fastalign_shared_data_and_checks_it_before_replacing_anything(tmp_path):
    """--prepare read ../shared/data alone, and failed there after replacing .whl, before writing .carry/commit (the
    device's records then labelled "unknown", or an older commit's "-stale")."""
    import shutil

    tree, data, bin_dir = tmp_path / "tree", tmp_path / "data", tmp_path / "bin"
    (tree / "bench").mkdir(parents=True)
    shutil.copy(SCRIPT, tree / "bench" / "gpu_session.sh")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tree)]
    for command in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "tree"]):
        subprocess.run(git + command, check=True)
    (tree / ".whl").mkdir()
    (tree / ".whl" / "old.whl").write_text("")
    bin_dir.mkdir()   # pip download: a wheel into its -d folder
    (bin_dir / "python3").write_text('#!/bin/bash\nwhile [[ $# -gt 0 ]]; do [[ $1 == -d ]] && touch "$2/new.whl"; '
                                     'shift; done\n')
    (bin_dir / "python3").chmod(0o755)
    data.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FASTALIGN_SHARED_DATA": str(data)}
    prepare = ["bash", str(tree / "bench" / "gpu_session.sh"), "--prepare"]
    done = subprocess.run(prepare, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and f"--prepare: no {data}/hh-harmless-base-test.jsonl.gz" in done.stdout, done
    assert [p.name for p in (tree / ".whl").iterdir()] == ["old.whl"] and not (tree / ".carry" / "commit").exists()
    for name in ("hh-harmless-base-test.jsonl.gz", "TruthfulQA.csv"):
        (data / name).write_text(name)
    done = subprocess.run(prepare, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert (tree / ".carry" / "commit").read_text() == head
    assert sorted(p.name for p in (tree / ".carry" / "data").iterdir()) == ["TruthfulQA.csv",
                                                                             "hh-harmless-base-test.jsonl.gz"]
    assert sorted(p.name for p in (tree / ".whl").iterdir()) == ["apart", "new.whl"]


def test_an_unknown_part_is_refused_before_anything_is_installed(tmp_path):
    """`bash bench/gpu_session.sh --help` (or a typo) ran `pip install -e .` into the caller's python3 first."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/bash\necho "$*" >> {calls}\n')
    (bin_dir / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
           "RESULTS": str(tmp_path / "results")}
    for parts in (["--help"], ["bench"], [], ["tests", "extra"]):   # (tests extra ran tests)
        done = subprocess.run(["bash", str(SCRIPT), *parts], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and f"expected one part, --prepare, tests, benches or 8b; got: {' '.join(parts)}" \
            in done.stdout
    assert not calls.exists()


def test_a_part_off_the_gpu_machine_is_refused_before_anything_is_installed(tmp_path):
    """Without nvidia-smi (this VM) a part installed fastalign into the caller's python3, then failed."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for tool, status in (("python3", 0), ("nvidia-smi", 9)):
        (bin_dir / tool).write_text(f'#!/bin/bash\necho "{tool} $*" >> {calls}\nexit {status}\n')
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
           "RESULTS": str(tmp_path / "results")}
    done = subprocess.run(["bash", str(SCRIPT), "tests"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no NVIDIA GPU here" in done.stdout
    assert calls.read_text() == "nvidia-smi -L\n"
