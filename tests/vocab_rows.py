"""How many rows of logits code makes, for the tests of forwards that should compute the lm_head only at the positions
whose logits are read."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


_PRODUCTS = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.matmul)


class VocabRows(TorchDispatchMode):
    """`most`: the most rows of any tensor an aten op makes while it is active whose last dimension is `vocab` (a new
    one: not a view of an input, such as lm_head.weight.t()); `products`: the rows of all such tensors that matrix
    products made (the lm_head's work)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.most, self.products = vocab, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab
                    and t.untyped_storage().data_ptr() not in inputs):
                self.most = max(self.most, t.numel() // self.vocab)
                if func._overloadpacket in _PRODUCTS:
                    self.products += t.numel() // self.vocab
        return out


def rows_of_prefill_last_and_cuts(runner, vocab):
    """(rows, (children, logits), (spans, cut_logits)) of a prefill of 20 ids, then two children of it extended with
    logits="last", without and with cuts: `rows` the most vocab-wide rows each of the three calls made."""
    ids = list(range(3, 23))
    with VocabRows(vocab) as prefill:
        root = runner.prefill(ids)
    with VocabRows(vocab) as last:
        plain = runner.extend([root, root], [ids[:8], ids[8:16]], logits="last")
    with VocabRows(vocab) as at_cuts:
        cut = runner.extend([root, root], [ids[:8], ids[8:16]], cuts=[[3], [5]], logits="last")
    return (prefill.most, last.most, at_cuts.most), plain, cut
