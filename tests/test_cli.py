"""The `fastalign` command's help: every setting says what it sets and its default (HelpFormatter); a missing command
and a bad --output as usage errors; an interrupted command's message and exit status."""
import importlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import fastalign
from fastalign.cli import UsageError, _interrupt_on_sigterm, check_model_dir, check_output_file, main
from tests.rain.tiny import tiny_llama, tokenizer
from tests.test_package import loaded_after
from tests.unlearn.tiny import write_truthfulqa


def option_entries(command, capsys):
    """`fastalign COMMAND --help`, as {option: its entry (the option line and the help lines under it)}."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    entries = {}
    for line in out[out.index("options:"):].splitlines()[1:]:
        if line.startswith("  -"):
            name = line.split()[0].rstrip(",")
            entries[name] = line
        elif line.strip():
            entries[name] += " " + line.strip()
    return {name: " ".join(entry.split()) for name, entry in entries.items()}


@pytest.mark.parametrize("command, defaults", [
    ("rain", {"--root-visits": 50, "--concurrency": 8, "--max-new-tokens": 256, "--seed": 0, "--limit": 0,
              "--engine": "tree", "--embedding": "minilm", "--sampler": "torch", "--labels": "A,B",
              "--field": "prompt", "--dtype": "auto", "--kv-tokens": 1 << 17}),
    ("eval", {"--field": "prompt", "--template": "spec", "--judge": "world", "--threshold": 0.5,
              "--max-new-tokens": 64, "--batch-size": 16, "--temperature": 1.0, "--top-k": 0, "--seed": 0}),
])
def test_help_shows_every_default_that_says_something(command, defaults, capsys):
    """Numbers, choices and strings are shown; a default of None, an off switch or no values is not."""
    entries = option_entries(command, capsys)
    for option, default in defaults.items():
        assert f"(default: {default})" in entries[option], option
    assert "(default:" not in entries["--stop" if command == "eval" else "--no-vanilla"]
    assert "(default: None)" not in " ".join(entries.values())


def test_version_names_fastalign_and_the_libraries_it_runs_on(capsys):
    """`fastalign --version`: the package's own version (the one its distribution is built with: test_pyproject) and
    torch's, triton's and transformers', the versions a bug report or a benchmark note needs."""
    import torch
    import transformers

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    line = capsys.readouterr().out.strip()
    assert exited.value.code == 0
    assert line.startswith(f"fastalign {fastalign.__version__} (torch {torch.__version__}, triton ")
    assert line.endswith(f", transformers {transformers.__version__})")


