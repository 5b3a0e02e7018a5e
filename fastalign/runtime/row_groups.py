"""How the Hugging Face cache fallbacks (HFCacheModel, HFStateCacheModel) run a call's rows as few forwards: rows that
run alike form one group wherever they are in the call, level by level (a row on a span that another row of the call
makes runs one level above it), their contexts of different lengths left-padded in one cache."""
import torch
import torch.nn.functional as F

from fastalign.transfers import index_on


def row_chain(tree, span, length):
    """(the ancestor of `span`, a row's new span in the span tree `tree`, that holds its first `length` tokens: where
    the row starts; the spans the row makes, its cuts' and then `span`)."""
    chain = [span]
    ancestor = tree.parent(span)
    while ancestor >= 0 and tree.length(ancestor) > length:
        chain.append(ancestor)
        ancestor = tree.parent(ancestor)
    return ancestor, chain[::-1]


def context_alike(length, pads_context, attends=True):
    """What the rows of one group share of the lengths of their contexts: the length; where the model pads contexts,
    its power of two, so that padding at most doubles a row's; with no attention layer to pad (`attends` False),
    only whether there is a context at all."""
    if not pads_context:
        return length
    return length.bit_length() if attends else length > 0


def left_padded_kv(rows_kv, lengths):
    """Per layer, (keys, values) [rows, heads, max(lengths), dim] of rows_kv[i] (row i's (keys, values) [1, heads,
    lengths[i], dim] per layer), each row right-aligned after zeros: the cache LeftPadded's arguments go with (as
    gathered_context gathers it from the pool; for the probes, which run rows alone first)."""
    longest = max(lengths)
    return [tuple(torch.cat([F.pad(row_kv[layer][part], (0, 0, longest - length, 0))
                             for row_kv, length in zip(rows_kv, lengths)]) for part in (0, 1))
            for layer in range(len(rows_kv[0]))]


class LeftPadded:
    """The forward arguments of rows whose contexts, of several lengths, sit in one cache right-aligned after
    padding (gathered_context): a 2D attention mask that hides each row's padding from the attention layers, and
    each row's own positions (unless `positions` is False: a forward that takes none, as Bloom's and MPT's, whose
    ALiBi biases follow the mask); the cache counts the longest context. `of` gives the arguments of nothing where
    no padding is needed (contexts of one length, or no attention layer to hide it from)."""

    def __init__(self, lengths, device, positions=True):
        longest = max(lengths)
        self.padding = index_on([longest - n for n in lengths], device)
        self.seen = longest   # the cache's tokens, padding included
        self.positions = positions

    @classmethod
    def of(cls, lengths, device, attends=True, positions=True):
        if attends and min(lengths) != max(lengths):
            return cls(lengths, device, positions)
        return NO_PADDING

    def arguments(self, count):
        """Those of a forward of `count` more tokens per row (the mask grows with the cache)."""
        total = self.seen + count
        columns = torch.arange(total, device=self.padding.device)
        mask = (columns[None, :] >= self.padding[:, None]).long()
        positions = columns[None, self.seen:] - self.padding[:, None]
        self.seen = total
        return {"attention_mask": mask, "position_ids": positions} if self.positions else {"attention_mask": mask}


class _NoPadding:
    """Contexts of one length: no argument to add, the model's own positions and mask."""

    def arguments(self, count):
        return {}


NO_PADDING = _NoPadding()
