"""TreeRunner(cuda_graphs=True): calls replayed from graphs give the model's outputs, and their padding reaches
neither a real token nor a span's K/V. Off CUDA a graph is stood in for by `replay_eagerly`, which runs the captured
forward again on the same static tensors: that checks the buckets, the padding and the scratch block; on CUDA
(-m gpu) real CUDA graphs are captured and replayed."""
import contextlib
import threading
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastalign import TreeRunner
from fastalign.runtime import graphed_forward
from fastalign.runtime.graphed_forward import GraphedForward, bucket
from tests.conftest import TRITON_DEVICE, requires_cuda
from tests.runtime.tiny_models import fill_with_nan, grow_random_tree, reference, tiny_model


def replay_eagerly(forward, memory_pool):
    """A stand-in for capture_cuda_graph: the outputs of one run, which each replay recomputes in place."""
    outputs = forward()

    def replay():
        for out, new in zip(outputs, forward()):
            if out is not None:
                out.copy_(new)
    return replay, outputs


@pytest.fixture(params=[pytest.param("cuda", marks=requires_cuda)] if TRITON_DEVICE == "cuda" else ["cpu"])
def graph_device(request, monkeypatch):
    """The device of the test's model: CUDA with real graphs where there is one, else the CPU (the Triton kernels
    interpreted) with graphs replayed eagerly."""
    if request.param != "cuda":
        monkeypatch.setattr(graphed_forward, "capture_for", lambda device: replay_eagerly)
    return request.param


class FakeStream:
    def __init__(self, device):
        self.device = device

    def wait_stream(self, stream):
        pass