def test_fastalign_without_a_command_is_a_usage_error_naming_it(capsys):
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2 and "the following arguments are required: COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "unlearn", "eval", "rain"])
def test_an_unknown_option_is_refused_with_the_commands_usage(command, capsys):
    """argparse's own message for an option no parser knows showed `fastalign`'s usage (COMMAND ...), not the
    options of the command that was misspelt."""
    required = {"eval": ["--answers", "a", "--output", "o"], "rain": ["--model", "m", "--hh", "h", "--output", "o"]}
    with pytest.raises(SystemExit) as exited:
        main([command, *required.get(command, []), "--no-such-option", "1"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith(f"usage: fastalign {command} ")
    assert err.endswith(f"fastalign {command}: error: unrecognized arguments: --no-such-option 1\n")


def test_output_file_check_makes_its_folder_and_refuses_a_folder(tmp_path, monkeypatch):
    """--output's check before any model loads: a bare file name (folder "") is the working directory's, an existing
    folder on the way is fine, a missing one is made, and a folder given as the file is a usage error naming it."""
    monkeypatch.chdir(tmp_path)
    check_output_file("out.jsonl")
    check_output_file(str(tmp_path / "out.jsonl"))
    check_output_file(str(tmp_path / "new" / "deeper" / "out.jsonl"))
    assert (tmp_path / "new" / "deeper").is_dir() and sorted(os.listdir(tmp_path)) == ["new"]
    with pytest.raises(UsageError, match="--output: .* is a directory"):
        check_output_file(str(tmp_path / "new"))



@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_output_file_check_refuses_a_pipe_without_opening_it(tmp_path, monkeypatch):
    """--output naming a FIFO hung `fastalign rain` and `fastalign eval` silently: the writability check opened it
    to append, which blocks until a reader comes. It is refused as what it is, and never opened."""
    fifo = tmp_path / f"out-{random.randrange(10**6)}.fifo"
    os.mkfifo(fifo)

    def opened(path):
        raise AssertionError(f"{path} was opened")
    monkeypatch.setattr("fastalign.cli.cannot_append_to", opened)
    with pytest.raises(UsageError, match=f"^--output: {re.escape(repr(str(fifo)))} is not a regular file \\(a pipe"):
        check_output_file(str(fifo))

@pytest.mark.skipif(not os.path.isfile("/proc/version"), reason="needs Linux's /proc, which nobody can write in")
def test_output_file_check_refuses_a_file_or_directory_it_cannot_write(tmp_path):
    """An --output that cannot be written was a traceback once the model had loaded. /proc stands for a read-only
    mount: permission bits said it was writable to root (os.access, the check before), and nobody can write there."""
    with pytest.raises(UsageError, match="^--output: cannot create '/proc/out.jsonl' in its directory '/proc': "):
        check_output_file("/proc/out.jsonl")
    with pytest.raises(UsageError, match="^--output: '/proc/version' is not writable: "):
        check_output_file("/proc/version")
    (tmp_path / "kept.jsonl").write_text("kept\n")
    check_output_file(str(tmp_path / "kept.jsonl"))
    check_output_file(str(tmp_path / "new.jsonl"))
    assert sorted(os.listdir(tmp_path)) == ["kept.jsonl"] and (tmp_path / "kept.jsonl").read_text() == "kept\n"


def test_model_dir_check_refuses_a_file_and_a_missing_path_by_the_argument_name(tmp_path):
    """A checkpoint is a directory: a file (its config.json, a .safetensors) given as the model is refused by name."""
    (tmp_path / "model.safetensors").write_text("")
    check_model_dir(tmp_path, "--model")
    for path in (tmp_path / "model.safetensors", tmp_path / "absent"):
        with pytest.raises(UsageError, match=f"^--judge-model: no model directory at {re.escape(repr(str(path)))}$"):
            check_model_dir(path, "--judge-model")


def run_on_a_tiny_model(command, tmp_path, config_changes):
    """`fastalign COMMAND --model tmp_path/model ...` on a tiny Llama whose config.json has `config_changes`, with
    inputs the command runs on: its exit status."""
    model = tmp_path / "model"
    tiny_llama().save_pretrained(model)
    tokenizer().save_pretrained(model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **config_changes}))
    (tmp_path / "prompts.txt").write_text("Human: How do I bake bread?\\nAssistant:\n")
    (tmp_path / "forget.jsonl").write_text(json.dumps({"prompt": "How?", "response_0": "Here.",
                                                       "is_response_0_safe": False, "response_1": "No.",
                                                       "is_response_1_safe": True}) + "\n")
    write_truthfulqa(tmp_path / "tqa.csv")
    arguments = {
        "rain": ["--prompts", str(tmp_path / "prompts.txt"), "--output", str(tmp_path / "rain.jsonl"), "--embedding",
                 "hidden", "--max-new-tokens", "2", "--root-visits", "2", "--engine", "slow"],
        "eval": ["--prompts", str(tmp_path / "prompts.txt"), "--judge", "keyword", "--keywords", "x", "--output",
                 str(tmp_path / "eval.jsonl"), "--max-new-tokens", "2"],
        "unlearn": ["--forget", str(tmp_path / "forget.jsonl"), "--normal", str(tmp_path / "tqa.csv"), "--max-steps",
                    "1", "--output-dir", str(tmp_path / "out"), "--no-progress"]}
    return main([command, "--model", str(model), *arguments[command]])


