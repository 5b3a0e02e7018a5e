"""The last fallback, for causal LMs whose state between forwards is neither per-token K and V nor a state that
HFStateCacheModel can keep (RWKV, RecurrentGemma, MiniMax's own cache, linear layers beside sliding-window ones, ...):
every row runs the model's own forward over its whole sequence, with no cache.

The pool holds each span's token ids in place of its K/V (one int32 per token), so that spans, sharing, eviction and
every guarantee of the tree stay as on the other paths; a row's sequence is gathered from its blocks, and rows of one
length run as one batch (no padding; a span's children extended alike are). The outputs are the full-sequence
forward's by construction, and cost what it costs: a row's context is run again at every call
(TreeRunner.last_context_rerun, per row of the last extend, which RAIN counts as recomputed tokens). Bringing back an
evicted span writes its ids again and runs nothing; so does a call that asks for no outputs (a prefill).
"""

import numpy as np
import torch

from fastalign.eval_mode import eval_mode
from fastalign.model_context import runner_context
from fastalign.model_vocabulary import probe_ids
from fastalign.runtime.hf_cache import KeptLogits, agree_within_rounding
from fastalign.runtime.hf_cache_argument import takes_logits_to_keep


class HFRecomputeModel:
    """The forward of any Hugging Face causal LM over a ForwardBatch, on each row's whole sequence."""

    paged = False
    recomputes_context = True   # a row's context runs again in every forward that asks for its outputs
    pool_shapes = [(1, 1)]      # one pool "layer": the token id of each slot (in its K half)
    dtype = torch.int32

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.keeps_logits = takes_logits_to_keep(model)
        if not (hasattr(model, "can_generate") and model.can_generate()):
            raise _unfit(model, "it is not a causal language model (can_generate() is not True)")
        self.max_context = runner_context(model.config)
        try:
            causal = self._is_causal()
        except Exception as err:   # whatever the model's own code raises
            raise _unfit(model, f"its forward without a cache failed ({err!r})") from err
        if not causal:
            raise _unfit(model, "it is not causal (the outputs at a sequence's first tokens changed when tokens were "
                                "appended), so that a span's outputs would depend on what follows it")

    def forward(self, batch, pool, select, want_logits, want_hidden, logits_rows=None):
        """Writes the ids of `batch`'s tokens into `pool`; returns (logits, hidden) of the tokens at indices `select`
        (None: nothing, and no forward), logits in float32 (only at select[logits_rows] when given), hidden = the
        model's last hidden state. Dropout is off whatever the model's mode."""
        ids = pool.k(0).view(-1)    # slot -> token id
        ids[batch.slot_mapping] = batch.input_ids.to(ids.dtype)
        if len(batch.host_extra_src):
            ids[batch.extra_dst] = batch.input_ids[batch.extra_src].to(ids.dtype)
        if select is None:
            return None, None
        cu = batch.host_cu_q_lens.tolist()
        by_length = {}   # rows of one length run as one batch (no padding): children extended alike, say
        for row, seq_len in enumerate(batch.host_seq_lens.tolist()):
            by_length.setdefault(seq_len, []).append(row)
        kept = KeptLogits.of(self.keeps_logits, batch, select, logits_rows, want_logits)
        hidden = [None] * len(cu[:-1])   # per row: its last hidden states at its new tokens, where wanted
        with eval_mode(self.model):   # (TreeRunner runs it under no_grad)
            for seq_len, rows in by_length.items():
                grid = np.full((len(rows), seq_len), -1)   # the batch token at each position: a row's new tokens last
                for i, row in enumerate(rows):
                    grid[i, seq_len - (cu[row + 1] - cu[row]):] = np.arange(cu[row], cu[row + 1])
                out = kept.forward(self.model, grid, use_cache=False, output_hidden_states=want_hidden,
                                   input_ids=self._sequences(ids, batch.block_table[rows], seq_len, pool.block_size))
                if want_hidden:
                    for i, row in enumerate(rows):
                        hidden[row] = out.hidden_states[-1][i, seq_len - (cu[row + 1] - cu[row]):seq_len]
        return kept.result(), torch.cat(hidden)[select] if want_hidden else None

    @staticmethod
    def _sequences(ids, block_rows, seq_len, block_size):
        """The token ids [rows, seq_len] (int64) held by the first seq_len slots of each row of `block_rows`."""
        blocks = block_rows[:, : -(-seq_len // block_size)].long()
        slots = blocks[:, :, None] * block_size + torch.arange(block_size, device=blocks.device)
        return ids[slots.flatten(1)[:, :seq_len]].long()

    def _is_causal(self):
        """Whether a sequence's first tokens get the same logits when more tokens follow them (relative to the
        logits' scale, within rounding of the model's dtype)."""
        ids = torch.tensor([probe_ids(self.model, [1, 0, 2, 1, 3, 0])], device=self.device)
        with torch.inference_mode(), eval_mode(self.model):
            prefix, whole = (self.model(input_ids=x, use_cache=False).logits for x in (ids[:, :3], ids))
        return agree_within_rounding(self.model.dtype, whole, (prefix, whole[:, :3]))


def _unfit(model, reason):
    return ValueError(f"model: {type(model).__name__} cannot run by recomputing whole sequences either: {reason}")
