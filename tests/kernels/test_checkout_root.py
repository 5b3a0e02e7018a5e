"""kernels/__init__.py from a checkout's root: Python run there finds the kernels/ folder first as a top-level
package named `kernels`, the name of Hugging Face's kernels package, which transformers >= 5.25 imports with its
models (`python -m pytest` failed to import any model: "cannot import name 'CUDAProperties' from 'kernels'").
The installed package of that name takes it, and fastalign.kernels stays the folder's."""
import os
import subprocess
import sys
from pathlib import Path

import fastalign

ROOT = Path(fastalign.__file__).resolve().parents[1]


def run_at_the_root(code, path_entries=()):
    """What `code` prints, run by a fresh interpreter whose working directory is the checkout's root, with
    `path_entries` ahead of this process's PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*map(str, path_entries), os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_an_installed_package_named_kernels_is_not_shadowed_by_the_checkout(tmp_path):
    installed = tmp_path / "site" / "kernels"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("WHERE = 'installed'\n")
    (installed / "layers.py").write_text("")
    printed = run_at_the_root("import kernels, kernels.layers, fastalign.kernels.device_guard as guard\n"
                              "print(kernels.WHERE, kernels.layers.__file__, guard.__file__)", [tmp_path / "site"])
    assert printed[0] == "installed"
    assert Path(printed[1]) == installed / "layers.py"
    assert Path(printed[2]).resolve() == ROOT / "kernels" / "device_guard.py"   # through a fastalign/kernels link


def test_without_another_package_named_kernels_the_folder_imports_as_before():
    """No other `kernels` to hand the name to (transformers < 5.25 does not install one): the folder keeps it and
    imports without error, as transformers' availability check may import it."""
    printed = run_at_the_root("import sys\n"
                              "sys.path[:] = [entry for entry in sys.path if 'site-packages' not in entry]\n"
                              "import kernels\nprint(kernels.__file__)")
    assert Path(printed[0]) == ROOT / "kernels" / "__init__.py"
