"""A deterministic stand-in model whose next-token logits and hidden state are a hash of the token prefix,
served both as a Hugging Face-style causal LM (for the slow engine) and as a TreeRunner-style span store
(for the tree engine). Both give bit-identical outputs, so the two engines must make identical decisions;
the span store also counts live spans, to check that a search leaves nothing behind."""
import itertools
from types import SimpleNamespace

import numpy as np
import torch

HIDDEN = 8


def prefix_outputs(tokens, vocab_size: int):
    seed = hash(tuple(tokens)) & ((1 << 62) - 1)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab_size, generator=g) * 3.0, torch.randn(HIDDEN, generator=g)


class HashLM(torch.nn.Module):
    """forward(input_ids [1, T], past_key_values) -> logits/hidden of the last position; the 'cache' is the
    list of tokens seen so far."""

    def __init__(self, vocab_size: int, max_positions: int = 4096):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(vocab_size=vocab_size, max_position_embeddings=max_positions)

    def forward(self, input_ids, past_key_values=None, use_cache=True, output_hidden_states=False):
        tokens = list(past_key_values or []) + input_ids[0].tolist()
        logits, hidden = prefix_outputs(tokens, self.config.vocab_size)
        return SimpleNamespace(logits=logits.view(1, 1, -1), past_key_values=tokens,
                               hidden_states=(hidden.view(1, 1, -1),) if output_hidden_states else None)


class FakeSpan:
    ids = itertools.count()

    def __init__(self, tokens, parent):
        self.tokens, self.parent, self.alive, self.id = tokens, parent, True, next(FakeSpan.ids)

    @property
    def length(self):
        return len(self.tokens)


class HashRunner:
    """The TreeRunner calls the tree engine uses, over HashLM's function."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.live = set()
        self.pins = {}
        self.calls = 0
        self.last_restored = {}   # nothing is ever evicted
        self.last_context_rerun = np.zeros(0, dtype=np.int64)   # contexts are read, not run again

    def extend(self, parents, token_lists, *, cuts=None, logits="last", hidden=None, logits_of=None):
        """With cuts, row i returns a chain of spans (one per cut, then its child) and the outputs are at
        every returned span's last token (the logits at those `logits_of` names; none with logits None); an int
        parent j is row j's child; as TreeRunner.extend does."""
        self.calls += 1
        children, out_logits, out_hidden = [], [], []
        for i, (parent, tokens) in enumerate(zip(parents, token_lists)):
            assert len(tokens) > 0, "empty row"
            if isinstance(parent, int):
                assert 0 <= parent < i, "a parent row must be an earlier row"
                parent = children[parent][-1] if cuts is not None else children[parent]
            if parent is not None:
                assert parent.alive, "extending a released span"
            offsets = [] if cuts is None else list(cuts[i])
            assert offsets == sorted(set(offsets)) and all(0 < c < len(tokens) for c in offsets), "bad cuts"
            base, chain = (parent.tokens if parent is not None else []), []
            for end in offsets + [len(tokens)]:
                span = FakeSpan(base + list(tokens[:end]), chain[-1] if chain else parent)
                self.live.add(span)
                chain.append(span)
                lg, hd = prefix_outputs(span.tokens, self.vocab_size)
                out_logits.append(lg)
                out_hidden.append(hd)
            children.append(chain if cuts is not None else chain[0])
        out_logits = torch.stack(out_logits)
        result = (children, None if logits is None else out_logits if logits_of is None else out_logits[logits_of])
        if hidden is not None:
            result += (torch.stack(out_hidden),)
        return result

    def head_at_columns(self, columns):
        """None: HashLM's logits come whole (TreeRunner.head_at_columns)."""
        return None

    def release(self, spans):
        spans = [spans] if isinstance(spans, FakeSpan) else list(spans)
        for span in spans:
            assert span.alive, "span released twice"
            span.alive = False
            self.live.discard(span)
            self.pins.pop(span, None)

    def pin(self, span):
        self.pins[span] = self.pins.get(span, 0) + 1

    def unpin(self, span):
        self.pins[span] -= 1