class FakeCuda:
    """torch.cuda's devices, streams and graph capture as far as capture_cuda_graph uses them, on the CPU (devices are
    indices): each thread's current device and each device's current stream, torch.cuda.set_stream making the
    stream's device current, and torch.cuda.graph capturing on its `stream` or else on a class-wide stream made on
    the device current at its first use, whose exit leaves its stream current where ending the capture fails."""

    def __init__(self, monkeypatch):
        self.capture_fails = False   # capture_end raising, as for a capture that a sync inside it invalidated
        self.local = threading.local()
        self.default_capture_stream = None
        self.graphs, self.capture_modes = [], []
        for name in ("current_device", "device", "Stream", "current_stream", "set_stream", "stream", "CUDAGraph",
                     "graph"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        monkeypatch.setattr(graphed_forward, "_capture_streams", {})

    def _thread(self):
        if not hasattr(self.local, "device"):
            self.local.device, self.local.streams = 0, {}
        return self.local

    def current_device(self):
        return self._thread().device

    @contextlib.contextmanager
    def device(self, device):
        thread = self._thread()
        previous, thread.device = thread.device, torch.device(device).index
        try:
            yield
        finally:
            thread.device = previous

    def Stream(self):   # noqa: N802 -- torch.cuda's name
        return FakeStream(self.current_device())

    def current_stream(self, device=None):
        index = self.current_device() if device is None else device
        return self._thread().streams.setdefault(index, FakeStream(index))

    def set_stream(self, stream):
        self._thread().device = stream.device
        self._thread().streams[stream.device] = stream

    def stream(self, stream):
        cuda = self

        class StreamContext:   # a class, as torch's: one left unexited restores nothing when collected
            def __enter__(self):
                self.previous, self.previous_there = cuda.current_stream(), cuda.current_stream(stream.device)
                cuda.set_stream(stream)

            def __exit__(self, *exc):
                cuda.set_stream(self.previous_there)
                cuda.set_stream(self.previous)
        return StreamContext()

    def CUDAGraph(self):   # noqa: N802 -- torch.cuda's name
        graph = type("FakeGraph", (), {"replay": lambda self: None, "stream": None})()
        self.graphs.append(graph)
        return graph

    @contextlib.contextmanager
    def graph(self, cuda_graph, pool=None, stream=None, capture_error_mode="global"):
        self.capture_modes.append(capture_error_mode)
        if stream is None:
            if self.default_capture_stream is None:
                self.default_capture_stream = self.Stream()
            stream = self.default_capture_stream
        cuda_graph.stream = stream
        selected = self.stream(stream)
        selected.__enter__()
        try:
            yield
        finally:
            if self.capture_fails:   # torch.cuda.graph's __exit__ calls capture_end before it restores the stream
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
            selected.__exit__(None, None, None)


def test_a_model_on_a_device_that_is_not_current_is_captured_on_a_stream_of_its_device(monkeypatch):
    """A model on cuda:1 while cuda:0 is current (`fastalign rain --device cuda:1 --cuda-graphs`): torch.cuda.graph
    captured on a stream of cuda:0 while the forward's kernels went to cuda:1's current stream, so the graph was
    empty and every replay of its bucket returned the logits of the bucket's first call (torch.cuda.graph's own stream
    is made on the device current at its first capture: a model on cuda:0 captured before cuda:1's)."""
    cuda = FakeCuda(monkeypatch)
    streams, callers = [], (torch.cuda.current_stream(0), torch.cuda.current_stream(1))

    def forward():
        streams.append(torch.cuda.current_stream(1))   # where the kernels of a model on cuda:1 go
        return (torch.zeros(1),)
    graphed_forward.capture_for(torch.device("cuda", 0))(lambda: (torch.zeros(1),), None)   # a model on cuda:0 first
    graphed_forward.capture_for(torch.device("cuda", 1))(forward, None)
    warm_up, captured = streams
    assert captured is cuda.graphs[1].stream and captured.device == 1, "the forward's kernels were not captured"
    assert warm_up is not callers[1], "the warm-up ran on the caller's stream, not a side stream"
    assert torch.cuda.current_device() == 0 and (torch.cuda.current_stream(0), torch.cuda.current_stream(1)) == callers


def test_a_failed_capture_leaves_the_callers_streams_current(monkeypatch):
    """A forward that cannot be captured (a device sync inside it) makes capture_end raise from torch.cuda.graph's
    __exit__ before it restores the stream it set: the thread was left with the capture's stream current, every
    later kernel of the runner and its caller going there beside memory handed out on their own stream."""
    cuda = FakeCuda(monkeypatch)
    cuda.capture_fails = True
    callers = torch.cuda.current_stream(0), torch.cuda.current_stream(1)
    with pytest.raises(RuntimeError, match="when stream is capturing"):
        graphed_forward.capture_for(torch.device("cuda", 1))(lambda: (torch.zeros(1),), None)
    assert torch.cuda.current_device() == 0 and (torch.cuda.current_stream(0), torch.cuda.current_stream(1)) == callers


def test_captures_of_two_threads_take_turns_in_thread_local_mode(monkeypatch):
    """Runners of two threads (on one model, as TreeRunner's docstring allows) with cuda_graphs=True captured at once
    on one stream, where PyTorch allows one capture at a time in the process; and in torch's default "global" mode
    another thread's eager call that allocates beside a capture fails, and invalidates the capture."""
    cuda = FakeCuda(monkeypatch)
    inside, most, count_lock, start = [0], [0], threading.Lock(), threading.Barrier(2)

    def forward():
        with count_lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.05)   # room for the other thread to come in
        with count_lock:
            inside[0] -= 1
        return (torch.zeros(1),)

    def capture():
        start.wait()
        graphed_forward.capture_for(torch.device("cuda", 0))(forward, None)
    threads = [threading.Thread(target=capture) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(cuda.graphs) == 2 and most[0] == 1, "two warm-ups or captures ran at once"
    assert cuda.capture_modes == ["thread_local"] * 2


@requires_cuda
def test_runners_with_graphs_in_two_threads_on_one_model_give_its_logits():
    """The test above on a GPU: two threads' runners on one model, with calls of many buckets, each captured beside
    the other thread's captures and eager calls."""
    model = tiny_model("llama-gqa-untied", device="cuda")
    errors, start = [], threading.Barrier(2)

    def work(seed):
        try:
            runner = TreeRunner(model, max_tokens=2048, block_size=4, attention_backend="triton", cuda_graphs=True)
            root = runner.prefill(list(range(1, 40)))
            start.wait()
            for step in range(30):
                n = 1 + (step * 7 + seed) % 40
                (child,), logits = runner.extend([root], [[(seed + t) % 50 + 1 for t in range(n)]])
                if (logits[0] - reference(model, child)[0][-1]).abs().max() > 1e-4:
                    errors.append(f"thread {seed} step {step}: wrong logits")
                runner.release(child)
            if runner.model_runner.refused is not None:
                errors.append(f"thread {seed}: graphs refused: {runner.model_runner.refused}")
        except Exception as err:   # noqa: BLE001 -- reported below
            errors.append(f"thread {seed}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=work, args=(seed,)) for seed in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


@requires_cuda
def test_a_refused_capture_leaves_the_callers_stream_current():
    """The test above on a GPU: a Llama with dynamic RoPE, whose rotary embedding compares max(position_ids) with its
    cached length on the host, cannot be captured; the runner runs it eagerly, on the caller's stream."""
    config = LlamaConfig(vocab_size=64, max_position_embeddings=64, hidden_size=48, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500.0})
    model = LlamaForCausalLM(config).to("cuda").eval()
    runner = TreeRunner(model, max_tokens=128, block_size=4, attention_backend="triton", cuda_graphs=True)
    stream = torch.cuda.current_stream()
    with pytest.warns(UserWarning, match="could not be captured"):
        root = runner.prefill([1, 2, 3])
    assert runner.model_runner.refused is not None
    assert torch.cuda.current_stream() == stream, "the capture's stream is still the current stream"
    (child,), logits = runner.extend([root], [[4, 5]])
    assert (logits[0] - reference(model, child)[0][-1]).abs().max() <= 1e-4


@requires_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_graphs_of_a_model_on_a_device_that_is_not_current_give_its_logits():
    """The test above on two GPUs: a model on cuda:1 with cuda:0 current; its bucket's replays give its logits and
    write its K/V."""
    torch.cuda.set_device(0)
    model = tiny_model("llama-gqa-untied", device="cuda:1")
    runner = TreeRunner(model, max_tokens=256, block_size=4, attention_backend="triton", cuda_graphs=True)
    root = runner.prefill(list(range(1, 12)))
    for token in (5, 6, 7, 8):   # one bucket: the first call captures it, the others replay it
        (child,), logits = runner.extend([root], [[token]])
        assert (logits[0] - reference(model, child)[0][-1]).abs().max() <= 1e-4, f"token {token}: not its logits"
        runner.release(child)
    (child,), _ = runner.extend([root], [[9, 10]])     # its K/V must be in the pool for the grandchild
    (grandchild,), logits = runner.extend([child], [[11]])
    assert (logits[0] - reference(model, grandchild)[0][-1]).abs().max() <= 1e-4
    assert runner.model_runner.replays >= 4 and runner.model_runner.refused is None


def test_buckets_are_powers_of_two_from_the_least():
    assert [bucket(n, 16) for n in (1, 15, 16, 17, 100, 512)] == [16, 16, 16, 32, 128, 512]
    assert [bucket(n, 1) for n in (1, 2, 3, 5)] == [1, 2, 4, 8]


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gemma2-sliding-softcaps"])
def test_random_tree_from_graphs_matches_hugging_face(graph_device, name):
    """Every call of the random tree (1-4 rows of 1-20 tokens, evictions) fits a graph; the pool, scratch block
    included, starts as NaN, so that a padding token read by a real one, or a real block taken for scratch, shows."""
    model = tiny_model(name, device=graph_device)
    runner = TreeRunner(model, max_tokens=112, block_size=4, attention_backend="triton", cuda_graphs=True)
    assert isinstance(runner.model_runner, GraphedForward) and runner.pool.num_blocks == runner.num_blocks + 1
    fill_with_nan(runner.pool)

    def check(span, logits, hidden):
        ref_logits, ref_hidden = reference(model, span)
        assert (logits - ref_logits).abs().max() <= 1e-4, f"{span}: logits differ from Hugging Face's"
        assert (hidden - ref_hidden).abs().max() <= 1e-4, f"{span}: hidden states differ from Hugging Face's"

    # 8 steps off CUDA (its forwards interpreted, 46 of them took a minute for 20 steps): 22 calls, 6 buckets, evictions
    assert grow_random_tree(runner, seed=3, check=check, steps=20 if graph_device == "cuda" else 8) > 0
    graphs = runner.model_runner
    assert graphs.refused is None and graphs.replays > 3 * graphs.num_graphs, (graphs.replays, graphs.num_graphs)


def eager_and_graphed(device):
    """(model, [(runner, root)] without and with graphs): a tiny Llama, and a root of 29 tokens on each runner."""
    model = tiny_model("llama-gqa-untied", device=device)
    runners = [TreeRunner(model, max_tokens=256, block_size=4, attention_backend="triton", cuda_graphs=graphs)
               for graphs in (False, True)]
    return model, [(runner, runner.prefill(list(range(1, 30)))) for runner in runners]


def test_last_logits_from_graphs_equal_the_eager_runners(graph_device):
    """logits="last" (the selected tokens are the rows' last ones, padded to a power of two) and hidden=None."""
    model, runners = eager_and_graphed(graph_device)
    outputs = []
    for runner, root in runners:
        children, first = runner.extend([root] * 3, [[5, 6], [7], [8, 9, 10]])
        _, second = runner.extend(children, [[11], [12], [13]], logits="last")
        outputs.append((first, second))
    assert runners[1][0].model_runner.replays >= 3
    for eager, graphed in zip(*outputs):
        assert graphed.shape == eager.shape == (3, model.config.vocab_size)
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)


