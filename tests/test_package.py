"""The packages' public names, imported on first use (fastalign/lazy_exports.py): each one resolves, dir() lists
them, an unknown name is an AttributeError naming it, and importing fastalign or taking the fused ops from it
loads none of the libraries the engines need."""
import builtins
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import fastalign

ROOT = Path(fastalign.__file__).resolve().parents[1]
LAZY_PACKAGES = ["fastalign", "fastalign.unlearn", "fastalign.rain", "fastalign.evaluation", "fastalign.demo"]
# What the engines import (the trainer, Hugging Face models, the Triton kernels, torch.compile): seconds each
HEAVY = ("transformers", "accelerate", "peft", "triton", "torch._dynamo")


def loaded_after(code, modules=HEAVY):
    """Those of `modules` that `code` leaves imported, run in a fresh interpreter on the checkout, with neither
    TRITON_INTERPRET (which tests/conftest.py sets) nor anything else of this process's imports."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    report = f"import sys\nprint(' '.join(m for m in {tuple(modules)!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", f"{code}\n{report}"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_importing_fastalign_and_its_fused_ops_loads_no_engine_library():
    """`import fastalign` imported every engine (6 s on a CPU against torch's 2 s), and applying
    torch.compiler.disable at import imported torch._dynamo: a script that only takes the fused losses paid it all.
    `import fastalign` and its version load not even torch, and dir() lists the names before any is imported; a
    subpackage is imported on first access."""
    dir_lists_all = "".join(f"import {name}\nassert set({name}.__all__) <= set(dir({name})), {name!r}\n"
                            for name in LAZY_PACKAGES)
    assert loaded_after(dir_lists_all + "assert fastalign.__version__", ("torch",) + HEAVY) == []
    assert loaded_after("from fastalign import linear_cross_entropy, linear_kl_div") == []
    assert loaded_after("import fastalign\nfastalign.unlearn.config.UnlearnConfig") == []


@pytest.mark.parametrize("name", LAZY_PACKAGES)
def test_every_public_name_resolves_also_by_a_star_import(name):
    package = importlib.import_module(name)
    assert package.__all__ and len(set(package.__all__)) == len(package.__all__)
    for public in package.__all__:
        assert getattr(package, public) is not None, public
    star = {}
    exec(f"from {name} import *", star)
    assert set(package.__all__) <= set(star)


def test_the_errors_run_unlearning_documents_are_public():
    """run_unlearning says it raises MissingExtraError, which fastalign.unlearn did not export (its only module,
    extras, is internal): every error its docstring names is a builtin or one of the package's public names."""
    import fastalign.unlearn as unlearn
    from fastalign.unlearn.extras import MissingExtraError

    named = set(re.findall(r"\b[A-Z]\w*Error\b", unlearn.run_unlearning.__doc__))
    assert "MissingExtraError" in named
    assert all(hasattr(builtins, name) or name in unlearn.__all__ for name in named), named
    assert unlearn.MissingExtraError is MissingExtraError


def test_a_renamed_name_is_the_object_of_its_module():
    from fastalign.demo.model import load_model, load_world
    from fastalign.ops.linear_cross_entropy import linear_cross_entropy

    assert fastalign.load_demo_model is load_model and fastalign.load_demo_world is load_world
    assert fastalign.linear_cross_entropy is linear_cross_entropy


def test_dir_lists_the_subpackages_without_importing_them():
    """Tab completion offered no `fastalign.unlearn` after `import fastalign` (README's usage), although the name
    resolves: dir() listed only the exported names."""
    subpackages = ("unlearn", "evaluation", "rain", "runtime", "ops", "optim", "demo", "reference")
    listed = f"import fastalign\nmissing = set({subpackages!r}) - set(dir(fastalign))\nassert not missing, missing"
    assert loaded_after(listed, tuple(f"fastalign.{name}" for name in subpackages)) == []


@pytest.mark.parametrize("name", LAZY_PACKAGES)
def test_an_unknown_name_is_an_attribute_error_naming_it(name):
    package = importlib.import_module(name)
    with pytest.raises(AttributeError, match=rf"module '{name}' has no attribute 'no_such_name'"):
        package.no_such_name
    assert not hasattr(package, "no_such_name")
    with pytest.raises(ImportError, match="no_such_name"):
        exec(f"from {name} import no_such_name", {})


@pytest.mark.parametrize("name", LAZY_PACKAGES)
def test_no_public_name_is_also_a_submodule(name):
    """Importing a submodule sets it as the package's attribute of its name: a public name of the same name would
    then be that module, not what the package exports (an eager package's import came after, and hid the module)."""
    package = importlib.import_module(name)
    submodules = {info.name for info in pkgutil.iter_modules(package.__path__)}
    assert submodules and not submodules & set(package.__all__)


@pytest.mark.parametrize("all_line, listed, zipped", [
    ('__all__ = ["join", "sep"]', None, False),
    ('__all__ = ["join", "sep"]', None, True),
    ('__all__ = ["join"]', r"imported, not listed: \['sep'\], listed, not imported: \[\]", False),
    ('__all__ = ["join", "sep", "getcwd"]', r"listed, not imported: \['getcwd'\]", False),
    ('__all__ = ["join", "sep", "sep"]', r"listed twice: \['sep'\]", False),
])
def test_a_packages_all_lists_its_type_checking_imports(tmp_path, monkeypatch, all_line, listed, zipped):
    """lazy_exports exports what a package imports under TYPE_CHECKING (renamed or not), which static tools read, also
    from a zip archive on sys.path; an __all__ that lists other names than those is refused when the package is
    imported, naming the difference."""
    source = ("from typing import TYPE_CHECKING\nfrom fastalign.lazy_exports import lazy_exports\n"
              "if TYPE_CHECKING:\n    from os.path import join\n    from os import sep as sep\n"
              f"{all_line}\n__getattr__, __dir__ = lazy_exports(globals())\n")
    if zipped:
        with zipfile.ZipFile(tmp_path / "lazy.zip", "w") as archive:
            archive.writestr("lazy_demo/__init__.py", source)
        monkeypatch.syspath_prepend(str(tmp_path / "lazy.zip"))
    else:
        (tmp_path / "lazy_demo").mkdir()
        (tmp_path / "lazy_demo" / "__init__.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lazy_demo", raising=False)
    if listed is None:
        lazy_demo = importlib.import_module("lazy_demo")
        assert lazy_demo.join is os.path.join and lazy_demo.sep == os.sep and "join" in dir(lazy_demo)
    else:
        with pytest.raises(ImportError, match=listed):
            importlib.import_module("lazy_demo")


@pytest.mark.parametrize("statement", ["import os", "from . import sibling"])
def test_type_checking_imports_are_absolute_from_imports(tmp_path, statement):
    from fastalign.lazy_exports import type_checking_imports

    source = f"if TYPE_CHECKING:\n    from os import sep\n    {statement}\n"
    with pytest.raises(ImportError, match=r"package_init.py:3: lazy_exports reads absolute `from MODULE import NAME`"):
        type_checking_imports(source, "package_init.py")
