"""pyproject.toml's extras: each one is named in README's install paragraph and each package it installs is
imported by the package, a bench or the tests, or used through transformers under the name the code gives it (an
extra that installs nothing used only costs a user a build). The sdist holds what a build and the tests need."""
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import fastalign

tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parents[1]
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
USED_THROUGH_TRANSFORMERS = {"flash_attn": "flash_attention_2"}   # --attn-implementation of fastalign unlearn
PYTEST_PLUGINS = {"pytest_xdist": "python -m pytest -q -n auto tests"}   # README's test command, in workers


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
        imported = re.search(rf"^\s*(import|from) {module}\b|importorskip\(\"{module}\b", code, re.M)
        named = module in USED_THROUGH_TRANSFORMERS and USED_THROUGH_TRANSFORMERS[module] in code
        plugin = module in PYTEST_PLUGINS and PYTEST_PLUGINS[module] in readme
        assert imported or named or plugin, f"{extra}: nothing imports {module}"


def test_nothing_imports_tomllib_but_through_importorskip():
    """requires-python allows 3.10, which has no tomllib (3.11+): a plain import of it failed a test there
    (tests/test_typing.py); the tests take it by pytest.importorskip, which skips them on 3.10."""
    plain = re.findall(r"^\s*(?:import|from) tomllib\b.*", sources(), re.M)
    assert not plain, f"a plain import of tomllib, which Python 3.10 lacks: {plain}"


# The oldest version of a package that has what the code uses: no extra may allow an older one, which fails at run
# time (accelerate 1.0-1.5: the trainer's sharding check died with an AttributeError, FSDP2 did not exist) or
# silently (peft 0.13-0.15: a made-up merge error for DoRA, the LoRA reference's fast toggle off).
FLOORS = {"accelerate": (1, 6),   # FullyShardedDataParallelPlugin.fsdp_version (sharding.check_flat_units), FSDP2
          "peft": (0, 16)}        # LoraLayer.lora_variant (lora_merge), AuxiliaryTrainingWrapper (peft_adapters)


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_no_extra_allows_a_version_older_than_the_code_needs(package):
    need = ".".join(map(str, FLOORS[package]))
    pins = [pin for pins in EXTRAS.values() for pin in pins if re.match(rf"{package}\b", pin)]
    assert pins, f"no extra installs {package}"
    for pin in pins:
        floor = re.search(r">=\s*([0-9.]+)", pin)
        assert floor, f"{pin!r} has no lower bound: the code needs {package}>={need}"
        assert tuple(int(part) for part in floor.group(1).split(".")) >= FLOORS[package], \
            f"{pin!r} allows a {package} older than {need}, which the code needs"


# What the sdist is made of: the build's inputs, the docs and the license, the tests and the benches they test.
SDIST_SOURCES = ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "ARCHITECTURE.md", "LICENSE", "csrc",
                 "kernels", "fastalign", "tests", "bench")
BUILD_SDIST = """
import sys
from setuptools import build_meta
print(build_meta.build_sdist(sys.argv[1]))
"""


def files_under(root):
    """The regular files under `root`, relative to it, symbolic links not followed (fastalign/kernels in a checkout
    set up by hand) and compiled extensions left out (a checkout's own build of fastalign._C)."""
    return {os.path.relpath(os.path.join(folder, name), root) for folder, _, names in os.walk(root) for name in names
            if not os.path.islink(os.path.join(folder, name)) and not name.endswith(".so")}


def test_the_sdist_holds_all_of_csrc_the_license_and_the_tests_whole(tmp_path):
    """`pip install fastalign` builds from the sdist where no wheel fits, and `python -m build` builds the wheel from
    it: setuptools took the extension's .cpp files but not the headers they include (the sdist could not build),
    and of the tests only tests/test*.py, without conftest.py or any helper. No build output goes in."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in SDIST_SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, tree / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.py[cod]"))
        else:
            shutil.copy2(ROOT / name, tree / name)
    sources = files_under(tree)   # before the build writes its egg-info there
    for stale in ("tests/__pycache__/conftest.cpython-312.pyc", "bench/__pycache__/harness.cpython-312.pyc"):
        (tree / stale).parent.mkdir(exist_ok=True)   # what running the tests and benches leaves in a checkout
        (tree / stale).write_bytes(b"")
    done = subprocess.run([sys.executable, "-c", BUILD_SDIST, str(tmp_path / "dist")], cwd=tree, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    with tarfile.open(tmp_path / "dist" / done.stdout.split()[-1]) as sdist:
        held = {member.name.split("/", 1)[1] for member in sdist.getmembers() if member.isfile()}
        pkg_info = sdist.extractfile(next(m for m in sdist.getmembers() if m.name.endswith("/PKG-INFO"))).read()
    assert f"\nVersion: {fastalign.__version__}\n" in pkg_info.decode(), "the sdist's version is not fastalign's"
    made_by_setuptools = {"PKG-INFO", "setup.cfg"} | {name for name in held if name.startswith("fastalign.egg-info/")}
    assert not sources - held, f"not in the sdist: {sorted(sources - held)}"
    assert not held - made_by_setuptools - sources, f"in the sdist: {sorted(held - made_by_setuptools - sources)}"