def test_logits_at_some_returned_spans_replay_graphs_and_equal_the_eager_runners(graph_device):
    """logits_of beside hidden states (the LM head at some of the selected tokens: logits_rows, padded to a power of
    two): the call replays a graph, and gives the eager runner's logits at those spans and hidden states at all."""
    model, runners = eager_and_graphed(graph_device)
    outputs = [runner.extend([root] * 3, [[5, 6], [7], [8, 9, 10]], hidden="last", logits_of=[2, 0, 1])[1:]
               for runner, root in runners]
    assert runners[1][0].model_runner.replays == 2
    (eager_logits, eager_hidden), (logits, hidden) = outputs
    assert logits.shape == (3, model.config.vocab_size) and hidden.shape[0] == 3
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden, eager_hidden, rtol=1e-5, atol=1e-5)


def test_calls_of_one_bucket_asking_other_outputs_get_them(graph_device):
    """One bucket's calls asking for logits, hidden states, both or one again: each gets what it asked for (a graph
    captured without hidden states gave a call that wants them none)."""
    model = tiny_model("llama-gqa-untied", device=graph_device)
    runner = TreeRunner(model, max_tokens=256, block_size=4, attention_backend="triton", cuda_graphs=True)
    root = runner.prefill(list(range(1, 12)))
    for logits, hidden in (("last", None), ("last", "last"), (None, "last"), ("last", None)):
        (child,), *outputs = runner.extend([root], [[5]], logits=logits, hidden=hidden)
        ref_logits, ref_hidden = reference(model, child)
        got = dict(zip(("logits", "hidden"), outputs))
        if logits is None:
            assert got["logits"] is None
        else:
            torch.testing.assert_close(got["logits"][0], ref_logits[-1], rtol=1e-4, atol=1e-4)
        if hidden is not None:
            assert got["hidden"] is not None
            torch.testing.assert_close(got["hidden"][0], ref_hidden[-1], rtol=1e-4, atol=1e-4)
        runner.release(child)
    assert runner.model_runner.replays == 5


