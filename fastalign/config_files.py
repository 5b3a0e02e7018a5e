"""Settings files (.json, .yaml, .yml) read as a mapping of setting names, and made into a dataclass of settings:
the one reader of `fastalign unlearn --config` and `fastalign rain --config`. A key written twice, a name YAML reads
as no text and an unknown setting are errors naming the file.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re

import yaml

from fastalign.data_files import KeyTwice, object_of_unique_keys, read_text


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading `2e-6` and `1.0e5` as floats (YAML 1.1 reads them as strings, so the
    default learning rate written as a YAML user writes it would be refused as text), and refusing a key written
    twice in a mapping (PyYAML keeps the last value silently; a key merged in by `<<` may be written again, as YAML's
    merge allows)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key_node.value!r} given twice",
                                                            key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _load_yaml(text: str):
    return yaml.load(text, Loader=_YamlLoader)


def dataclass_from_dict(cls, values: dict, origin: str):
    """cls(**values); ValueError naming `origin` and every unknown setting (with the known ones) first."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{origin}: unknown setting(s) {unknown}; known: {sorted(known)}")
    return cls(**values)


def read_config_file(path: str | os.PathLike) -> dict:
    """The settings of a .json, .yaml or .yml file, as a dict (unknown names are refused later)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    text = read_text(path)   # a DataError naming the file where it is not UTF-8; a BOM (Notepad's) dropped
    if path.endswith((".yaml", ".yml")):
        loads, errors = _load_yaml, yaml.YAMLError
    elif path.endswith(".json"):
        loads = functools.partial(json.loads, object_pairs_hook=object_of_unique_keys)
        errors = (json.JSONDecodeError, KeyTwice)
    else:
        raise ValueError(f"config file must end in .json, .yaml or .yml: {path}")
    try:
        values = loads(text)
    except errors as e:
        raise ValueError(f"{path}: cannot be read: {e}") from None
    return settings_mapping(values, path)


def settings_mapping(values, origin: str) -> dict:
    """A mapping read from a config file (`origin` names where) as settings: text names, hyphens read as
    underscores (`max-steps` is `max_steps`, as on the command line); ValueError naming `origin` otherwise."""
    if not isinstance(values, dict):
        raise ValueError(f"{origin}: expected a mapping of setting names to values, got {type(values).__name__}")
    names = [k for k in values if not isinstance(k, str)]
    if names:  # YAML reads an unquoted `on`, `off`, `yes` or a number as a non-text key
        raise ValueError(f"{origin}: setting names must be text, got {names!r} (quote them)")
    settings = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name in settings:
            twice = [k for k in values if k.replace("-", "_") == name]
            raise ValueError(f"{origin}: setting {name} given twice (as {' and '.join(map(repr, twice))})")
        settings[name] = value
    return settings
