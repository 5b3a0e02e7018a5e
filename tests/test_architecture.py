"""ARCHITECTURE.md's layout accounts for every source file of the package, its kernels and its C++ extension, each in
the entry of its own folder (or its own entry): a developer reads it to find where a thing lives
(fastalign/writable.py, the write checks of the CLI's --output and of UnlearnConfig.check_paths, was missing; a file
whose name was a word elsewhere on the page, rain/ledger.py beside "RAIN's ledger", could go unnamed)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("fastalign/**/*.py", "kernels/*.py", "csrc/*.cpp", "csrc/*.h")
DESCRIBED_AS_A_WHOLE = ("fastalign/ops/torch_chunked",)   # its files are named by the op they launch, or are helpers
UNNAMED = ("__init__", "__main__")


def layout_entries(text: str) -> dict[str, str]:
    """The layout's entries: each path written at the start of a line of its code block ("fastalign/rain/",
    "fastalign/cli.py"), with the text of that line and of the indented lines under it."""
    block = text.split("## Layout", 1)[1].split("```")[1]
    entries: dict[str, str] = {}
    path = None
    for line in block.splitlines():
        if line[:1] not in ("", " "):
            path = line.split()[0]
            entries[path] = ""
        if path is not None:
            entries[path] += line + "\n"
    return entries


def test_every_source_file_is_named_in_its_folders_entry():
    """Each file's name (without its suffix) is a word of its own entry, or its folder's (the longest one whose path
    holds it), or its folder is described as a whole."""
    entries = layout_entries((ROOT / "ARCHITECTURE.md").read_text())
    files = {path.relative_to(ROOT) for pattern in SOURCES for path in ROOT.glob(pattern)}
    unnamed = []
    for path in sorted(files):
        if (path.stem in UNNAMED or path.parts[:2] == ("fastalign", "kernels")   # (kernels/, linked)
                or str(path.parent).startswith(DESCRIBED_AS_A_WHOLE)):
            continue
        holders = [entry for entry in entries if entry == str(path) or str(path).startswith(entry.rstrip("/") + "/")]
        entry = max(holders, key=len, default=None)
        if entry is None or not re.search(rf"\b{re.escape(path.stem)}\b", entries[entry]):
            unnamed.append(str(path))
    assert unnamed == []


def test_a_file_named_only_outside_its_folders_entry_is_found():
    """The check reads each folder's entry alone: a name left out of it is found though it is a word elsewhere."""
    text = "## Layout\n\n```\nfastalign/rain/     search (the search)\nfastalign/runtime/  span, ledger\n```\n"
    entries = layout_entries(text)
    assert set(entries) == {"fastalign/rain/", "fastalign/runtime/"}
    assert "ledger" not in entries["fastalign/rain/"] and "ledger" in entries["fastalign/runtime/"]
