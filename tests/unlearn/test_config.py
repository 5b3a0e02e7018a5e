"""UnlearnConfig: values read as a user writes them (from a config file too), settings refused before any work."""
import json
import os
import re

import numpy as np
import pytest

from fastalign.config_files import read_config_file
from fastalign.data_files import DataError
from fastalign.ops.checks import SEED_MAX
from fastalign.unlearn.config import RUN_FILES, UnlearnConfig, check_output_dir


def test_yaml_exponent_numbers_are_floats(tmp_path):
    """PyYAML (YAML 1.1) reads `2e-6` and `1.0e2` as strings; the SPEC's learning rate must load as written."""
    path = tmp_path / "run.yaml"
    path.write_text("lr: 2e-6\nmax_forget_nll: 1.0e2\nforget_weight: .5E+0\ntemplate: '2e-6'\nseed: 3\n")
    values = read_config_file(path)
    assert values == {"lr": 2e-6, "max_forget_nll": 100.0, "forget_weight": 0.5, "template": "2e-6", "seed": 3}
    config = UnlearnConfig.from_dict({k: v for k, v in values.items() if k != "template"})
    assert (config.lr, config.max_forget_nll, config.forget_weight) == (2e-6, 100.0, 0.5)
    path.write_text("max_forget_nll: -1.5e2\n")   # a signed one too
    assert read_config_file(path) == {"max_forget_nll": -150.0}


def test_unknown_backend_is_refused_with_the_other_settings():
    """Checked here, not at the first loss, which comes after the output directory is written."""
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\), got 'tritn'"):
        UnlearnConfig(backend="tritn")


def test_a_word_for_no_early_stop_points_to_null():
    """`max_forget_nll: none` in YAML is the text 'none': the error says how to write 'no early stop'."""
    with pytest.raises(ValueError, match=r"max_forget_nll must be a finite number, or null in a config file"):
        UnlearnConfig(max_forget_nll="none")


def test_system_is_a_text_and_needs_the_chat_template():
    assert UnlearnConfig(chat_template=True, system="Be brief.").system == "Be brief."
    with pytest.raises(ValueError, match=r"system \(--system\) is a turn of the chat template: it needs "
                                         r"chat_template=true \(--chat-template\)"):
        UnlearnConfig(system="Be brief.")
    with pytest.raises(ValueError, match="system must be a text .* got 3"):
        UnlearnConfig(chat_template=True, system=3)


def test_chat_template_kwargs_are_a_mapping_of_variables_and_need_the_chat_template(tmp_path):
    (tmp_path / "run.yaml").write_text("chat_template: true\nchat_template_kwargs: {enable_thinking: false}\n")
    config = UnlearnConfig.from_dict(read_config_file(tmp_path / "run.yaml"))
    assert config.chat_template_kwargs == {"enable_thinking": False} == config.to_dict()["chat_template_kwargs"]
    with pytest.raises(ValueError, match=r"chat_template_kwargs \(--chat-template-kwargs\) are variables of the chat "
                                         r"template: they need chat_template=true \(--chat-template\)"):
        UnlearnConfig(chat_template_kwargs={"enable_thinking": False})
    for bad in ("enable_thinking=false", {1: False}):
        with pytest.raises(ValueError, match=r"chat_template_kwargs must be a mapping of template variable names "
                                             rf"\(texts\) to values, or null, got {re.escape(repr(bad))}"):
            UnlearnConfig(chat_template=True, chat_template_kwargs=bad)