def test_rows_on_rows_that_copy_a_block_being_filled_run_right_beside_graphs(graph_device):
    """A call whose rows copy a block that an earlier row of it fills writes K/V twice (extra_src), which a graph's
    static batch does not carry: it runs eagerly, and its logits are Hugging Face's."""
    model = tiny_model("llama-gqa-untied", device=graph_device)
    runner = TreeRunner(model, max_tokens=256, block_size=4, attention_backend="triton", cuda_graphs=True)
    root = runner.prefill([1, 2])
    kept, _ = runner.extend([root], [[3]], logits=None)
    children, logits = runner.extend([root, 0, 0], [[5], [6], [7]])
    for span, row_logits in zip(children, logits):
        torch.testing.assert_close(row_logits, reference(model, span)[0][-1], rtol=1e-4, atol=1e-4)
    assert kept[0].alive


def test_past_max_graphs_the_least_recently_replayed_goes_and_results_stay(graph_device):
    """Calls alternating between two buckets with room for one graph: each call captures its bucket again."""
    model = tiny_model("llama-gqa-untied", device=graph_device)
    runner = TreeRunner(model, max_tokens=256, block_size=4, attention_backend="triton", cuda_graphs=True)
    graphs = runner.model_runner
    graphs.max_graphs = 1
    root = runner.prefill(list(range(1, 12)))
    for tokens in ([5], list(range(20, 40)), [6], list(range(40, 60))):   # buckets of 16 and 32 tokens
        (child,), logits = runner.extend([root], [tokens])
        ref_logits, _ = reference(model, child)
        assert (logits[0] - ref_logits[-1]).abs().max() <= 1e-4
        assert graphs.num_graphs == 1
        runner.release([child])
    assert graphs.replays == 5   # the prefill's and each extend's


