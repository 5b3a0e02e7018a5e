"""ARCHITECTURE.md's layout accounts for every source file of the package, its kernels and its C++ extension: a
developer reads it to find where a thing lives (fastalign/writable.py, the write checks of the CLI's --output and of
UnlearnConfig.check_paths, was missing)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("fastalign/**/*.py", "kernels/*.py", "csrc/*.cpp", "csrc/*.h")
DESCRIBED_AS_A_WHOLE = ("fastalign/ops/torch_chunked",)   # its files are named by the op they launch, or are helpers
UNNAMED = ("__init__", "__main__")


def test_every_source_file_is_named_in_the_layout():
    """Each file's name (without its suffix) is a word of ARCHITECTURE.md, or its folder is described as a whole."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    files = {path.relative_to(ROOT) for pattern in SOURCES for path in ROOT.glob(pattern)}
    unnamed = sorted(str(path) for path in files
                     if path.stem not in UNNAMED and path.parts[:2] != ("fastalign", "kernels")   # (kernels/, linked)
                     and not str(path.parent).startswith(DESCRIBED_AS_A_WHOLE)
                     and not re.search(rf"\b{re.escape(path.stem)}\b", text))
    assert unnamed == []
