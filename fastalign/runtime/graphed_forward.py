"""CUDA graphs of the paged Llama forward for small calls: one graph per shape bucket, replayed instead of
launching the forward's kernels one at a time.

A 1B model's forward over a few dozen new tokens launches some 35 kernels a layer; on an H200 a TreeRunner call
took ~14 ms, most of it launching (bench_rain, bench_tree at 1800a8f: Hugging Face's own decode, ~12 ms a token,
is bound the same way), while the GPU's work is a fraction of that. A replay launches the whole forward at once.

A call is padded up to its bucket: its tokens to a power of two (and its rows to as many, padding rows owning no
token), its block table's width to a power of two, its selected outputs to a power of two. Padding tokens belong
to no row: their K/V go to a scratch block of the pool that no span holds, no attention is computed for them
(their rows of the output are whatever the buffer held), and their outputs are dropped. Every op of the forward
but attention works token by token, so padding never reaches a real token's result. Calls of more than
`max_tokens` tokens, with a shared-prefix cascade or with K/V written twice (`extra_src`) run eagerly, as without
graphs. A call with logits at only some of the selected tokens (`logits_rows`) pads those to a power of two too
(padding rows point at the first selected token; their logits are dropped).

Only PagedLlama on the Triton attention backend is graphed: its forward reads nothing of a call on the host but
tensor shapes (the kernels' launch grids follow them), so a replay computes exactly what an eager call does. A
model whose forward cannot be captured (a mixture of experts routes tokens with a device sync) is run eagerly
from its first failed capture on, with a warning.
"""
import collections
import functools
import threading
import time
import warnings

import torch

from fastalign.runtime.forward_batch import ForwardBatch

_LEAST_TOKENS = 16    # the smallest token bucket (and row bucket): fewer graphs for decode-sized calls
_LEAST_BLOCKS = 16    # the smallest block-table width


def bucket(n, least):
    """n rounded up to a power of two, at least `least`."""
    return max(least, 1 << max(n - 1, 0).bit_length())


_capture_streams = {}   # device index -> the side stream its graphs are warmed up and captured on
# PyTorch allows one capture at a time in the process: the runners of several threads (on one model or not) take turns
_capture_lock = threading.Lock()


def capture_cuda_graph(forward, memory_pool, device):
    """(replay, outputs): `forward()` run once (its Triton kernels compiled, lazily made state made), then captured
    into a CUDA graph whose replays refill `outputs` in place; both on a side stream of `device`, made current (the
    forward's kernels go to its device's current stream: a graph captured on another device's stream records none).
    One stream per device, so that the graphs sharing `memory_pool` reuse its blocks (torch.cuda.graph's note).
    One warm-up and capture at a time (_capture_lock; they share the stream), in "thread_local" mode: in torch's
    default "global" mode another thread's eager call beside it (a cudaMalloc) failed, and invalidated it."""
    with _capture_lock, torch.cuda.device(device):
        index, caller = torch.cuda.current_device(), torch.cuda.current_stream()
        if index not in _capture_streams:
            _capture_streams[index] = torch.cuda.Stream()
        stream = _capture_streams[index]
        try:
            stream.wait_stream(caller)
            with torch.cuda.stream(stream):
                forward()
            caller.wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=memory_pool, stream=stream, capture_error_mode="thread_local"):
                outputs = forward()
        finally:   # a capture that fails (a sync inside it) raises from torch.cuda.graph's exit before it restores
            torch.cuda.set_stream(caller)   # the stream: the thread's later kernels would all go to the capture's
    return graph.replay, outputs


def capture_for(device):
    """How a forward is captured on `device` (capture(forward, memory_pool) -> (replay, outputs)), or None where
    graphs are not available (off CUDA)."""
    return functools.partial(capture_cuda_graph, device=device) if device.type == "cuda" else None


