"""TokenBatch on the device: the host copy it keeps, from which lengths and answer positions are read without
waiting for the device."""
import torch

from fastalign.unlearn.batching import TokenBatch
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

