"""`fastalign unlearn` end to end on a tiny model saved to disk: config file + overrides, --check, errors."""
import argparse
import functools
import importlib.util
import json
import os
import re
import signal
import sys
import tempfile
import types
from dataclasses import fields

import pytest
import yaml

from fastalign.cli import build_parser, main
from fastalign.unlearn.config import UnlearnConfig
from fastalign.unlearn import models
from fastalign.unlearn import accelerator as accelerator_module
from fastalign.unlearn.cli import config_from_args
from fastalign.unlearn.run import load_model_and_tokenizer, run_unlearning
from tests.conftest import HAS_CUDA
from tests.output_holder import holding, needs_fcntl
from tests.unlearn.tiny import byte_bpe_tokenizer, tiny_llama, write_jsonl, write_truthfulqa

pytest.importorskip("accelerate")


@pytest.fixture
def workspace(tmp_path):
    tokenizer = byte_bpe_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    write_jsonl(tmp_path / "pku.jsonl", [
        {"prompt": "How do I hurt someone?", "response_0": "Here is how.", "is_response_0_safe": False,
         "response_1": "I will not help.", "is_response_1_safe": True},
        {"prompt": "What is harmful?", "response_0": "harmful help", "is_response_0_safe": False,
         "response_1": "the a of", "is_response_1_safe": False}])
    write_truthfulqa(tmp_path / "tqa.csv")
    config = {"model": str(tmp_path / "model"), "forget": [str(tmp_path / "pku.jsonl")],
              "normal": str(tmp_path / "tqa.csv"), "lr": 1e-3, "max_steps": 50, "mismatch_per_prompt": 2,
              "max_length": 64}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def test_help_explains_formats_and_outputs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["unlearn", "--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    for phrase in ["data formats:", "PKU-SafeRLHF", "TruthfulQA", "--reference", "--resume", "log.jsonl"]:
        assert phrase in text


def test_train_from_config_file_with_overrides(workspace, capsys):
    out = workspace / "out"
    code = main(["unlearn", "--config", str(workspace / "run.yaml"), "--max-steps", "2", "--output-dir",
                 str(out), "--no-progress", "--reference", "cached", "--reference-cache", "host"])
    assert code == 0, capsys.readouterr().err
    saved = json.loads((out / "config.json").read_text())
    assert (saved["max_steps"], saved["lr"], saved["reference"], saved["mismatch_per_prompt"]) == (2, 1e-3, "cached", 2)
    assert saved["reference_cache"] == "host"
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "tokenizer.json").is_file()
    assert json.loads(capsys.readouterr().out)["steps"] == 2


