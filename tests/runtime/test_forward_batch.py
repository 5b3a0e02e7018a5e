"""ForwardBatch.from_plan: a forward plan's arrays reach the device in one copy, each as a tensor of its own dtype
that starts 16-byte aligned (Triton compiles a kernel per combination of its pointers' alignments)."""
from types import SimpleNamespace

import numpy as np
import torch

from fastalign.runtime.forward_batch import ForwardBatch


def odd_plan():
    """Arrays of odd lengths, so that packing them back to back would misalign every one after the first."""
    rng = np.random.default_rng(0)
    ints = lambda n, dtype: rng.integers(0, 1000, n).astype(dtype)  # noqa: E731
    return SimpleNamespace(token_ids=ints(5, np.int32), positions=ints(5, np.int32), slot_mapping=ints(5, np.int64),
                           extra_src=ints(1, np.int64), extra_dst=ints(1, np.int64), copy_src=ints(3, np.int32),
                           copy_dst=ints(3, np.int32), block_table=ints(3 * 3, np.int32).reshape(3, 3),
                           seq_lens=ints(3, np.int32), cu_q_lens=np.array([0, 1, 4, 5], dtype=np.int32),
                           row_spans=ints(3, np.int64))


def test_every_array_of_the_plan_arrives_with_its_values_and_dtype():
    plan = odd_plan()
    outputs = np.array([0, 1, 3, 2, 4], dtype=np.int64)[::2]   # a strided view, as a caller's selection may be
    batch = ForwardBatch.from_plan(plan, torch.device("cpu"), outputs=outputs)
    expected = {"input_ids": (plan.token_ids, torch.int64), "positions": (plan.positions, torch.int64),
                "slot_mapping": (plan.slot_mapping, torch.int64), "extra_src": (plan.extra_src, torch.int64),
                "extra_dst": (plan.extra_dst, torch.int64), "copy_src": (plan.copy_src, torch.int64),
                "copy_dst": (plan.copy_dst, torch.int64), "outputs": ([0, 3, 4], torch.int64),
                "block_table": (plan.block_table, torch.int32), "seq_lens": (plan.seq_lens, torch.int32),
                "cu_q_lens": (plan.cu_q_lens, torch.int32)}
    for name, (values, dtype) in expected.items():
        tensor = getattr(batch, name)
        assert tensor.dtype == dtype, name
        assert tensor.tolist() == np.asarray(values).tolist(), name
    assert batch.shared_prefix is None
    assert batch.host_row_spans is plan.row_spans   # on the host, for HFStateCacheModel


def test_the_arrays_are_views_of_one_copy_each_starting_16_byte_aligned():
    plan = odd_plan()
    plan.block_table = np.array([[0, 1, 2], [0, 1, 3], [0, 1, 4]], dtype=np.int32)  # rows sharing two blocks
    plan.seq_lens = np.array([9, 12, 10], dtype=np.int32)
    batch = ForwardBatch.from_plan(plan, torch.device("cpu"), cascade_block_size=4)
    assert batch.shared_prefix is not None, "the rows share whole blocks: the cascade plan should group them"
    tensors = [batch.input_ids, batch.positions, batch.slot_mapping, batch.extra_src, batch.extra_dst, batch.copy_src,
               batch.copy_dst, batch.outputs, batch.block_table, batch.seq_lens, batch.cu_q_lens, *batch.shared_prefix]
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
    base = batch.input_ids.untyped_storage().data_ptr()
    assert all((t.data_ptr() - base) % 16 == 0 for t in tensors)
    assert batch.outputs.numel() == 0


def test_the_one_copy_does_not_wait_for_the_device(monkeypatch):
    """A blocking host-to-device copy waits for every kernel queued before it (the previous forward's); the plan's
    copy is asked non-blocking, which is safe from the pageable numpy buffer (CUDA stages it before returning)."""
    copies, to = [], torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        copies.append((args, kwargs.get("non_blocking", False)))
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    ForwardBatch.from_plan(odd_plan(), torch.device("cpu"), cascade_block_size=4)
    assert copies == [((torch.device("cpu"),), True)]
