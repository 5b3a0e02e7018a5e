"""TokenBatch on the device: the host copy it keeps, from which lengths and answer positions are read without
waiting for the device."""
import pytest
import torch

from fastalign.unlearn.batching import TokenBatch, collate
from fastalign.unlearn.encoding import EncodedExample
from tests.sync_counter import SyncCounter


def a_batch():
    lengths, answers = [6, 4, 5], [(2, 6), (1, 3), (4, 5)]   # answer tokens [start, end) of each row
    input_ids = torch.arange(18).view(3, 6)
    attention_mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    target_mask = torch.zeros(3, 5, dtype=torch.bool)
    for row, (start, end) in enumerate(answers):
        target_mask[row, start - 1:end - 1] = True
    return TokenBatch(input_ids, attention_mask, target_mask)


def test_a_batch_moved_to_the_device_reads_its_lengths_and_answers_on_the_host():
    with SyncCounter() as counter:
        host = a_batch()
        batch = host.to(torch.device("cpu"))
        rows = batch.rows(1, 3)
        positions = [tuple(t.tolist() for t in b.answer_positions(width)) for b, width in ((batch, 5), (rows, 4))]
        values = (batch.num_tokens, batch.width, rows.num_tokens, rows.width, *positions)
    assert counter.total == 0, counter.syncs
    assert batch.host is host and rows.host.target_mask.data_ptr() == host.target_mask[1:].data_ptr()
    assert values == (15, 6, 9, 5, ([0, 0, 0, 1, 1, 2], [1, 2, 3, 0, 1, 3]), ([0, 0], [0, 1]))
    # each equals what the device tensors give (read there, which waits for the device)
    with counter:
        assert (batch.num_tokens, batch.width) == (int(host.attention_mask.sum()), 6)
        assert TokenBatch(batch.input_ids, batch.attention_mask, batch.target_mask).num_tokens == 15
    assert counter.total == 1
    assert batch.to(torch.device("cpu")).host is host   # moved again: the same host copy



def test_collate_gives_the_documented_dtypes():
    """input_ids and attention_mask are int64 and target_mask bool, as TokenBatch promises (and as the embedding
    lookup and the masks' arithmetic downstream take them), whatever the example ids were."""
    batch = collate([EncodedExample((1, 2, 3), 1, 3, "a"), EncodedExample((4, 5), 1, 2, "b")], filler_id=0)
    assert (batch.input_ids.dtype, batch.attention_mask.dtype, batch.target_mask.dtype) == (
        torch.int64, torch.int64, torch.bool)


def test_collate_of_no_examples_is_an_error_naming_collate():
    with pytest.raises(ValueError, match="^collate: no examples$"):
        collate([], filler_id=0)


@pytest.mark.parametrize("change, message", [
    (lambda ids, mask, targets: (ids[0], mask[0], targets[0]), r"input_ids must be \[B, T\], got shape \(6,\)"),
    (lambda ids, mask, targets: (ids, mask[:, :5], targets), r"attention_mask must have input_ids' shape \(3, 6\)"),
    (lambda ids, mask, targets: (ids, mask, torch.zeros(3, 6, dtype=torch.bool)),
     r"target_mask must be bool \[B, T-1\] = \(3, 5\) .* got torch.bool \(3, 6\)"),
    (lambda ids, mask, targets: (ids, mask, targets.long()), r"target_mask must be bool .* got torch.int64")])
def test_a_batch_of_other_shapes_is_refused_by_the_name_of_the_tensor(change, message):
    """A target_mask as wide as input_ids (Hugging Face labels' convention) was read shifted by one token: other loss
    values without a word."""
    batch = a_batch()
    with pytest.raises(ValueError, match=message):
        TokenBatch(*change(batch.input_ids, batch.attention_mask, batch.target_mask))
