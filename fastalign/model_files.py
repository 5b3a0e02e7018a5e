"""A digest of the files of a model directory, recorded with what a run writes, so that resuming the run on another
model found at the same path (a fine-tune copied over its base, a new revision downloaded into the folder) is
refused instead of mixing two models' outputs or weights."""
from __future__ import annotations

import hashlib
import os

WHOLE_LIMIT = 16 << 20   # files up to this size (configs, tokenizers) are read whole
SAMPLE = 1 << 16         # larger ones (weights): this many bytes at their start, middle and end


def model_files_digest(path: str) -> str | None:
    """sha256 over the name, size and content of each file in the directory `path` (hidden files and *.md left out),
    None when `path` is not a directory (a model name resolved elsewhere). Files over WHOLE_LIMIT are read at three
    places: a base model and its fine-tune differ there, while reading every weight byte of a large model would
    take minutes. The same files copied elsewhere or again give the same digest."""
    if not os.path.isdir(path):
        return None
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if name.startswith(".") or name.endswith(".md") or not os.path.isfile(file):
            continue
        size = os.path.getsize(file)
        digest.update(f"{name}\0{size}\0".encode())
        with open(file, "rb") as f:
            if size <= WHOLE_LIMIT:
                digest.update(f.read())
                continue
            for offset in (0, (size - SAMPLE) // 2, size - SAMPLE):
                f.seek(offset)
                digest.update(f.read(SAMPLE))
    return digest.hexdigest()[:16]