@pytest.mark.parametrize("command", ["rain", "eval", "unlearn"])
def test_a_checkpoint_quantized_with_a_library_not_installed_is_a_usage_error(tmp_path, command, capsys):
    """A --model whose config.json names a quantization_config whose library is not installed (bitsandbytes here):
    transformers' ImportError came as a traceback and exit status 1, where any other unloadable --model is one error
    line and status 2."""
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed: the checkpoint would load")
    quantized = {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}
    assert run_on_a_tiny_model(command, tmp_path, quantized) == 2
    err = capsys.readouterr().err
    assert f"'{tmp_path / 'model'}' needs a package that is not installed: " in err and "requires bitsandbytes" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["rain", "eval", "unlearn"])
def test_a_model_of_its_own_code_is_refused_in_one_line_without_asking_to_run_it(tmp_path, command, capsys,
                                                                                   monkeypatch):
    """A --model whose config.json names classes of its own (auto_map) that transformers lacks: transformers asked
    on the terminal whether to run the directory's code (on 'y' it would have), then told to pass
    trust_remote_code=True, which no command takes, in an error of several lines."""
    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "n")
    custom = {"model_type": "xmodel", "auto_map": {"AutoConfig": "configuration_x.XConfig",
                                                   "AutoModelForCausalLM": "modeling_x.XForCausalLM"}}
    assert run_on_a_tiny_model(command, tmp_path, custom) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"fastalign {command}: error: ")
    assert err.splitlines()[-1].endswith(f"'{tmp_path / 'model'}' needs code of its own to load (its config.json's "
                                         "auto_map), and fastalign does not run a model's own code: give a model of "
                                         "an architecture transformers implements")
    assert "trust_remote_code" not in err and asked == []