@pytest.mark.parametrize("settings, message", [
    ({"forget": 5}, r"forget must be a file path or a list of file paths, got 5"),
    ({"forget": ["a.jsonl", 3]}, r"forget must be a file path or a list of file paths, got \['a.jsonl', 3\]"),
    ({"lora_targets": 5}, r"lora_targets must be a module name or a list of module names, got 5"),
    ({"lora_targets": []}, r"lora_targets must be a module name or a list of module names, got \[\]"),
    ({"model": 5}, r"model must be a path, got 5"),
    ({"output_dir": ["out"]}, r"output_dir must be a path, got \['out'\]"),
    ({"normal": ["a.csv", "b.csv"]}, r"normal must be a path, got \['a.csv', 'b.csv'\]"),
    ({"mismatch_pool": 3}, r"mismatch_pool must be a path, got 3"),
    ({"template": 5}, r"template must be a text, got 5"),
    ({"attn_implementation": ""}, r"attn_implementation must be the name of a Hugging Face attention implementation"),
    ({"attn_implementation": 2}, r"attn_implementation must be the name .* or null, got 2"),
    ({"forget_format": "pkU"}, r"forget_format must be 'auto' or one of \('pku', 'hh', 'jsonl'\), got 'pkU'"),
    ({"lr": True}, r"lr must be a finite number >= 0, got True"),
    ({"max_forget_nll": True}, r"max_forget_nll must be a finite number, .* got True"),
    ({"forget_weight": True}, r"loss weight forget must be a finite number >= 0, got True"),
    ({"lora_dropout": 1.5}, r"lora_dropout must be a number in \[0, 1\), got 1.5"),
    ({"truthfulqa_test_fraction": True}, r"truthfulqa_test_fraction must be a number in \[0, 1\), got True"),
    ({"optimizer_in_backward": "no"}, r"optimizer_in_backward must be true, false, or null .* got 'no'"),
    ({"resume": 1}, r"resume must be true or false, got 1"),
])
def test_a_setting_of_the_wrong_type_is_refused_by_name(settings, message):
    """A config file can give any value any type: the error must name the setting, not fail later inside the run
    ('int' object is not iterable, an AttributeError traceback) or read `true` as the number 1."""
    with pytest.raises(ValueError, match=message):
        UnlearnConfig(**settings)


@pytest.mark.parametrize("settings, message", [
    ({"seed": SEED_MAX + 1}, rf"seed \(--seed\) must be an integer in \[0, 2\*\*64\), got {SEED_MAX + 1}"),
    ({"lora": True, "lora_alpha": 0}, r"lora_alpha \(--lora-alpha\) must be a finite number > 0 \(it scales the "
                                      r"adapter's update: 0 trains nothing\), got 0"),
    ({"max_length": 0}, r"max_length must be an integer >= 1, got 0"),
    ({"lora": True, "lora_rank": 0}, r"lora_rank must be an integer >= 1, got 0"),
    ({"keep_checkpoints": -1}, r"keep_checkpoints must be an integer >= 0, got -1"),
    ({"lr": float("inf")}, r"lr must be a finite number >= 0, got inf"),
    ({"lr": 10 ** 400}, r"lr must be a finite number >= 0, got 10{400}$"),   # was math.isfinite's OverflowError
    ({"lora": True, "lora_alpha": 10 ** 400}, r"lora_alpha \(--lora-alpha\) must be a finite number > 0"),
    ({"max_forget_nll": 10 ** 400}, r"max_forget_nll must be a finite number"),
    ({"weight_decay": -0.01}, r"weight_decay must be a finite number >= 0, got -0.01"),
    ({"lora": True, "lora_dropout": 1.0}, r"lora_dropout must be a number in \[0, 1\), got 1.0"),
    ({"truthfulqa_pool_fraction": 1}, r"truthfulqa_pool_fraction must be a number in \[0, 1\), got 1"),
    ({"max_forget_nll": float("nan")}, r"max_forget_nll must be a finite number, .* got nan"),
    # (load_truthfulqa refuses these: they must not pass until the model has loaded)
    ({"truthfulqa_pool_fraction": 0}, r"truthfulqa_pool_fraction must be > 0 and truthfulqa_test_fraction \+ "
                                      r"truthfulqa_pool_fraction < 1 .* got 0 and 0.2"),
    ({"truthfulqa_test_fraction": 0.6, "truthfulqa_pool_fraction": 0.4}, r"truthfulqa_pool_fraction must be > 0 .* "
                                                                         r"got 0.4 and 0.6"),
])
def test_a_value_out_of_range_is_refused_by_name(settings, message):
    """A seed torch.manual_seed cannot take failed after the model had loaded with only "Overflow when unpacking
    long long"; lora_alpha 0 scales the adapter's update to 0, a run that trained nothing and saved the input model."""
    with pytest.raises(ValueError, match=message):
        UnlearnConfig(**settings)


def test_the_largest_seed_is_one_torch_takes():
    import torch
    torch.Generator().manual_seed(UnlearnConfig(seed=SEED_MAX).seed)   # torch.manual_seed seeds such a generator


def test_paths_may_be_path_objects_and_are_kept_as_text(tmp_path):
    """config.json is written with json.dumps: a pathlib.Path must become text (it made the run fail after it had
    created its output directory, and a single Path as `forget` was not iterable)."""
    config = UnlearnConfig(model=tmp_path / "m", output_dir=tmp_path / "out", forget=tmp_path / "f.jsonl",
                           normal=tmp_path / "n.csv")
    assert (config.model, config.output_dir, config.forget, config.normal) == (
        str(tmp_path / "m"), str(tmp_path / "out"), [str(tmp_path / "f.jsonl")], str(tmp_path / "n.csv"))