def test_a_forward_that_cannot_be_captured_runs_eagerly_with_a_warning(monkeypatch):
    def refuse(forward, memory_pool):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(graphed_forward, "capture_for", lambda device: refuse)
    model = tiny_model("llama-gqa-untied", device=TRITON_DEVICE)
    runner = TreeRunner(model, max_tokens=112, block_size=4, attention_backend="triton", cuda_graphs=True)
    with pytest.warns(UserWarning, match=r"cuda_graphs: LlamaForCausalLM's forward could not be captured into a "
                                         r"CUDA graph \(RuntimeError: operation not permitted .*\); it runs eagerly"):
        root = runner.prefill([1, 2, 3])
    (child,), logits = runner.extend([root], [[4, 5]])
    ref_logits, _ = reference(model, child)
    assert (logits[0] - ref_logits[-1]).abs().max() <= 1e-4
    assert runner.model_runner.replays == 0 and "RuntimeError" in runner.model_runner.refused


@pytest.mark.parametrize("name, backend, expected", [
    ("llama-gqa-untied", "torch", r"on PagedLlama with the torch attention"),
    ("gpt2-learned-positions", "triton", r"on PagedHF with the triton attention"),
    ("bloom-alibi-fallback", "auto", r"on HFCacheModel with the Hugging Face attention"),
])
@pytest.mark.filterwarnings("ignore:TreeRunner. BloomForCausalLM cannot run on the paged pool")
def test_graphs_are_refused_where_they_cannot_run(monkeypatch, name, backend, expected):
    monkeypatch.setattr(graphed_forward, "capture_for", lambda device: replay_eagerly)
    with pytest.raises(ValueError, match=r"cuda_graphs: CUDA graphs take a model on the paged Llama path with the "
                                         r"Triton attention backend, on a CUDA device; this one runs " + expected):
        TreeRunner(tiny_model(name), max_tokens=64, block_size=4, attention_backend=backend, cuda_graphs=True)


def test_graphs_are_refused_off_cuda():
    with pytest.raises(ValueError, match=r"cuda_graphs: .* on a CUDA device; this one runs on PagedLlama with the "
                                         r"triton attention on cpu: pass cuda_graphs=False"):
        TreeRunner(tiny_model("llama-gqa-untied"), max_tokens=64, block_size=4, attention_backend="triton",
                   cuda_graphs=True)
    with pytest.raises(ValueError, match=r"cuda_graphs: expected True or False, got 'yes'"):
        TreeRunner(tiny_model("llama-gqa-untied"), max_tokens=64, cuda_graphs="yes")
