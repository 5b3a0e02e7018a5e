"""pyproject.toml's extras: each one is named in README's install paragraph and each package it installs is
imported by the package, a bench or the tests, or used through transformers under the name the code gives it (an
extra that installs nothing used only costs a user a build)."""
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parents[1]
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
USED_THROUGH_TRANSFORMERS = {"flash_attn": "flash_attention_2"}   # --attn-implementation of fastalign unlearn


def sources():
    return "\n".join(path.read_text() for folder in ("fastalign", "bench", "tests", "kernels")
                     for path in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_every_extra_is_documented_and_used(extra):
    readme = (ROOT / "README.md").read_text()
    assert f"`{extra}`" in readme or f"[{extra}]" in readme, f"README does not name the extra {extra!r}"
    code = sources()
    for requirement in EXTRAS[extra]:
        module = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).replace("-", "_").lower()
        imported = re.search(rf"^\s*(import|from) {module}\b", code, re.M)
        named = module in USED_THROUGH_TRANSFORMERS and USED_THROUGH_TRANSFORMERS[module] in code
        assert imported or named, f"{extra}: nothing imports {module}"