@pytest.mark.parametrize("settings, message", [
    ({"lora_rank": 8, "lora_dropout": 0.1}, r"lora_rank, lora_dropout have no effect without lora=true \(--lora\)"),
    ({"lora_alpha": 8}, r"^lora_alpha has no effect without lora=true \(--lora\)"),
    ({"lora_targets": ["k_proj"]}, r"^lora_targets has no effect without lora=true \(--lora\)"),
    ({"mismatch_per_prompt": 0}, r"mismatch_per_prompt=0 draws no mismatch answers: the mismatch term is off "
                                 r"whatever mismatch_weight \(1.0\) says"),
    ({"reference_cache": "host"}, r"reference_cache='host' has no effect without reference='cached' "
                                  r"\(--reference cached\)"),
    ({"reference_cache": "host", "reference": "adapter", "lora": True}, r"reference_cache='host' has no effect"),
], ids=["lora_rank-lora_dropout", "lora_alpha", "lora_targets", "no-mismatch-rows", "reference_cache-copy",
        "reference_cache-adapter"])
def test_settings_that_have_no_effect_are_warned_of(settings, message):
    """A setting that the rest of the configuration never reads was silently ignored."""
    with pytest.warns(UserWarning, match=message):
        UnlearnConfig(**settings)


def test_a_template_given_with_the_chat_template_is_warned_of():
    """A template given with chat_template is never read (the chat template renders every example), yet the config
    said nothing, where it warns of the other settings the configuration never reads: a user who set both trained
    on a rendering they did not ask for."""
    with pytest.warns(UserWarning, match=r"^template has no effect with chat_template=true \(--chat-template\): the "
                                         r"tokenizer's chat template renders every example"):
        UnlearnConfig(output_dir="out", template="Q: {prompt}\nA: {answer}", chat_template=True)


def test_settings_of_a_term_of_weight_0_are_not_warned_of_by_the_config():
    """The config warned that normal_batch_size (and a cached reference's storage) had no effect with normal_weight=0,
    mismatch_per_prompt and mismatch_pool none with mismatch_weight=0: untrue of streams of one's own (the demo's),
    which are drawn from and referenced whatever the weights. load_streams, which leaves those rows out, says it."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        UnlearnConfig(normal_weight=0, normal_batch_size=4, reference="cached", reference_cache="host")
        UnlearnConfig(mismatch_weight=0, mismatch_per_prompt=3, mismatch_pool="pool.jsonl")
        UnlearnConfig(mismatch_per_prompt=0, mismatch_pool="pool.jsonl", mismatch_weight=0)


def test_settings_that_take_effect_are_not_warned_of():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        UnlearnConfig(lora=True, lora_rank=8)
        UnlearnConfig(mismatch_per_prompt=0, mismatch_weight=0.0)
        UnlearnConfig(reference="cached", reference_cache="host")
        UnlearnConfig(chat_template=True)   # (the default template, which the command line gives unless --template)
        UnlearnConfig(template="Q: {prompt}\nA: {answer}")
        UnlearnConfig(normal_batch_size=4, mismatch_per_prompt=3, mismatch_pool="pool.jsonl")
        UnlearnConfig(normal_weight=0.0, reference="cached")   # (it freezes the lm_head all the same)


def test_reference_cache_names_its_choices():
    with pytest.raises(ValueError, match=r"reference_cache must be one of \('device', 'host'\), got 'cpu'"):
        UnlearnConfig(reference="cached", reference_cache="cpu")


def test_the_automatic_reference_is_the_adapter_off_under_lora_and_a_frozen_copy_otherwise():
    """Under LoRA the base model is the reference with no second copy in memory."""
    assert UnlearnConfig(lora=True).reference_mode == "adapter"
    assert UnlearnConfig().reference_mode == "copy"


def test_defaults_are_the_spec_recipe():
    """SPEC §1's reference recipe: AdamW with lr 2e-6 and torch's default weight decay (the reference passes only
    the lr), batch 2, at most 1000 steps, K = 5 mismatch answers per prompt, weights 0.5 / 1.0 / 1.0, early stop
    once the forget NLL exceeds 100, LoRA r=32 alpha 16 on q_proj and v_proj, and SPEC's text template."""
    config = UnlearnConfig()
    assert config.weight_decay == 0.01
    assert (config.lr, config.batch_size, config.max_steps, config.mismatch_per_prompt, config.max_forget_nll) == \
        (2e-6, 2, 1000, 5, 100.0)
    assert (config.forget_weight, config.mismatch_weight, config.normal_weight) == (0.5, 1.0, 1.0)
    assert (config.lora_rank, config.lora_alpha, config.lora_targets) == (32, 16, ["q_proj", "v_proj"])
    assert config.template == "### Question: {prompt}\n ### Answer: {answer}"