class _Graph:
    """One bucket's static inputs (a ForwardBatch of fixed tensors and the selected token indices), and once captured
    its replay and outputs."""

    def __init__(self, num_tokens, table_width, num_selected, num_logits, device, scratch_slot):
        ids = dict(dtype=torch.int64, device=device)
        self.batch = ForwardBatch(
            input_ids=torch.zeros(num_tokens, **ids), positions=torch.zeros(num_tokens, **ids),
            slot_mapping=torch.full((num_tokens,), scratch_slot, **ids),
            block_table=torch.zeros(num_tokens, table_width, dtype=torch.int32, device=device),
            seq_lens=torch.zeros(num_tokens, dtype=torch.int32, device=device),
            cu_q_lens=torch.zeros(num_tokens + 1, dtype=torch.int32, device=device),
            host_seq_lens=None, host_cu_q_lens=None, extra_src=None, extra_dst=None,
            host_extra_src=(), copy_src=None, copy_dst=None, outputs=None)
        self.select = None if num_selected is None else torch.zeros(num_selected, **ids)
        self.logits_rows = None if num_logits is None else torch.zeros(num_logits, **ids)
        self.scratch_slot = scratch_slot
        self.replay, self.outputs = None, None

    def load(self, batch, select, logits_rows):
        """The call's inputs into the static tensors; the rest of each is padding (see the module's docstring)."""
        static, tokens, rows = self.batch, batch.num_tokens, batch.block_table.shape[0]
        static.input_ids[:tokens] = batch.input_ids
        static.positions[:tokens] = batch.positions
        static.slot_mapping[:tokens] = batch.slot_mapping
        static.slot_mapping[tokens:] = self.scratch_slot
        static.block_table[:rows, :batch.block_table.shape[1]] = batch.block_table
        static.seq_lens[:rows] = batch.seq_lens
        static.seq_lens[rows:] = 0
        static.cu_q_lens[:rows + 1] = batch.cu_q_lens
        static.cu_q_lens[rows + 1:] = tokens
        if select is not None:
            self.select[:select.shape[0]] = select
            self.select[select.shape[0]:] = 0
        if logits_rows is not None:
            self.logits_rows[:logits_rows.shape[0]] = logits_rows
            self.logits_rows[logits_rows.shape[0]:] = 0


class GraphedForward:
    """A PagedLlama's forward with the calls that fit replayed from CUDA graphs (see the module's docstring); every
    other attribute is the wrapped runner's."""

    def __init__(self, runner, *, scratch_slot, capture, max_tokens=512, max_graphs=64):
        self.runner = runner
        self.scratch_slot = scratch_slot
        self.max_tokens = max_tokens
        self.max_graphs = max_graphs   # the least recently replayed graph goes past them: each holds its outputs
        self._capture = capture        # ([selected, vocab] fp32 logits: 16 MiB at 32 rows of a 128k vocabulary)
        self._memory_pool = torch.cuda.graph_pool_handle() if runner.device.type == "cuda" else None
        self._graphs = collections.OrderedDict()
        self.refused = None      # why graphs stopped being used (a failed capture), or None
        self.replays = 0         # calls run from a graph, for benchmarks and tests
        self.capture_seconds = 0.0   # host time spent capturing (each capture also runs the forward once)

    def __getattr__(self, name):   # only for names not found on the instance or its class
        if name == "runner":       # not yet set (an instance being built or copied)
            raise AttributeError(name)
        return getattr(self.runner, name)

    @property
    def num_graphs(self):
        return len(self._graphs)

    def takes(self, num_tokens, num_rows, num_extra_writes):
        """Whether a call of this many new tokens, rows and extra K/V writes runs from a graph (the runner plans no
        cascade for such a call)."""
        return (self.refused is None and 0 < num_tokens <= self.max_tokens and num_rows <= num_tokens
                and num_extra_writes == 0)

    def forward(self, batch, pool, select, want_logits, want_hidden, logits_rows=None):
        """As PagedLlama.forward."""
        tokens, rows = batch.num_tokens, batch.block_table.shape[0]
        if batch.shared_prefix is not None or not self.takes(tokens, rows, len(batch.host_extra_src)):
            return self.runner.forward(batch, pool, select, want_logits, want_hidden, logits_rows)
        num_selected = None if select is None else bucket(select.shape[0], 1)
        num_logits = None if logits_rows is None else bucket(logits_rows.shape[0], 1)
        key = (bucket(tokens, _LEAST_TOKENS), bucket(batch.block_table.shape[1], _LEAST_BLOCKS), num_selected,
               num_logits, want_logits, want_hidden)
        graph = self._graphs.get(key)
        if graph is None:
            graph = _Graph(key[0], key[1], num_selected, num_logits, batch.input_ids.device, self.scratch_slot)
            graph.load(batch, select, logits_rows)
            start = time.perf_counter()
            try:
                graph.replay, graph.outputs = self._capture(
                    lambda: self.runner.forward(graph.batch, pool, graph.select, want_logits, want_hidden,
                                                graph.logits_rows),
                    self._memory_pool)
            except Exception as err:   # noqa: BLE001 -- any failure to capture: eager from now on
                self.refused = f"{type(err).__name__}: {err}"
                warnings.warn(f"TreeRunner: cuda_graphs: {type(self.runner.model).__name__}'s forward could not be "
                              f"captured into a CUDA graph ({self.refused}); it runs eagerly", stacklevel=4)
                return self.runner.forward(batch, pool, select, want_logits, want_hidden, logits_rows)
            self.capture_seconds += time.perf_counter() - start
            self._graphs[key] = graph
            if len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
            graph.load(batch, select, logits_rows)
        graph.replay()
        self.replays += 1
        count = 0 if select is None else select.shape[0]
        counts = (count if logits_rows is None else logits_rows.shape[0], count)   # (logits, hidden)
        return tuple(None if out is None else out[:n].clone() for out, n in zip(graph.outputs, counts))
