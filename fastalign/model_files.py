"""A digest of the files of a model directory, recorded with what a run writes, so that resuming the run on another
model found at the same path (a fine-tune copied over its base, a new revision downloaded into the folder) is
refused instead of mixing two models' outputs or weights."""
from __future__ import annotations

import fnmatch
import hashlib
import os

WHOLE_LIMIT = 16 << 20   # files up to this size (configs, tokenizers) are read whole
SAMPLE = 1 << 16         # larger ones (weights): this many bytes at their start, middle and end
# the files that make a model, as transformers saves and reads them: weights (and their shards' index), configs,
# tokenizer and chat template files; what else a directory holds (a license, logs, the records fastalign rain wrote
# there, next to the model they were made with) is no part of the model
MODEL_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.gguf", "*.index.json", "config.json",
               "generation_config.json", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json", "*.model",
               "*.tiktoken", "vocab.*", "merges.txt")


def model_files_digest(path: str) -> str | None:
    """sha256 over the name, size and content of each of the model's files (MODEL_FILES) in the directory `path`,
    None when `path` is not a directory (a model name resolved elsewhere). Files over WHOLE_LIMIT are read at three
    places: a base model and its fine-tune differ there, while reading every weight byte of a large model would
    take minutes. The same files copied elsewhere or again give the same digest."""
    if not os.path.isdir(path):
        return None
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in MODEL_FILES) or not os.path.isfile(file):
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