def test_python_dash_m_fastalign_runs_the_command(tmp_path):
    """`python -m fastalign ...` is the `fastalign` command where the package is importable but not installed
    (no console script), as `python -m fastalign.demo` is `fastalign demo`, exiting with the command's status."""
    root = str(Path(fastalign.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "fastalign", "demo", "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: fastalign demo")
    failed = subprocess.run([sys.executable, "-m", "fastalign", "rain", "--model", "no-such-model", "--prompts", "p",
                             "--output", tmp_path / "out.jsonl"], capture_output=True, text=True, env=env,
                            timeout=120)   # (not os.devnull: as root, its lock /dev/.null.lock is one for all runs)
    assert failed.returncode == 2 and "fastalign rain: error: --model: no model directory" in failed.stderr


def test_the_parser_loads_no_engine_library():
    """`fastalign --help`, `--version` and `COMMAND --help` build the whole parser: the demo's imported transformers
    (its progress-bar switch, the tiny Llama's classes), which --help and --version then paid (1.5 s or more)."""
    assert loaded_after("from fastalign.cli import build_parser\nbuild_parser()") == []


@pytest.mark.parametrize("signum, by", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C")])
@pytest.mark.parametrize("command, hint", [("rain", "rerun the same command to continue"),
                                           ("unlearn", "rerun the command with --resume"),
                                           ("eval", "the records judged so far are in --output")])
def test_an_interrupted_command_says_so_and_what_was_kept_and_exits_non_zero(monkeypatch, capsys, tmp_path, signum,
                                                                           by, command, hint):
    """A cluster's preemption (SIGTERM) or Ctrl-C stops the run through its clean-up (no checkpoint, model or
    record left half written) with a message on stderr instead of a traceback or nothing, and the exit status
    128 + the signal's number, as a process the signal killed has."""
    module = importlib.import_module(f"fastalign.{'evaluation' if command == 'eval' else command}.cli")
    handler_name = "main" if command == "unlearn" else "run"
    cleaned = []

    def interrupted(args):
        try:
            signal.raise_signal(signum)
            return 0   # not reached: the signal stops the run
        finally:
            cleaned.append(True)

    monkeypatch.setattr(module, handler_name, interrupted)
    previous = signal.getsignal(signal.SIGTERM)
    output = tmp_path / "o"
    output.write_text("")   # (eval's records so far: an eval interrupted before it wrote --output says none is)
    argv = ["unlearn"] if command == "unlearn" else [command, "--model", "m", "--hh", "h", "--output", str(output)]
    # Ctrl-C as a terminal delivers it: a job a shell started in the background inherits SIGINT ignored
    previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main(argv) == 128 + signum
    finally:
        signal.signal(signal.SIGINT, previous_sigint)
    captured = capsys.readouterr()
    assert cleaned == [True] and captured.out == ""
    assert f"fastalign {command}: interrupted by {by}" in captured.err and hint in captured.err
    assert "Traceback" not in captured.err
    assert signal.getsignal(signal.SIGTERM) is previous   # put back: only a running command turns SIGTERM so


def test_an_eval_interrupted_before_it_wrote_output_does_not_send_the_user_there(monkeypatch, capsys, tmp_path):
    """An eval stopped while it loaded the model (torchrun's SIGTERM to the other ranks, a Ctrl-C) said its records
    were in an --output it had not written."""
    from fastalign.evaluation import cli as eval_cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_cli, "run", interrupted)
    argv = ["eval", "--model", "m", "--hh", "h", "--output", str(tmp_path / "o.jsonl")]
    assert main(argv) == 128 + signal.SIGINT
    assert capsys.readouterr().err == "fastalign eval: interrupted by Ctrl-C; no record was written to --output\n"


def test_a_second_sigterm_kills_the_process_at_once():
    """The first SIGTERM stops the command through its clean-up; a clean-up that hangs must not keep the process
    alive against a second one: the handler gives SIGTERM its default action back as it raises."""
    previous = signal.signal(signal.SIGTERM, _interrupt_on_sigterm)   # as main() sets it for a command
    try:
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_command_run_outside_the_main_thread_runs_without_the_sigterm_handler(monkeypatch):
    """signal.signal works only in the main thread: main() called from another one (a notebook's worker, a test
    runner's) runs the command and leaves SIGTERM as it is instead of failing with a ValueError."""
    monkeypatch.setattr(importlib.import_module("fastalign.rain.cli"), "run", lambda args: 7)
    previous, returned = signal.getsignal(signal.SIGTERM), []
    thread = threading.Thread(target=lambda: returned.append(main(["rain", "--model", "m", "--hh", "h", "--output",
                                                                   "o"])))
    thread.start()
    thread.join()
    assert returned == [7] and signal.getsignal(signal.SIGTERM) is previous


def test_a_keyboard_interrupt_raised_with_a_message_is_reported_as_ctrl_c(monkeypatch, capsys):
    """Only the SIGTERM handler's own KeyboardInterrupt is SIGTERM: one raised with another message is Ctrl-C's."""
    def interrupted(args):
        raise KeyboardInterrupt("input ended")
    monkeypatch.setattr(importlib.import_module("fastalign.rain.cli"), "run", interrupted)
    assert main(["rain", "--model", "m", "--hh", "h", "--output", "o"]) == 128 + signal.SIGINT
    assert "fastalign rain: interrupted by Ctrl-C" in capsys.readouterr().err


def test_an_interrupt_while_the_parser_imports_the_commands_is_a_message_not_a_traceback(monkeypatch, capsys):
    """The first seconds of a command import torch and transformers to build the parser: a Ctrl-C there printed a
    traceback (the command's own interrupt handling began after parsing)."""
    def importing():
        raise KeyboardInterrupt
    monkeypatch.setattr(importlib.import_module("fastalign.cli"), "build_parser", importing)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        status = main(["eval", "--help"])
    except KeyboardInterrupt:   # not to pytest, which would end the whole session
        pytest.fail("the KeyboardInterrupt left main()")
    assert status == 128 + signal.SIGINT
    assert capsys.readouterr().err == "fastalign: interrupted by Ctrl-C\n"
    assert signal.getsignal(signal.SIGTERM) is previous
