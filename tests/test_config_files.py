"""Settings files (fastalign/config_files.py): read as a user writes them (JSON or YAML, a BOM, hyphens), a key or a
setting written twice and a name that is no text refused naming the file."""
import random
import re

import pytest

from fastalign.config_files import read_config_file


def test_a_setting_name_that_yaml_reads_as_a_boolean_is_a_clear_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1.0e-3\non: 3\n")
    with pytest.raises(ValueError, match=r"run.yaml: setting names must be text, got \[True\]"):
        read_config_file(path)


def test_a_setting_given_twice_in_a_config_file_is_refused(tmp_path):
    """`max-steps` and `max_steps` name one setting: silently keeping one of the two values hides a mistake."""
    path = tmp_path / "run.yaml"
    path.write_text("max-steps: 3\nlr: 1.0e-3\nmax_steps: 4\n")
    with pytest.raises(ValueError, match=r"run.yaml: setting max_steps given twice \(as 'max-steps' and 'max_steps'\)"):
        read_config_file(path)


@pytest.mark.parametrize("name, text", [
    ("run.yaml", "lr: 1.0e-3\nmax_steps: 5\nlr: 0.5\n"),                       # an override appended at the end
    ("run.yaml", "chat_template_kwargs: {enable_thinking: false, enable_thinking: true}\n"),
    ("run.json", '{"lr": 0.001, "max_steps": 5, "lr": 0.5}'),
])
def test_a_key_written_twice_in_a_config_file_is_refused(tmp_path, name, text):
    """The YAML and JSON readers kept the last value silently."""
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=rf"{name}: cannot be read: key '(lr|enable_thinking)' given twice"):
        read_config_file(tmp_path / name)


def test_a_key_merged_into_a_yaml_mapping_may_be_written_again(tmp_path):
    """YAML's merge (`<<`) gives defaults that the mapping's own keys override: not a key written twice."""
    (tmp_path / "run.yaml").write_text("defaults: &defaults {lr: 1.0e-3, max_steps: 5}\n"
                                       "run:\n  <<: *defaults\n  lr: 2.0e-3\n")
    assert read_config_file(tmp_path / "run.yaml")["run"] == {"lr": 2e-3, "max_steps": 5}


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_config_files_of_each_suffix_are_read(tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    path.write_text('{"lr": 1.0e-3, "max-steps": 3}')   # JSON is YAML too
    assert read_config_file(path) == {"lr": 1e-3, "max_steps": 3}


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_config_file_with_a_bom_is_read_and_one_not_utf8_is_an_error_naming_it(tmp_path, suffix):
    """A .json saved with a BOM (Notepad) was refused ("Unexpected UTF-8 BOM") while a .yaml with one was read; a
    latin-1 byte was "'utf-8' codec can't decode byte 0xe9 in position 28", naming neither the file nor --config."""
    path = tmp_path / f"run{suffix}"
    steps = random.randrange(1, 100)
    path.write_bytes(b"\xef\xbb\xbf" + f'{{"max-steps": {steps}}}'.encode())
    assert read_config_file(path) == {"max_steps": steps}
    path.write_bytes('{"output_dir": "r\u00e9sultats"}'.encode("latin-1"))
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: cannot be read as .*UTF-8 text"):
        read_config_file(path)