def test_the_bounds_themselves_are_accepted():
    """Each range includes its documented bound: a learning rate of 0 or no weight decay is a setting, not a typo."""
    config = UnlearnConfig(lr=0, weight_decay=0.0, max_length=1, keep_checkpoints=0, save_every=0, seed=0,
                           truthfulqa_test_fraction=0, max_forget_nll=-1.0)
    assert (config.lr, config.weight_decay, config.max_length, config.keep_checkpoints) == (0, 0.0, 1, 0)


def test_missing_settings_are_named_before_a_run(tmp_path):
    with pytest.raises(ValueError, match=r"^missing setting\(s\): forget$"):
        UnlearnConfig(model="m", output_dir=str(tmp_path / "out")).check_paths()
    with pytest.raises(ValueError, match=r"^missing setting\(s\): model, forget, output_dir$"):
        UnlearnConfig().check_paths()


@pytest.mark.parametrize("setting", ["forget", "normal", "mismatch_pool"])
def test_a_data_file_that_is_a_directory_or_missing_is_named_by_its_setting_before_a_run(tmp_path, setting):
    """`--normal <dir>` was refused once the model had loaded, naming the directory but not the option."""
    (tmp_path / "forget.jsonl").write_text('{"prompt": "p", "answer": "a"}\n')
    option = setting.replace("_", "-")
    for path, message in ((tmp_path, "is a directory, not a data file"), (tmp_path / "absent", "data file not found")):
        files = {"forget": [str(tmp_path / "forget.jsonl")], setting: str(path)}
        if setting == "forget":
            files["forget"] = [str(tmp_path / "forget.jsonl"), str(path)]
        with pytest.raises(DataError, match=rf"^{setting} \(--{option}\): .*{message}"):
            UnlearnConfig(model="m", output_dir=str(tmp_path / "out"), **files).check_paths()


@pytest.mark.skipif(not os.path.isfile("/proc/version"), reason="needs Linux's /proc, which nobody can write in")
def test_an_existing_output_dir_that_cannot_be_written_is_refused():
    """/proc stands for an existing read-only directory (a read-only mount: root passes permission bits)."""
    with pytest.raises(ValueError, match=r"^output_dir \(--output-dir\): cannot write in '/proc': "):
        check_output_dir("/proc")


@pytest.mark.parametrize("file", RUN_FILES)
@pytest.mark.parametrize("kind, what", [("pipe", "is not a regular file (a pipe or a device)"),
                                        ("directory", "is a directory")])
def test_an_output_dir_whose_run_file_is_no_regular_file_is_refused(tmp_path, file, kind, what):
    """A log.jsonl that was a pipe hung the run at its first logged step (opened to append, it waits for a reader);
    a directory in the place of a file the run writes failed it after the model had loaded, or at its end (run.json).
    Regular files, or none, pass (a run to resume has them)."""
    if kind == "pipe" and not hasattr(os, "mkfifo"):
        pytest.skip("needs named pipes")
    out = tmp_path / f"out-{os.urandom(3).hex()}"
    out.mkdir()
    check_output_dir(str(out))
    for other in RUN_FILES:
        (out / other).write_text("")
    check_output_dir(str(out))
    (out / file).unlink()
    if kind == "pipe":
        os.mkfifo(out / file)
    else:
        (out / file).mkdir()
    with pytest.raises(ValueError, match=rf"^output_dir \(--output-dir\): {re.escape(repr(str(out / file)))} "
                                         rf"{re.escape(what)}: the run writes its {re.escape(file)} there$"):
        check_output_dir(str(out))


@pytest.mark.parametrize("name", ["lr", "weight_decay", "forget_weight", "mismatch_weight", "normal_weight",
                                  "max_forget_nll", "lora_dropout", "truthfulqa_test_fraction"])
def test_numpy_float_settings_become_plain_floats(name):
    """A NumPy float passed the checks and stayed one: config.json, written by every run once the model had loaded,
    then failed ("Object of type float32 is not JSON serializable")."""
    config = UnlearnConfig(**{name: np.float32(0.25)})
    assert type(getattr(config, name)) is float and json.loads(json.dumps(config.to_dict()))[name] == 0.25
