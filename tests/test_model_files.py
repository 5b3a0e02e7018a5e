"""model_files_digest: the same files give the same digest wherever they lie; another model's files, a changed
tokenizer or generation config, or weights that differ where the digest samples them, give another."""
import os
import shutil

import pytest

from fastalign import model_files
from fastalign.model_files import model_files_digest


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)   # 16 KiB
    return folder


def test_the_same_files_anywhere_give_the_same_digest(model_dir, tmp_path):
    digest = model_files_digest(str(model_dir))
    shutil.copytree(model_dir, tmp_path / "copy")
    assert model_files_digest(str(tmp_path / "copy")) == digest
    (model_dir / "README.md").write_text("a model card")     # notes beside the model change nothing
    (model_dir / ".model.lock").write_text("")
    (model_dir / "subfolder").mkdir()
    assert model_files_digest(str(model_dir)) == digest


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "generation_config.json", "tokenizer_config.json",
                                  "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "merges.txt",
                                  "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                                  "pytorch_model.bin", "adapter_config.json"])
def test_a_changed_or_added_file_changes_the_digest(model_dir, name):
    digest = model_files_digest(str(model_dir))
    (model_dir / name).write_text('{"eos_token_id": 2}')
    assert model_files_digest(str(model_dir)) != digest


@pytest.mark.parametrize("offset", [0, 8192 - 100, 16383])
def test_large_files_are_read_at_their_start_middle_and_end(model_dir, monkeypatch, offset):
    """Over WHOLE_LIMIT, a file is read at three places: a byte changed in any of them changes the digest; one
    changed elsewhere does not (the price of not reading every byte of a large model)."""
    monkeypatch.setattr(model_files, "WHOLE_LIMIT", 1024)
    monkeypatch.setattr(model_files, "SAMPLE", 256)
    digest = model_files_digest(str(model_dir))
    weights = bytearray((model_dir / "model.safetensors").read_bytes())
    weights[offset] ^= 1
    (model_dir / "model.safetensors").write_bytes(bytes(weights))
    assert model_files_digest(str(model_dir)) != digest
    weights[offset] ^= 1
    weights[4000] ^= 1                                       # outside the samples
    (model_dir / "model.safetensors").write_bytes(bytes(weights))
    assert model_files_digest(str(model_dir)) == digest


@pytest.mark.parametrize("name", ["rain.jsonl", "rain.jsonl.summary.json", "judged.jsonl", "rain.log", "LICENSE"])
def test_files_beside_the_model_that_are_not_part_of_it_leave_the_digest(model_dir, name):
    """`fastalign rain --output model/rain.jsonl` and the same command again: the first run's records, read into the
    digest, made the second refuse them as "made with another model". Only the model's own files count."""
    digest = model_files_digest(str(model_dir))
    (model_dir / name).write_text('{"index": 0}')
    assert model_files_digest(str(model_dir)) == digest


def test_a_path_that_is_not_a_directory_has_no_digest(tmp_path):
    assert model_files_digest(str(tmp_path / "meta-llama/Llama-3.2-1B")) is None


def test_a_file_of_whole_limit_bytes_is_read_whole(model_dir, monkeypatch):
    """WHOLE_LIMIT is the largest size read whole: a byte changed outside the samples still changes the digest."""
    monkeypatch.setattr(model_files, "WHOLE_LIMIT", 16384)   # model.safetensors' size
    monkeypatch.setattr(model_files, "SAMPLE", 256)
    digest = model_files_digest(str(model_dir))
    weights = bytearray((model_dir / "model.safetensors").read_bytes())
    weights[4000] ^= 1
    (model_dir / "model.safetensors").write_bytes(bytes(weights))
    assert model_files_digest(str(model_dir)) != digest


def test_a_renamed_file_changes_the_digest(model_dir):
    """The names count, not only sizes and contents in order: a tokenizer file renamed is another model's."""
    digest = model_files_digest(str(model_dir))
    (model_dir / "tokenizer.json").rename(model_dir / "tokenizer_config.json")
    assert model_files_digest(str(model_dir)) != digest


def test_files_listed_in_another_order_give_the_same_digest(model_dir, monkeypatch):
    """The files are read in the order of their names, not in the order the directory lists them (which the file
    system decides: the order they were written in on some, a hash of their names on others)."""
    listdir, digests = os.listdir, []
    for reverse in (False, True):
        monkeypatch.setattr(os, "listdir", lambda path: sorted(listdir(path), reverse=reverse))
        digests.append(model_files_digest(str(model_dir)))
    assert digests[0] == digests[1]


def test_weights_cut_short_change_the_digest_where_the_samples_do_not(model_dir, monkeypatch):
    """A file of 65 blocks of one pattern and the same file cut to 63: every sample reads the same bytes, the size
    alone tells them apart (a download cut short)."""
    monkeypatch.setattr(model_files, "WHOLE_LIMIT", 1024)
    monkeypatch.setattr(model_files, "SAMPLE", 256)
    (model_dir / "model.safetensors").write_bytes(bytes(range(256)) * 65)
    digest = model_files_digest(str(model_dir))
    (model_dir / "model.safetensors").write_bytes(bytes(range(256)) * 63)
    assert model_files_digest(str(model_dir)) != digest


def test_a_snapshot_of_links_to_blobs_is_digested_as_its_files(tmp_path):
    """A Hugging Face cache snapshot holds links to blobs: its digest is that of a copy of its files, and two revisions
    (links to other blobs) differ."""
    blobs, digests = tmp_path / "blobs", []
    blobs.mkdir()
    for revision, weights in (("a", b"\0" * 64), ("b", b"\1" * 64)):
        snapshot, copy = tmp_path / "snapshots" / revision, tmp_path / "copy" / revision
        snapshot.mkdir(parents=True)
        copy.mkdir(parents=True)
        for name, content in (("config.json", b"{}"), ("model.safetensors", weights)):
            (blobs / f"{revision}-{name}").write_bytes(content)
            os.symlink(blobs / f"{revision}-{name}", snapshot / name)
            (copy / name).write_bytes(content)
        digests.append(model_files_digest(str(snapshot)))
        assert model_files_digest(str(copy)) == digests[-1]
    assert digests[0] != digests[1]
