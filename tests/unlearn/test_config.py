"""UnlearnConfig and config files: values read as a user writes them, settings refused before any work."""
import pytest

from fastalign.unlearn.config import UnlearnConfig, read_config_file


def test_yaml_exponent_numbers_are_floats(tmp_path):
    """PyYAML (YAML 1.1) reads `2e-6` and `1.0e2` as strings; the SPEC's learning rate must load as written."""
    path = tmp_path / "run.yaml"
    path.write_text("lr: 2e-6\nmax_forget_nll: 1.0e2\nforget_weight: .5E+0\ntemplate: '2e-6'\nseed: 3\n")
    values = read_config_file(path)
    assert values == {"lr": 2e-6, "max_forget_nll": 100.0, "forget_weight": 0.5, "template": "2e-6", "seed": 3}
    config = UnlearnConfig.from_dict({k: v for k, v in values.items() if k != "template"})
    assert (config.lr, config.max_forget_nll, config.forget_weight) == (2e-6, 100.0, 0.5)


def test_unknown_backend_is_refused_with_the_other_settings():
    """Checked here, not at the first loss, which comes after the output directory is written."""
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\), got 'tritn'"):
        UnlearnConfig(backend="tritn")


def test_a_setting_name_that_yaml_reads_as_a_boolean_is_a_clear_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1.0e-3\non: 3\n")
    with pytest.raises(ValueError, match=r"run.yaml: setting names must be text, got \[True\]"):
        read_config_file(path)


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