def test_bf16_lora_reports_and_warns_of_what_the_merge_lost(workspace, capsys):
    out = workspace / "out"
    with pytest.warns(UserWarning, match=r"lost .*% of its update.*out/adapter keeps the update exactly"):
        code = main(["unlearn", "--config", str(workspace / "run.yaml"), "--max-steps", "2", "--lr", "1e-5",
                     "--lora", "--lora-rank", "4", "--precision", "bf16", "--output-dir", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report["adapter_dir"] == str(out / "adapter") and (out / "adapter" / "adapter_config.json").is_file()
    assert report["merge_rounding_error"] == json.loads((out / "run.json").read_text())["merge_rounding_error"] > 0.5
    assert report["optimizer"] == "AdamW"   # the adapters train in fp32


def test_bf16_full_weights_train_with_kahan_adamw(workspace, capsys):
    out = workspace / "out"
    code = main(["unlearn", "--config", str(workspace / "run.yaml"), "--max-steps", "1", "--precision", "bf16",
                 "--output-dir", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["optimizer"] == json.loads((out / "run.json").read_text())[
        "optimizer"] == "KahanAdamW"


def test_help_tells_what_a_merge_into_bf16_weights_loses(capsys):
    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ["adapter/ (with --lora: the unmerged PEFT adapter", "merge_rounding_error",
                   "rounds small updates (such as the default --lr gives) largely away", "warned of above 10%"]:
        assert phrase in text, phrase


def test_check_loads_everything_and_writes_nothing(workspace, capsys):
    """Nothing written, and no accelerate state left: after it (fp32), an Accelerator of the caller's in bf16 was
    refused in that process ("restart your runtime")."""
    from accelerate import Accelerator

    code = main(["unlearn", "--config", str(workspace / "run.yaml"), "--output-dir", str(workspace / "out"),
                 "--check"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["forget"] == 3 and report["normal"] == 5 and report["mismatch_pool"] > 0
    assert (report["packing"], report["packing_unavailable"]) == ("auto", None)   # a Llama: it packs
    assert not os.path.exists(workspace / "out")
    assert Accelerator(mixed_precision="bf16", cpu=True).mixed_precision == "bf16"


def test_check_refuses_packing_on_for_a_model_that_cannot_pack(workspace, capsys, monkeypatch):
    """--packing on for a model whose packed rows are not its padded ones: --check says so, with the reason."""
    from fastalign.unlearn import packing
    monkeypatch.setattr(packing, "_probe", lambda model, window: "a reason of the model's")
    code = main(["unlearn", "--config", str(workspace / "run.yaml"), "--output-dir", str(workspace / "out"),
                 "--packing", "on", "--check"])
    assert code == 2
    assert "fastalign unlearn: error: packing='on': a reason of the model's" in capsys.readouterr().err


@pytest.mark.parametrize("check", [False, True])
def test_only_rank_0_prints_the_report(workspace, capsys, monkeypatch, check):
    """Under a launcher every process runs the command: the report is printed once (stdout stays one JSON)."""
    monkeypatch.setenv("RANK", "1")
    extra = ["--check"] if check else ["--max-steps", "1", "--no-progress"]
    code = main(["unlearn", "--config", str(workspace / "run.yaml"), "--output-dir", str(workspace / "out"), *extra])
    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().out == ""


@needs_fcntl
def test_a_rank_other_than_0_runs_beside_the_lock_rank_0_holds(workspace, capsys, monkeypatch):
    """Under a launcher the ranks of one run share its --output-dir: rank 0 alone takes the lock, and the others,
    finding it held (here by a process standing for rank 0), run on."""
    monkeypatch.setenv("RANK", "1")
    out = workspace / "out"
    with holding(out, directory=True):
        code = main(["unlearn", "--config", str(workspace / "run.yaml"), "--output-dir", str(out), "--max-steps", "1",
                     "--no-progress"])
    assert code == 0, capsys.readouterr().err


def test_errors_name_the_problem_and_write_nothing(workspace, capsys):
    base = ["unlearn", "--config", str(workspace / "run.yaml"), "--output-dir", str(workspace / "out"),
            "--no-progress"]
    write_jsonl(workspace / "bad.jsonl", [{"prompt": "p", "answer": "a"}, {"prompt": "q"}])
    cases = [(["--forget", str(workspace / "absent.jsonl")], "data file not found: .*absent.jsonl"),
             (["--forget", str(workspace / "bad.jsonl")], r"bad.jsonl: row 2: missing field 'answer'"),
             (["--max-length", "8"], r"pku.jsonl:row 1: the prompt takes \d+ tokens"),
             (["--normal-weight", "nan"], "loss weight normal must be a finite number"),
             (["--model", str(workspace / "nowhere")], "--model: no model directory at"),
             # a bare name, no directory: transformers retried the Hub for ~48 s on a machine without a network
             (["--model", "nope"], "--model: no model directory at 'nope'")]
    for extra, message in cases:
        assert main(base + extra) == 2
        assert re.search(message, capsys.readouterr().err), message
        assert not os.path.exists(workspace / "out")
    (workspace / "typo.yaml").write_text("max_step: 3\n")
    assert main(["unlearn", "--config", str(workspace / "typo.yaml")]) == 2
    assert f"error: {workspace / 'typo.yaml'}: unknown setting(s) ['max_step']" in capsys.readouterr().err   # the file
    # an int too big for a float (YAML reads 400 digits as an int) ended in math.isfinite's OverflowError traceback
    (workspace / "huge.yaml").write_text(f"lr: 1{'0' * 400}\n")
    assert main(["unlearn", "--config", str(workspace / "huge.yaml")]) == 2
    assert f"error: lr must be a finite number >= 0, got 1{'0' * 400}\n" in capsys.readouterr().err


@pytest.mark.parametrize("check", [["--check"], []])
@pytest.mark.parametrize("config_change, message", [
    ({"max_position_embeddings": 16},
     r"more than the model's context \(max_position_embeddings=16\); set max_length \(--max-length\) to at "
     r"most 16"),
    # Granite: a Llama whose logits are divided by logits_scaling (the same weights load), a divisor made unknown
    ({"architectures": ["GraniteForCausalLM"], "model_type": "granite", "logits_scaling": 4.0},
     r"GraniteForCausalLM: its logits are not its lm_head's weight applied to the final hidden states"),
], ids=["rows-past-the-context", "unknown-logit-transform"])
def test_a_model_the_run_cannot_serve_is_an_error_before_any_output(workspace, capsys, monkeypatch, check,
                                                                    config_change, message):
    """Rows longer than the model's context, a model whose logits the fused losses do not reproduce: a clear
    error (no traceback), from --check as from a run, and nothing written."""
    monkeypatch.delitem(models._LOGIT_MULTIPLIERS, "logits_scaling")
    config_file = workspace / "model" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **config_change}))
    code = main(["unlearn", "--config", str(workspace / "run.yaml"), "--output-dir", str(workspace / "out"),
                 "--no-progress"] + check)
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not os.path.exists(workspace / "out")


@pytest.mark.parametrize("check", [["--check"], []])
@pytest.mark.parametrize("module, options, message", [
    ("accelerate", [], "the unlearning trainer needs accelerate: pip install 'fastalign[unlearn]'"),
    ("peft", ["--lora"], "lora=True needs peft: pip install 'fastalign[lora]'")])
def test_a_missing_extra_is_an_error_naming_it_before_the_model_loads(workspace, capsys, monkeypatch, check, module,
                                                                      options, message):
    """`pip install fastalign` alone installs neither accelerate nor peft: a run, and --check, name the extra to
    install before the model loads (a run was a traceback once the model and data had loaded; --check passed)."""
    def never(config):
        raise AssertionError("the model loaded")

    monkeypatch.setitem(sys.modules, module, None)   # `import module` then fails as where it is not installed
    monkeypatch.setattr("fastalign.unlearn.run.load_model_and_tokenizer", never)
    code = main(["unlearn", "--config", str(workspace / "run.yaml"), "--output-dir", str(workspace / "out"),
                 "--no-progress", *options, *check])
    assert code == 2
    assert f"fastalign unlearn: error: {message}" in capsys.readouterr().err
    assert not os.path.exists(workspace / "out")


def test_attn_implementation_chooses_the_models_attention(workspace, capsys):
    """--attn-implementation reaches from_pretrained (flash_attention_2 is the one the gpu extra serves); one that
    cannot load is an error naming the setting, before anything is written."""
    for name, expected in ((None, "sdpa"), ("eager", "eager")):  # None: left out, transformers' choice
        attention = {} if name is None else {"attn_implementation": name}
        config = UnlearnConfig(model=str(workspace / "model"), **attention)
        assert load_model_and_tokenizer(config)[0].config._attn_implementation == expected
    base = ["unlearn", "--config", str(workspace / "run.yaml"), "--output-dir", str(workspace / "out"),
            "--no-progress"]
    for name in ("flash_attention_2", "nonsense"):
        if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is not None:
            continue
        assert main(base + ["--attn-implementation", name]) == 2
        assert f"fastalign unlearn: error: attn_implementation '{name}': " in capsys.readouterr().err
        assert not os.path.exists(workspace / "out")


def test_a_model_that_scales_its_logits_unlearns(workspace, capsys):
    """Granite divides its logits by logits_scaling (a Llama's weights load as one): the run serves it."""
    config_file = workspace / "model" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "architectures": ["GraniteForCausalLM"],
                                       "model_type": "granite", "logits_scaling": 4.0}))
    code = main(["unlearn", "--config", str(workspace / "run.yaml"), "--output-dir", str(workspace / "out"),
                 "--max-steps", "1", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert os.path.exists(workspace / "out" / "model" / "config.json")


def test_skip_long_prompts_counts_what_it_skips(workspace, capsys):
    """At 19 tokens the first PKU prompt (19 tokens with BOS) leaves no room for its answer; the other (17 tokens,
    and the template's space, which some mismatch answers' first tokens leave apart) does; at 18 neither does.
    The answers max_length cuts short are counted too (--check and run.json)."""
    base = ["unlearn", "--config", str(workspace / "run.yaml"), "--output-dir", str(workspace / "out"),
            "--no-progress", "--skip-long-prompts"]
    assert main(base + ["--max-length", "19", "--check"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["forget"] == 2 and report["skipped"] == {"forget": 1, "normal": 0}
    assert report["normal"] == 5 and report["answers_cut"] == {"forget": 2, "normal": 5}  # each kept answer is cut
    assert main(base + ["--max-length", "19", "--max-steps", "1"]) == 0
    saved = json.loads((workspace / "out" / "run.json").read_text())
    assert saved["skipped_examples"] == {"forget": 1, "normal": 0}
    assert saved["answers_cut"] == {"forget": 2, "normal": 5}
    assert main(base + ["--max-length", "18", "--output-dir", str(workspace / "out2")]) == 2
    assert "every forget example's prompt leaves no answer token within max_length=18" in capsys.readouterr().err
    assert not os.path.exists(workspace / "out2")


def test_command_line_wins_over_config_file(workspace):
    from fastalign.cli import build_parser
    args = build_parser().parse_args(["unlearn", "--config", str(workspace / "run.yaml"), "--lr", "0.5",
                                      "--no-progress", "--max-forget-nll", "none"])
    config = config_from_args(args)
    assert (config.lr, config.progress, config.max_forget_nll, config.max_steps) == (0.5, False, None, 50)
    for text, value in (("None", None), ("NONE", None), ("2.5", 2.5)):   # any case, as YAML and Python write it
        args = build_parser().parse_args(["unlearn", "--config", str(workspace / "run.yaml"), "--max-forget-nll", text])
        assert config_from_args(args).max_forget_nll == value
    args = build_parser().parse_args(["unlearn", "--config", str(workspace / "run.yaml"), "--lora-alpha", "0.5"])
    assert config_from_args(args).lora_alpha == 0.5   # any number > 0, as in the config file


def test_relative_paths_of_a_config_file_are_read_from_the_working_directory(workspace, monkeypatch):
    """As --help says: a config file's relative paths name files of the directory the command runs in, not of the
    file's own directory (a config kept in configs/ names data as the command line would)."""
    config_help = " ".join(next(a.help for a in unlearn_actions() if a.dest == "config").split())
    assert "Relative paths in it are read from the directory the command runs in, not the file's" in config_help
    (workspace / "configs").mkdir()
    (workspace / "configs" / "run.yaml").write_text(yaml.safe_dump({"forget": ["pku.jsonl"], "normal": "tqa.csv"}))
    monkeypatch.chdir(workspace)
    args = build_parser().parse_args(["unlearn", "--config", "configs/run.yaml", "--model", "model",
                                      "--output-dir", "out"])
    config = config_from_args(args)
    config.check_paths()
    assert (list(config.forget), config.normal) == (["pku.jsonl"], "tqa.csv")


@pytest.mark.parametrize("check", [False, True])
def test_the_command_ends_the_process_group_it_ran_in(workspace, capsys, check):
    """Under `accelerate launch` a process group is live when the command returns (a one-process gloo group
    stands in here): the command ends it, after a run as after an error, so that the interpreter's exit does not
    abort the finished process."""
    import torch.distributed as dist

    from tests.unlearn.test_distributed import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        extra = ["--check"] if check else ["--normal-weight", "nan"]
        code = main(["unlearn", "--config", str(workspace / "run.yaml"), "--output-dir", str(workspace / "out"),
                     *extra])
        assert code == (0 if check else 2), capsys.readouterr().err
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_bad_model_directory_or_backend_is_an_error_not_a_traceback(workspace, capsys):
    """A model directory without weights (transformers raises OSError) and a config-file backend typo (the fused
    op would refuse it only at the first step, after the output directory was written): exit 2, nothing written."""
    (workspace / "no_weights").mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (workspace / "no_weights" / name).write_bytes((workspace / "model" / name).read_bytes())
    (workspace / "typo.yaml").write_text(yaml.safe_dump({**yaml.safe_load((workspace / "run.yaml").read_text()),
                                                         "backend": "tritn"}))
    base = ["unlearn", "--output-dir", str(workspace / "out"), "--no-progress", "--max-steps", "1"]
    cases = [(["--config", str(workspace / "run.yaml"), "--model", str(workspace / "no_weights")],
              r"model .*no_weights cannot be loaded: .*model.safetensors"),
             (["--config", str(workspace / "typo.yaml")], r"backend must be one of .* got 'tritn'")]
    for extra, message in cases:
        assert main(base + extra) == 2
        assert re.search(message, capsys.readouterr().err), message
        assert not os.path.exists(workspace / "out")


def test_help_shows_the_fsdp_command_on_continued_lines_and_bad_values_read_clearly(capsys):
    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    assert "--fsdp_version 2 \\\n      --fsdp_auto_wrap_policy" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["unlearn", "--max-forget-nll", "high"])
    assert "argument --max-forget-nll: expected a number or 'none', got 'high'" in capsys.readouterr().err


def unlearn_actions():
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices["unlearn"]._actions


def test_help_states_the_default_of_every_on_off_option():
    """Each --x / --no-x flag says which of the two a run gets when neither is given."""
    flags = [a for a in unlearn_actions() if isinstance(a, argparse.BooleanOptionalAction)]
    missing = [a.option_strings[0] for a in flags if "(default: " not in a.help]
    assert flags and not missing, missing


def test_help_names_the_settings_only_a_config_file_sets():
    actions = unlearn_actions()
    config_help = next(a.help for a in actions if a.dest == "config")
    file_only = [f.name for f in fields(UnlearnConfig) if f.name not in {a.dest for a in actions}]
    assert file_only and all(f"{name}, default {getattr(UnlearnConfig, name)}" in config_help
                             for name in file_only), (file_only, config_help)


def test_system_turn_from_the_command_line_or_a_config_file(workspace, capsys):
    """--chat-template --system TEXT trains (with the cached reference on normal rows that hold the system turn
    too) and records the setting; a config file sets it the same way."""
    out = workspace / "out"
    code = main(["unlearn", "--config", str(workspace / "run.yaml"), "--chat-template", "--system", "Be brief.",
                 "--output-dir", str(out), "--max-steps", "1", "--no-progress", "--reference", "cached"])
    assert code == 0, capsys.readouterr().err
    saved = json.loads((out / "config.json").read_text())
    assert (saved["chat_template"], saved["system"]) == (True, "Be brief.")
    settings = {**yaml.safe_load((workspace / "run.yaml").read_text()), "chat_template": True, "system": "Be brief."}
    (workspace / "system.yaml").write_text(yaml.safe_dump(settings))
    args = build_parser().parse_args(["unlearn", "--config", str(workspace / "system.yaml")])
    assert config_from_args(args).system == "Be brief."


def test_system_needs_a_chat_template_with_a_system_role(workspace, capsys):
    """--system without --chat-template, or with a template that refuses a system turn: an error naming --system,
    nothing written."""
    base = ["unlearn", "--config", str(workspace / "run.yaml"), "--output-dir", str(workspace / "out"),
            "--no-progress", "--system", "Be brief."]
    assert main(base) == 2
    assert "system (--system) is a turn of the chat template: it needs chat_template=true (--chat-template)" in \
        capsys.readouterr().err
    template = workspace / "model" / "chat_template.jinja"
    template.write_text("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                        "{% endif %}" + template.read_text())
    for extra in (["--check"], ["--max-steps", "1"]):
        assert main(base + ["--chat-template"] + extra) == 2
        assert re.search(r"system \(--system\) needs a chat template with a system role: .*System role not supported",
                         capsys.readouterr().err)
        assert not os.path.exists(workspace / "out")


@pytest.mark.parametrize("check", [["--check"], []])
def test_a_used_output_dir_is_refused_before_the_model_loads(workspace, capsys, monkeypatch, check):
    """An --output-dir holding a finished model (or a checkpoint without --resume) is an error found before the
    model and data load, not after minutes of loading a large model."""
    (workspace / "out" / "model").mkdir(parents=True)

    def no_load(config):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("fastalign.unlearn.run.load_model_and_tokenizer", no_load)
    code = main(["unlearn", "--config", str(workspace / "run.yaml"), "--output-dir", str(workspace / "out"),
                 "--no-progress"] + check)
    assert code == 2
    assert "already holds a finished model; choose another output_dir (--output-dir)" in capsys.readouterr().err


@pytest.mark.parametrize("check", [["--check"], []])
@pytest.mark.parametrize("output, message", [
    ("afile", r"output_dir \(--output-dir\): '.*afile' is a file, not a directory"),
    ("afile/sub", r"output_dir \(--output-dir\): '.*afile/sub' cannot be made: '.*afile' is a file, not a directory"),
    ("readonly/out", r"output_dir \(--output-dir\): cannot write in '.*readonly/out' \(to be made in '.*readonly'\): "
                     "Permission denied"),
], ids=["a-file", "under-a-file", "read-only"])
def test_an_output_dir_that_cannot_be_written_is_a_usage_error_before_the_model_loads(workspace, capsys, monkeypatch,
                                                                                       check, output, message):
    """A file as --output-dir or among its parents, and a read-only parent, failed once the model had loaded: with
    a bare "[Errno 17] File exists", or a traceback from os.makedirs. Now exit 2, naming the option, writing nothing.
    (The read-only directory refuses the probe file by monkeypatch: root writes in any directory.)"""
    (workspace / "afile").write_text("")
    (workspace / "readonly").mkdir()
    make_file = tempfile.mkstemp

    def read_only_mkstemp(*args, dir=None, **kwargs):
        if dir == str(workspace / "readonly"):
            raise PermissionError(13, "Permission denied", dir)
        return make_file(*args, dir=dir, **kwargs)

    def no_load(config):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(tempfile, "mkstemp", read_only_mkstemp)
    monkeypatch.setattr("fastalign.unlearn.run.load_model_and_tokenizer", no_load)
    code = main(["unlearn", "--config", str(workspace / "run.yaml"), "--output-dir", str(workspace / output),
                 "--no-progress"] + check)
    err = capsys.readouterr().err
    assert code == 2 and re.fullmatch(f"fastalign unlearn: error: {message}\n", err), err
    assert os.listdir(workspace / "readonly") == [] and (workspace / "afile").read_text() == ""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
@pytest.mark.parametrize("check", [["--check"], []])
def test_an_output_dir_whose_log_is_a_pipe_is_a_usage_error_before_the_model_loads(workspace, capsys, monkeypatch,
                                                                                     check):
    """A log.jsonl pipe in --output-dir passed every check: the run loaded the model, trained its first step, then
    blocked forever opening the log to append. Now exit 2 before the model loads (a missing check fails the loader
    patched here instead of hanging), the pipe left as it was."""
    out = workspace / "out"
    out.mkdir()
    os.mkfifo(out / "log.jsonl")

    def no_load(config):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("fastalign.unlearn.run.load_model_and_tokenizer", no_load)
    code = main(["unlearn", "--config", str(workspace / "run.yaml"), "--output-dir", str(out), "--no-progress"] + check)
    err = capsys.readouterr().err
    assert code == 2 and err == (f"fastalign unlearn: error: output_dir (--output-dir): {str(out / 'log.jsonl')!r} is "
                                 "not a regular file (a pipe or a device): the run writes its log.jsonl there\n"), err
    assert os.listdir(out) == ["log.jsonl"] and not os.path.isfile(out / "log.jsonl")


@needs_fcntl
def test_an_output_dir_another_process_writes_is_refused_and_resumed_once_it_is_killed(workspace, capsys,
                                                                                        monkeypatch):
    """Two runs on one --output-dir interleaved their log.jsonl lines and checkpoints: while another process holds
    the directory's lock (as a running `fastalign unlearn` does) the command stops before it reads or writes it;
    after that process is killed with SIGKILL, its lock file left inside, --resume continues the killed run."""
    out = workspace / "out"
    command = ["unlearn", "--config", str(workspace / "run.yaml"), "--output-dir", str(out), "--no-progress",
               "--max-steps", "2", "--save-every", "1"]

    def interrupt_at_step_2(record):
        if record.step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr("fastalign.unlearn.run.run_unlearning",
                        functools.partial(run_unlearning, step_callback=interrupt_at_step_2))
    assert main(command) == 128 + signal.SIGINT
    monkeypatch.undo()
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    with holding(out, directory=True) as holder:
        for resume in (["--resume"], []):   # without: the lock's error, before the run's checkpoints are read
            assert main(command + resume) == 2
            assert (f"fastalign unlearn: error: output_dir (--output-dir): {str(out)!r} is being written by another "
                    f"fastalign process (PID {holder.pid})") in capsys.readouterr().err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".fastalign.lock"} == before
        holder.kill()
    assert (out / ".fastalign.lock").is_file()
    assert main(command + ["--resume"]) == 0, capsys.readouterr().err
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert (out / "model" / "model.safetensors").is_file() and not (out / ".fastalign.lock").exists()


def test_chat_template_without_one_in_the_tokenizer_names_the_option(workspace, capsys):
    """--chat-template on a tokenizer without a chat template: the error names the command-line option (not only
    the Python class), from --check as from a run, and nothing is written."""
    (workspace / "model" / "chat_template.jinja").unlink()
    base = ["unlearn", "--config", str(workspace / "run.yaml"), "--output-dir", str(workspace / "out"),
            "--no-progress", "--chat-template"]
    for extra in (["--check"], ["--max-steps", "1"]):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert "error: chat_template (--chat-template): the tokenizer " in err and "has no chat template" in err
        assert not os.path.exists(workspace / "out")


def test_help_describes_the_system_turn(capsys):
    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--system TEXT with --chat-template: a system turn before every example's user turn" in text
    assert "fastalign eval --template chat --system TEXT" in text


# the tiny tokenizer's chat template as Qwen3's behaves: a reasoning block before the last answer, in the generation
# prompt only with enable_thinking false
THINKING_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' and loop.last %}"
                     "<think></think>{% endif %}{{ m['content'] | trim }}</s>{% endfor %}{% if add_generation_prompt %}"
                     "<|assistant|>{% if enable_thinking is false %}<think></think>{% endif %}{% endif %}")


def test_chat_template_kwargs_let_a_thinking_template_train_and_are_recorded(workspace, capsys, monkeypatch):
    """A chat template that writes text before the answer that its generation prompt lacks (Qwen3's reasoning block)
    is refused, naming the option that fixes it; with --chat-template-kwargs '{"enable_thinking": false}' the run
    trains and records it, and a resume with other template variables is refused. A value that is no JSON object is
    a usage error naming the option."""
    (workspace / "model" / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    out = workspace / "out"
    base = ["unlearn", "--config", str(workspace / "run.yaml"), "--output-dir", str(out), "--no-progress",
            "--chat-template", "--max-steps", "2", "--save-every", "1"]
    assert main(base + ["--check"]) == 2
    err = capsys.readouterr().err
    assert "the chat template writes '<think></think>' between the generation prompt and the answer" in err
    assert """--chat-template-kwargs '{"enable_thinking": false}'""" in err and not out.exists()

    def interrupt_at_step_2(record):
        if record.step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr("fastalign.unlearn.run.run_unlearning",
                        functools.partial(run_unlearning, step_callback=interrupt_at_step_2))
    assert main(base + ["--chat-template-kwargs", '{"enable_thinking": false}']) == 128 + signal.SIGINT
    monkeypatch.undo()
    assert json.loads((out / "config.json").read_text())["chat_template_kwargs"] == {"enable_thinking": False}
    assert main(base + ["--chat-template-kwargs", '{"enable_thinking": false, "x": 1}', "--resume"]) == 2
    assert "setting(s) ['chat_template_kwargs'] differ from the interrupted run" in capsys.readouterr().err
    for bad in ("{enable_thinking: false}", '["enable_thinking"]'):
        with pytest.raises(SystemExit) as exit_info:
            main(base + ["--chat-template-kwargs", bad])
        assert exit_info.value.code == 2
        assert "argument --chat-template-kwargs: expected a JSON object such as" in capsys.readouterr().err


# every option of `fastalign unlearn` with a value other than its setting's default: each must reach its own setting
EVERY_OPTION = {
    "model": (["--model", "m"], "m"),
    "forget": (["--forget", "a.jsonl", "b.jsonl"], ["a.jsonl", "b.jsonl"]),
    "forget_format": (["--forget-format", "hh"], "hh"),
    "normal": (["--normal", "n.jsonl"], "n.jsonl"),
    "mismatch_pool": (["--mismatch-pool", "p.jsonl"], "p.jsonl"),
    "output_dir": (["--output-dir", "o"], "o"),
    "template": (["--template", "Q: {prompt} A: {answer}"], "Q: {prompt} A: {answer}"),
    "chat_template": (["--chat-template"], True),
    "system": (["--system", "Be brief."], "Be brief."),
    "chat_template_kwargs": (["--chat-template-kwargs", '{"enable_thinking": false}'], {"enable_thinking": False}),
    "answer_eos": (["--answer-eos"], True),
    "max_length": (["--max-length", "77"], 77),
    "skip_long_prompts": (["--skip-long-prompts"], True),
    "forget_weight": (["--forget-weight", "0.25"], 0.25),
    "mismatch_weight": (["--mismatch-weight", "0.75"], 0.75),
    "normal_weight": (["--normal-weight", "1.5"], 1.5),
    "mismatch_per_prompt": (["--mismatch-per-prompt", "3"], 3),
    "reference": (["--reference", "cached"], "cached"),
    "reference_cache": (["--reference-cache", "host"], "host"),
    "packing": (["--packing", "off"], "off"),
    "max_steps": (["--max-steps", "7"], 7),
    "batch_size": (["--batch-size", "3"], 3),
    "normal_batch_size": (["--normal-batch-size", "4"], 4),
    "grad_accum": (["--grad-accum", "2"], 2),
    "lr": (["--lr", "1e-3"], 1e-3),
    "weight_decay": (["--weight-decay", "0.05"], 0.05),
    "max_forget_nll": (["--max-forget-nll", "12.5"], 12.5),
    "precision": (["--precision", "bf16-mixed"], "bf16-mixed"),
    "attn_implementation": (["--attn-implementation", "eager"], "eager"),
    "gradient_checkpointing": (["--gradient-checkpointing"], True),
    "optimizer_in_backward": (["--no-optimizer-in-backward"], False),
    "grads_in_forward": (["--grads-in-forward"], True),
    "fused_layers": (["--no-fused-layers"], False),
    "seed": (["--seed", "11"], 11),
    "backend": (["--backend", "torch"], "torch"),
    "lora": (["--lora"], True),
    "lora_rank": (["--lora-rank", "8"], 8),
    "lora_alpha": (["--lora-alpha", "4.5"], 4.5),
    "lora_dropout": (["--lora-dropout", "0.1"], 0.1),
    "lora_targets": (["--lora-targets", "q_proj", "k_proj", "o_proj"], ["q_proj", "k_proj", "o_proj"]),
    "save_every": (["--save-every", "5"], 5),
    "keep_checkpoints": (["--keep-checkpoints", "3"], 3),
    "resume": (["--resume"], True),
    "log_every": (["--log-every", "6"], 6),
    "progress": (["--no-progress"], False),
}


def test_every_option_sets_its_own_setting():
    """An option mapped to another setting (a dest), read as the wrong type (an int for a rate, one value for a
    list) or dropped was silently ignored or refused: each option's value reaches its own setting, and no other."""
    defaults = UnlearnConfig().to_dict()
    options = [a for a in unlearn_actions() if a.option_strings and a.dest not in ("help", "config", "check")]
    assert {a.dest for a in options} == set(EVERY_OPTION)   # the table covers every option of the command
    assert all(defaults[name] != value for name, (_, value) in EVERY_OPTION.items())
    argv = ["unlearn"] + [word for option, _ in EVERY_OPTION.values() for word in option]
    config = config_from_args(build_parser().parse_args(argv))
    assert config.to_dict() == {**defaults, **{name: value for name, (_, value) in EVERY_OPTION.items()}}


def test_the_other_side_of_every_switch_and_auto_choice_overrides_a_config_file(tmp_path):
    """--no-x (or --x) and the documented 'auto' choices are accepted on the command line and win over the file."""
    settings = {"chat_template": True, "answer_eos": True, "skip_long_prompts": True, "gradient_checkpointing": True,
                "optimizer_in_backward": False, "grads_in_forward": True, "fused_layers": False, "lora": True,
                "resume": True, "progress": False, "reference": "copy", "forget_format": "pku", "max_forget_nll": 3.0}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(settings))
    argv = ["unlearn", "--config", str(tmp_path / "run.yaml"), "--no-chat-template", "--no-answer-eos",
            "--no-skip-long-prompts", "--no-gradient-checkpointing", "--optimizer-in-backward", "--no-grads-in-forward",
            "--fused-layers", "--no-lora", "--no-resume", "--progress", "--reference", "auto", "--forget-format",
            "auto", "--max-forget-nll", "none"]
    config = config_from_args(build_parser().parse_args(argv))
    assert {name: getattr(config, name) for name in settings} == {
        "chat_template": False, "answer_eos": False, "skip_long_prompts": False, "gradient_checkpointing": False,
        "optimizer_in_backward": True, "grads_in_forward": False, "fused_layers": True, "lora": False,
        "resume": False, "progress": True, "reference": "auto", "forget_format": "auto", "max_forget_nll": None}


def test_check_reports_the_data_and_the_reference_the_run_would_use(workspace, capsys):
    """--check's report: each count from its own stream, and the reference actually used ('auto' resolved)."""
    code = main(["unlearn", "--config", str(workspace / "run.yaml"), "--output-dir", str(workspace / "out"),
                 "--check"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report == {"model": "LlamaForCausalLM", "forget": 3, "normal": 5, "mismatch_pool": 12,
                      "skipped": {"forget": 0, "normal": 0}, "answers_cut": {"forget": 0, "normal": 0},
                      "reference": "copy", "packing": "auto", "packing_unavailable": None}


@pytest.mark.parametrize("reference", [[], ["--reference", "cached"]])
def test_check_reports_no_reference_where_the_run_builds_none(workspace, capsys, reference):
    """--normal-weight 0 draws no normal rows and builds no reference (the run's warning says so), but --check
    reported "reference": "copy", a frozen copy of the model that never exists: it reports null, as run.json and the
    log report the turned-off normal KL."""
    code = main(["unlearn", "--config", str(workspace / "run.yaml"), "--output-dir", str(workspace / "out"),
                 "--check", "--normal-weight", "0", *reference])
    assert code == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert (report["normal"], report["reference"]) == (0, None)


def test_the_report_of_a_run_is_its_run_json(workspace, capsys, monkeypatch):
    """The JSON a run prints holds run.json's values, each under its own name (here a model that cannot pack)."""
    from fastalign.unlearn import packing
    monkeypatch.setattr(packing, "_probe", lambda model, window: "a reason of the model's")
    out = workspace / "out"
    code = main(["unlearn", "--config", str(workspace / "run.yaml"), "--output-dir", str(out), "--max-steps", "1",
                 "--no-progress", "--no-optimizer-in-backward"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "run.json").read_text())
    assert sorted(report) == sorted(["steps", "stop_reason", "model_dir", "adapter_dir", "merge_rounding_error",
                                     "packing_unavailable", "optimizer", "optimizer_in_backward", "compute"])
    assert report == {name: saved[name] for name in report}
    assert (report["model_dir"], report["optimizer_in_backward"], report["packing_unavailable"]) == (
        str(out / "model"), False, "a reason of the model's")


def test_check_refuses_a_token_the_model_has_no_embedding_for(workspace, capsys):
    """A tokenizer with a token added but the model not resized: --check, as a run does, names the row (an IndexError
    deep in the forward once training started)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workspace / "model")
    tokenizer.add_tokens(["<|unembedded|>"])
    tokenizer.save_pretrained(workspace / "model")
    write_jsonl(workspace / "new.jsonl", [{"prompt": "What is harmful?", "answer": "help <|unembedded|>"}])
    base = ["unlearn", "--config", str(workspace / "run.yaml"), "--output-dir", str(workspace / "out"),
            "--forget", str(workspace / "new.jsonl"), "--no-progress"]
    for extra in (["--check"], ["--max-steps", "1"]):
        assert main(base + extra) == 2
        assert re.search(r"new.jsonl:row 1: token id \d+ is past the model's \d+ input embeddings",
                         capsys.readouterr().err)
        assert not os.path.exists(workspace / "out")


@pytest.mark.parametrize("check", [["--check"], []])
@pytest.mark.parametrize("error", [TypeError, NotImplementedError, FloatingPointError, FileExistsError,
                                   FileNotFoundError, ValueError])
def test_the_errors_a_run_raises_are_reported_without_a_traceback(workspace, capsys, monkeypatch, check, error):
    """A slow tokenizer (TypeError), a model the fused path does not serve (NotImplementedError), a loss that is not
    finite (FloatingPointError), a used output directory (FileExistsError): exit 2 and one line naming it."""
    def fail(config, *args, **kwargs):
        raise error("the reason")

    monkeypatch.setattr("fastalign.unlearn.run.load_model_and_tokenizer" if check else
                        "fastalign.unlearn.run.run_unlearning", fail)
    code = main(["unlearn", "--config", str(workspace / "run.yaml"), "--output-dir", str(workspace / "out"),
                 "--no-progress", *check])
    assert (code, capsys.readouterr().err) == (2, "fastalign unlearn: error: the reason\n")


def test_resume_accepts_the_same_model_directory_spelled_otherwise(workspace, capsys, monkeypatch):
    """The resume compared the path settings as written: a run started with `--model model` and resumed with the
    absolute path or `./model/` (another working directory, a trailing slash), the very same files, was refused. A
    path is compared as its absolute path (the checkpoint's digests tell whether the files changed); another file is
    still refused, the message showing both values."""
    monkeypatch.chdir(workspace)
    out = workspace / "out"
    command = ["unlearn", "--config", "run.yaml", "--output-dir", str(out), "--no-progress", "--max-steps", "2",
               "--save-every", "1"]

    def interrupt_at_step_2(record):
        if record.step == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr("fastalign.unlearn.run.run_unlearning",
                      functools.partial(run_unlearning, step_callback=interrupt_at_step_2))
        assert main(command + ["--model", "model", "--forget", "pku.jsonl"]) == 128 + signal.SIGINT
    (workspace / "copy.jsonl").write_bytes((workspace / "pku.jsonl").read_bytes())
    assert main(command + ["--model", "model", "--forget", "copy.jsonl", "--resume"]) == 2
    assert ("setting(s) ['forget'] differ from the interrupted run: forget ['pku.jsonl'] then, ['copy.jsonl'] now"
            in capsys.readouterr().err)
    code = main(command + ["--model", f"{workspace / 'model'}/", "--forget", "./pku.jsonl", "--resume"])
    assert code == 0, capsys.readouterr().err
    assert (out / "model" / "model.safetensors").is_file()


def test_check_refuses_lora_targets_the_run_refuses(workspace, capsys):
    """--check ("load and validate everything") passed --lora-targets naming no module of the model, which the run
    refuses once the model has loaded: it now builds the run's trainer, whose LoRA wrap names them, as the run."""
    base = ["unlearn", "--config", str(workspace / "run.yaml"), "--output-dir", str(workspace / "out"),
            "--no-progress", "--lora", "--lora-targets", "no_such_proj"]
    for extra in (["--check"], ["--max-steps", "1"]):
        assert main(base + extra) == 2
        assert "error: lora_targets (--lora-targets) ['no_such_proj']: " in capsys.readouterr().err
        assert not os.path.exists(workspace / "out")


@pytest.mark.skipif(HAS_CUDA, reason="the accelerator's device is CUDA, where backend='triton' runs")
def test_check_and_the_run_refuse_the_triton_backend_on_the_cpu(workspace, capsys, monkeypatch):
    """--backend triton on a CPU accelerator: --check passed it, and the run failed only at its first step, once it had
    written out/config.json. Both refuse it before writing anything."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    base = ["unlearn", "--config", str(workspace / "run.yaml"), "--output-dir", str(workspace / "out"),
            "--no-progress", "--backend", "triton"]
    for extra in (["--check"], ["--max-steps", "1"]):
        assert main(base + extra) == 2
        assert "error: backend='triton' needs CUDA tensors (got tensors on cpu)" in capsys.readouterr().err
        assert not os.path.exists(workspace / "out")


def test_an_interrupt_after_the_model_is_written_does_not_send_the_user_to_a_refused_resume(workspace, capsys,
                                                                                          monkeypatch):
    """A Ctrl-C once model/ and run.json were written (during the trainer's last clean-up, a full collection, which
    takes a while) exited 130 with "rerun the command with --resume", and that resume is refused: the output
    directory holds a finished model. The interrupt ends the clean-up only: the command reports the finished run."""
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(accelerator_module, "gc", types.SimpleNamespace(collect=interrupted))
    out = workspace / "out"
    code = main(["unlearn", "--config", str(workspace / "run.yaml"), "--output-dir", str(out), "--max-steps", "2",
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    assert (out / "run.json").is_file() and (out / "model" / "model.safetensors").is_file()


def saving_to_a_full_disk(save_file, fail_at):
    """checkpoint.save_file writing its `fail_at`th file (1 for the first) and later ones to /dev/full, which refuses
    every write with ENOSPC: torch.save's own error then reads "unexpected pos", not a full disk."""
    calls = [0]

    def save(obj, path):
        calls[0] += 1
        save_file(obj, "/dev/full" if calls[0] >= fail_at else path)
    return save


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, a device that is always full")
@pytest.mark.parametrize("writer, save_every", [("checkpoint", 1), ("model", 1), ("model", 0)],
                         ids=["checkpoint", "model", "model-without-checkpoints"])
def test_a_full_disk_ends_the_run_with_one_line_naming_what_it_writes_and_how_to_go_on(workspace, capsys, monkeypatch,
                                                                                        writer, save_every):
    """A full disk while a checkpoint (torch.save: RuntimeError "[enforce fail at inline_container.cc:672] .
    unexpected pos") or model/ (safetensors: SafetensorError "I/O error: No space left on device (os error 28)") was
    written ended the run in a traceback. It is one line naming the directory being written and the full disk, with
    --resume's hint where a checkpoint is kept; the run then resumes from that checkpoint."""
    from safetensors import SafetensorError

    from fastalign.unlearn import checkpoint

    out = workspace / "out"
    if writer == "checkpoint":   # the second one's first file (each has rank-0.pt and state.pt)
        monkeypatch.setattr(checkpoint, "save_file", saving_to_a_full_disk(checkpoint.save_file, fail_at=3))
        written = out / "checkpoints" / "step-000002"
    else:
        def save_model(model, directory, state_dict):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        monkeypatch.setattr("fastalign.unlearn.trainer.save_model", save_model)
        written = out / "model"
    command = ["unlearn", "--config", str(workspace / "run.yaml"), "--output-dir", str(out), "--max-steps", "3",
               "--save-every", str(save_every), "--no-progress"]
    assert main(command) == 2
    hint = (f"; the checkpoints written so far (--save-every) are kept: rerun the command with --resume to continue "
            f"from the latest ({out / 'checkpoints' / ('step-000001' if writer == 'checkpoint' else 'step-000002')})"
            if save_every else "")
    assert capsys.readouterr().err.endswith(f"\nfastalign unlearn: error: cannot write {written}: the disk is full "
                                            f"(No space left on device){hint}\n")   # (after the loading's bars)
    assert not any(name.startswith(".tmp-") for name in os.listdir(out / "checkpoints" if save_every else out))
    if save_every:
        monkeypatch.undo()
        assert main(command + ["--resume"]) == 0, capsys.readouterr().err
        assert (out / "model" / "model.safetensors").is_file()


def test_a_failed_write_of_a_checkpoint_that_is_no_full_disk_is_not_said_to_be_one(workspace, monkeypatch):
    """Only a write failure whose cause is a full disk (ENOSPC, EDQUOT) is reported as one: torch.save's
    RuntimeError of another cause goes through as it is."""
    def save_file(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr("fastalign.unlearn.checkpoint.save_file", save_file)
    with pytest.raises(RuntimeError, match="unexpected pos"):
        main(["unlearn", "--config", str(workspace / "run.yaml"), "--output-dir", str(workspace / "out"),
              "--max-steps", "2", "--save-every", "1", "--no-progress"])
