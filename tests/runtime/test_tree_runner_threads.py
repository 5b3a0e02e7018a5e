"""A TreeRunner from several threads. One runner runs one call at a time: a call made while another runs (from
another thread, or from inside the runner's own forward) is a RuntimeError that changes nothing, where it computed
from KV not yet written or leaked a span. Runners of their own in each thread may share one model. The interleavings
are forced with events: a forward of a chosen thread is held at the model's input embeddings, before any K/V of it
is written, until the test lets it go. The last tests run attention_routing's blocks, which keep the forwards and the
probes of runners sharing configs apart, on bare configs."""
import threading

import pytest
import torch
from transformers import PretrainedConfig

from fastalign import TreeRunner
from fastalign.eval_mode import eval_mode
from fastalign.runtime import attention_routing
from tests.interrupts import interrupted_at
from tests.runtime.tiny_models import fill_with_nan, reference, tiny_model

BUSY = "another call is running on this TreeRunner"


class Held:
    """Holds the first forward that `thread` runs on `model` (at its input embeddings) until `go` is set."""

    def __init__(self, model):
        self.thread, self.entered, self.go = None, threading.Event(), threading.Event()
        self._handle = model.get_input_embeddings().register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if threading.current_thread() is self.thread and not self.entered.is_set():
            self.entered.set()
            if not self.go.wait(timeout=60):   # a guard against a hung test, not a synchronisation
                raise TimeoutError("the test never let the held forward go")

    def remove(self):
        self.go.set()
        self._handle.remove()


def recorded(call, outcome, ended=None):
    """A thread's target that runs call(): outcome["value"] its result, or outcome["error"] its exception (handed to
    the test); it sets the event `ended`, where given, when it ends."""
    def body():
        try:
            outcome["value"] = call()
        except BaseException as err:    # handed to the test
            outcome["error"] = err
        finally:
            if ended is not None:
                ended.set()
    return body


def start(model, call):
    """Runs call() on a new thread whose first forward is held; returns (held, thread, outcome) once held."""
    held, outcome = Held(model), {}
    held.thread = thread = threading.Thread(target=recorded(call, outcome), daemon=True)
    thread.start()
    assert held.entered.wait(timeout=60)
    return held, thread, outcome


def finish(held, thread, outcome, timeout=60):
    held.go.set()
    thread.join(timeout=timeout)
    held.remove()
    assert not thread.is_alive()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def state(runner):
    tree = runner.tree
    return (tree.span_ids(), tree.refcounts().tolist(), sorted(tree.free_blocks().tolist()),
            [(tree.block_table(i).tolist(), tree.pins(i), tree.locks(i), tree.is_live(i)) for i in tree.span_ids()])


def assert_next_logits(model, span, logits):
    torch.testing.assert_close(logits, reference(model, span)[0][-1], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama-gqa-untied")


@pytest.mark.parametrize("call", ["extend", "prefill", "pin", "unpin", "release", "release_other"])
def test_a_call_while_another_runs_is_refused_and_changes_nothing(model, call):
    """Thread A extends an evicted span P, so that its forward first recomputes P's KV; while A's forward is held
    before writing any of it, the main thread calls the runner. Extending P there computed from P's unwritten KV
    (NaN logits, from the NaN-filled pool); releasing P failed after dropping its handle's finalizer, so that P was
    never freed. Every call is now refused with a RuntimeError and leaves the tree as it was; A's result is right,
    and the same call succeeds once A is done."""
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    p, other = runner.prefill([1, 2, 3, 4, 5, 6]), runner.prefill([9, 8, 7])
    runner.pin(other)
    runner.tree.evict(p.id)
    fill_with_nan(runner.pool)
    calls = {"extend": lambda: runner.extend([p], [[8]]), "prefill": lambda: runner.prefill([4, 5]),
             "pin": lambda: runner.pin(p), "unpin": lambda: runner.unpin(other),
             "release": lambda: runner.release(p), "release_other": lambda: runner.release(other)}
    held, thread, outcome = start(model, lambda: runner.extend([p], [[7]]))
    try:
        during = state(runner)
        with pytest.raises(RuntimeError, match=f"TreeRunner.{call.split('_')[0]}: {BUSY} .*one TreeRunner per "
                                               "thread"):
            calls[call]()
        assert state(runner) == during
    finally:
        (child,), logits = finish(held, thread, outcome)
    assert_next_logits(model, child, logits[0])
    result = calls[call]()          # the runner serves the call now
    if call == "extend":
        assert_next_logits(model, result[0][0], result[1][0])
    runner.release(child)
    if call != "release":
        runner.release(p)
    if call != "release_other":
        runner.release(other)
    p = other = result = None   # the handles dropped: their spans are released
    assert runner.num_free_blocks == runner.num_blocks      # nothing leaked


def test_a_call_from_inside_the_runners_own_forward_is_refused(model):
    """A forward hook that calls the runner mid-forward (its KV half written) is refused alike; the outer call fails
    with that error and is undone."""
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    root = runner.prefill([1, 2, 3])
    before = state(runner)
    inner_call = model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(
        lambda module, args: runner.extend([root], [[4]]))
    try:
        with pytest.raises(RuntimeError, match=f"^TreeRunner.extend: {BUSY} \\(from another thread, or from inside its "
                                               "forward\\); each TreeRunner runs one call at a time: use one "
                                               "TreeRunner per thread \\(they may share one model\\) or serialise "
                                               "the calls$"):
            runner.extend([root], [[5]])
    finally:
        inner_call.remove()
    assert state(runner) == before
    (child,), logits = runner.extend([root], [[5]])
    assert_next_logits(model, child, logits[0])


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gpt2-learned-positions", "bloom-alibi-fallback"])
def test_runners_of_their_own_may_share_one_model_across_threads(name):
    """One runner per thread on one model, in training mode (the runners run it without dropout whatever its
    mode): thread A's forward is held inside, thread B's starts and is held too, A finishes, then B. Each computes
    what it computes alone, and the model keeps its mode. A gave the model its training mode back while B's forward
    ran, so that the fallback's dropout changed B's logits."""
    model = tiny_model(name)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    model.train()
    runners = [TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch") for _ in range(2)]
    a = start(model, lambda: runners[0].extend([None], [[1, 2, 3, 4, 5]]))
    try:
        b = start(model, lambda: runners[1].extend([None], [[6, 7, 8]]))
    finally:
        results = [finish(*a)]
    results.append(finish(*b))
    assert all(module.training for module in model.modules())
    for (child,), logits in results:
        with eval_mode(model):
            assert_next_logits(model, child, logits[0])


def test_runners_sharing_a_pagedhf_model_across_threads_get_their_own_hidden_states():
    """PagedHF takes the hidden states with a hook on the model's decoder, which the runners of one model share:
    thread A's forward, held inside, collected the decoder output of thread B's forward too and returned B's
    hidden states (wrong values, or an IndexError where B's were shorter)."""
    model = tiny_model("gpt2-learned-positions")
    runners = [TreeRunner(model, max_tokens=64, block_size=4) for _ in range(3)]
    assert type(runners[0].model_runner).__name__ == "PagedHF"
    tokens = [[5, 9, 2, 7, 1, 3, 8], [4, 6, 11]]
    alone = [runners[2].extend([None], [ids], hidden="last")[1:] for ids in tokens]
    a = start(model, lambda: runners[0].extend([None], [tokens[0]], hidden="last"))
    try:
        b = runners[1].extend([None], [tokens[1]], hidden="last")
    finally:
        results = [finish(*a)]
    results.append(b)
    for (_, logits, hidden), (own_logits, own_hidden) in zip(results, alone):
        torch.testing.assert_close(logits, own_logits)
        torch.testing.assert_close(hidden, own_hidden)


@pytest.mark.parametrize("where", ["transformer.h.0", "lm_head"])
def test_a_pagedhf_forward_nested_in_another_on_its_model_gets_its_own_hidden_states(where):
    """A hook of the model that runs a second runner of it inside the first one's forward, from within the decoder
    (a layer) or after it (the LM head): each gets the hidden states of its own decoder forward. The outer one took
    the first decoder output its hook saw, the inner one's from within its decoder; the last seen fails after it."""
    model = tiny_model("gpt2-learned-positions")
    outer, inner, alone = [TreeRunner(model, max_tokens=64, block_size=4) for _ in range(3)]
    tokens = [[5, 9, 2, 7, 1, 3, 8], [4, 6, 11]]
    expected = [alone.extend([None], [ids], hidden="last")[1:] for ids in tokens]
    nested = []

    def run_inner(module, args, out):   # once: the inner forward runs the hook too
        if not nested:
            nested.append(None)
            nested[0] = inner.extend([None], [tokens[1]], hidden="last")
    handle = model.get_submodule(where).register_forward_hook(run_inner)
    try:
        first = outer.extend([None], [tokens[0]], hidden="last")
    finally:
        handle.remove()
    for (_, logits, hidden), (own_logits, own_hidden) in zip([first, nested[0]], expected):
        torch.testing.assert_close(logits, own_logits)
        torch.testing.assert_close(hidden, own_hidden)


def signalling_when_waiting(monkeypatch, waiting, waiter):
    """attention_routing's condition, setting the event `waiting` when the thread waiter[0] waits on it: tells the
    test when that thread waits for another's block to end."""
    class Signalling(threading.Condition):
        def wait(self, timeout=None):
            if threading.current_thread() is waiter[0]:
                waiting.set()
            return super().wait(timeout)
    monkeypatch.setattr(attention_routing, "_changed", Signalling())


def test_a_runner_made_while_another_runner_of_the_model_runs_in_another_thread_waits_for_that_forward(monkeypatch):
    """Making a runner probes the model's own forward; while thread A's PagedHF forward ran, the model's attention
    was routed to A's pool and the probes, refused, made every runner refuse the model (rain_generate makes a runner
    per call: two calls in two threads on one GPT-2 failed). The runner made in thread B now waits for A's forward
    and is made as on an idle model."""
    model = tiny_model("gpt2-learned-positions")
    runner = TreeRunner(model, max_tokens=64, block_size=4)
    waiting, maker, made = threading.Event(), [None], {}
    signalling_when_waiting(monkeypatch, waiting, maker)
    make = recorded(lambda: TreeRunner(model, max_tokens=64, block_size=4), made, waiting)
    a = start(model, lambda: runner.extend([None], [[5, 9, 2, 7]]))
    try:
        maker[0] = threading.Thread(target=make, daemon=True)
        maker[0].start()
        assert waiting.wait(timeout=60)
    finally:
        (_, logits) = finish(*a)
    maker[0].join(timeout=60)
    assert "error" not in made, made["error"]
    assert type(made["value"].model_runner).__name__ == "PagedHF"
    torch.testing.assert_close(made["value"].extend([None], [[5, 9, 2, 7]])[1], logits)


def test_a_runner_made_inside_a_forward_of_another_runner_of_the_model_is_refused():
    """Its probes would wait for the forward they run in: a RuntimeError instead, which the forward raises."""
    model = tiny_model("gpt2-learned-positions")
    runner = TreeRunner(model, max_tokens=64, block_size=4)
    tried = []

    def make(module, args):   # once: the probes of the runner made run the hook too
        if not tried:
            tried.append(True)
            TreeRunner(model, max_tokens=64)
    handle = model.transformer.h[0].register_forward_pre_hook(make)
    try:
        with pytest.raises(RuntimeError, match="a TreeRunner of it is being made inside a forward of another of its "
                                               "runners in the same thread"):
            runner.extend([None], [[5, 9, 2, 7]])
    finally:
        handle.remove()


def test_a_forward_started_while_another_thread_makes_a_runner_of_the_model_waits_for_its_probes(monkeypatch):
    """Thread B's runner probes the model's plain forward (unrouted); a forward of a runner in thread A started
    meanwhile must wait until the probes end, else it routes the model's attention to A's pool under B's probe (which
    is then refused, or computed from A's cache). Nothing tested that routed() waits: dropping its wait passed. A
    forward never let go fails the test in 10 s."""
    model = tiny_model("gpt2-learned-positions")
    runner = TreeRunner(model, max_tokens=64, block_size=4)
    expected = TreeRunner(model, max_tokens=64, block_size=4).extend([None], [[5, 9, 2, 7]])[1]
    waiting, forwarder, outcome = threading.Event(), [None], {}
    signalling_when_waiting(monkeypatch, waiting, forwarder)
    forward = recorded(lambda: runner.extend([None], [[5, 9, 2, 7]]), outcome, waiting)
    maker = start(model, lambda: TreeRunner(model, max_tokens=64, block_size=4))   # held in its first probe
    try:
        forwarder[0] = threading.Thread(target=forward, daemon=True)
        forwarder[0].start()
        assert waiting.wait(timeout=10)
        assert not outcome, "the forward ran while another thread's probe of the model was running"
    finally:
        made = finish(*maker, timeout=10)
    forwarder[0].join(timeout=10)
    assert not forwarder[0].is_alive(), "the forward still waits after the probes ended"
    assert "error" not in outcome, outcome["error"]
    assert type(made.model_runner).__name__ == "PagedHF"
    torch.testing.assert_close(outcome["value"][1], expected)


def test_a_forward_nested_in_a_forward_of_its_thread_does_not_wait_for_a_runner_made_meanwhile(monkeypatch):
    """Thread A's forward runs a second runner's forward from a hook; thread B, making a runner meanwhile, waits for
    A's routed forward. A's nested forward must not wait for B in turn (B waits for it: a deadlock, which fails the
    test in 10 s): routed() waits for other threads' probes only where this thread routes none of the configs."""
    model = tiny_model("gpt2-learned-positions")
    outer, inner = TreeRunner(model, max_tokens=64, block_size=4), TreeRunner(model, max_tokens=64, block_size=4)
    waiting, maker, made, nested = threading.Event(), [None], {}, []
    signalling_when_waiting(monkeypatch, waiting, maker)

    def run_inner(module, args, out):   # once: the inner forward runs the hook too
        if not nested:
            nested.append(None)
            nested[0] = inner.extend([None], [[5, 9, 2, 7]])

    make = recorded(lambda: TreeRunner(model, max_tokens=64, block_size=4), made, waiting)
    handle = model.transformer.h[0].register_forward_hook(run_inner)
    try:
        forward = start(model, lambda: outer.extend([None], [[5, 9, 2, 7]]))   # held at its embeddings, routed
        try:
            maker[0] = threading.Thread(target=make, daemon=True)
            maker[0].start()
            assert waiting.wait(timeout=10)
        finally:
            finish(*forward, timeout=10)
    finally:
        handle.remove()
    maker[0].join(timeout=10)
    assert "error" not in made, made["error"]
    assert nested[0] is not None and type(made["value"].model_runner).__name__ == "PagedHF"


def test_a_routed_block_nested_in_one_on_fewer_configs_waits_for_another_threads_unrouted_block_on_the_others(
        monkeypatch):
    """Configs shared across runners (models sharing a sub-config, runners of a model and of its sub-model): thread
    A's routed block on [b] runs one on [a, b] inside while thread B's unrouted block (a runner's probes) runs on [a].
    The inner block skipped its wait as A already routed b, and routed a under B's probes (refused there); it now
    waits for B's block to end. A block left waiting fails the test in 10 s."""
    a, b = PretrainedConfig(attn_implementation="eager"), PretrainedConfig(attn_implementation="eager")
    probing, release = threading.Event(), threading.Event()

    def probe():
        with attention_routing.unrouted([a]):
            probing.set()
            assert release.wait(timeout=10)
            return a._attn_implementation

    def route():
        with attention_routing.routed([b], None), attention_routing.routed([a, b], None):
            return a._attn_implementation
    probed, routed = second_waits_for_first(monkeypatch, probe, probing, release, route)
    assert probed == {"value": "eager"} and routed == {"value": attention_routing.IMPLEMENTATION}
    assert a._attn_implementation == b._attn_implementation == "eager"


def test_a_routed_block_nested_in_one_on_fewer_configs_does_not_wait_for_an_unrouted_block_waiting_for_it(
        monkeypatch):
    """Thread A's routed block on [b] runs one on [a, b] inside; thread B's unrouted block on [a, b], begun in
    between, waits for A's block on b. The inner block must not wait for B's in turn (a deadlock, which fails the
    test in 10 s): B runs nothing before A's blocks end."""
    a, b = PretrainedConfig(attn_implementation="eager"), PretrainedConfig(attn_implementation="eager")
    in_outer, go = threading.Event(), threading.Event()

    def route():
        with attention_routing.routed([b], None):
            in_outer.set()
            assert go.wait(timeout=10)
            with attention_routing.routed([a, b], None):
                return a._attn_implementation

    def probe():
        with attention_routing.unrouted([a, b]):
            return a._attn_implementation, b._attn_implementation
    routed, probed = second_waits_for_first(monkeypatch, route, in_outer, go, probe)
    assert routed == {"value": attention_routing.IMPLEMENTATION} and probed == {"value": ("eager", "eager")}


def second_waits_for_first(monkeypatch, first, holding, release, second):
    """Runs `first` in a thread until it sets the event `holding`, then `second` in another until it waits on
    attention_routing's condition, which it must do before it finishes; then sets `release` and returns both threads'
    outcomes (recorded's) once they end. A thread still waiting after 10 s fails the test."""
    waiting, waiter, first_outcome, second_outcome = threading.Event(), [None], {}, {}
    signalling_when_waiting(monkeypatch, waiting, waiter)
    first_thread = threading.Thread(target=recorded(first, first_outcome), daemon=True)
    first_thread.start()
    assert holding.wait(timeout=10)
    try:
        waiter[0] = threading.Thread(target=recorded(second, second_outcome, waiting), daemon=True)
        waiter[0].start()
        assert waiting.wait(timeout=10)
        assert not second_outcome, "the second thread's block ran while the first one's held its configs"
    finally:
        release.set()
    for thread in (first_thread, waiter[0]):
        thread.join(timeout=10)
        assert not thread.is_alive(), "a block still waits after the other thread's ended"
    return first_outcome, second_outcome


def assert_left_nothing(*configs):
    """Nothing of a routed or unrouted block is left on `configs`: they name their own implementation, no block of
    any thread counts on them, and routed() and unrouted() pass on them at once (a leftover made them wait or raise)."""
    keys = {id(config) for config in configs}
    assert all(config._attn_implementation == "eager" for config in configs)
    assert not keys & (attention_routing._routed.keys() | attention_routing._unrouted.keys()
                       | attention_routing._routing().keys())
    with attention_routing.unrouted(configs), attention_routing.routed(configs, None):
        pass


def test_a_routed_block_failing_midway_through_its_registration_leaves_nothing_behind(monkeypatch):
    """Setting the second config raises (an interrupt there, or a config refusing the name): the first config named
    the routed implementation and both stayed counted, so that every later plain forward of the model was refused and
    runners made of it waited forever. What was registered is undone."""
    a, b = PretrainedConfig(attn_implementation="eager"), PretrainedConfig(attn_implementation="eager")
    set_implementation = attention_routing._set

    def refusing_b(config, implementation):
        if config is b and implementation == attention_routing.IMPLEMENTATION:
            raise RuntimeError("interrupted")
        set_implementation(config, implementation)
    monkeypatch.setattr(attention_routing, "_set", refusing_b)
    with pytest.raises(RuntimeError, match="interrupted"):
        with attention_routing.routed([a, b], None):
            pass
    monkeypatch.undo()
    assert_left_nothing(a, b)


@pytest.mark.parametrize("block", ["routed", "unrouted"])
def test_a_block_interrupted_right_after_its_registration_leaves_nothing_behind(monkeypatch, block):
    """An interrupt as the registration releases attention_routing's lock, before the block's try: its configs stayed
    routed, or claimed, for good. The block undoes its registration."""
    a, b = PretrainedConfig(attn_implementation="eager"), PretrainedConfig(attn_implementation="eager")

    class InterruptedOnce(threading.Condition):
        interrupted = False

        def __exit__(self, *args):
            super().__exit__(*args)
            if not self.interrupted:
                self.interrupted = True
                raise RuntimeError("interrupted")
    monkeypatch.setattr(attention_routing, "_changed", InterruptedOnce())
    with pytest.raises(RuntimeError, match="interrupted"):
        with attention_routing.routed([a, b], None) if block == "routed" else attention_routing.unrouted([a, b]):
            pass
    monkeypatch.undo()
    assert_left_nothing(a, b)


@pytest.mark.parametrize("block", ["routed", "unrouted"])
def test_a_ctrl_c_anywhere_in_a_blocks_registration_leaves_nothing_behind(block):
    """A Ctrl-C (KeyboardInterrupt raised at each line of the registration in turn): one between a config's count and
    its listing for the exit left the config routed for good, and the idle model's plain forward refused with a
    misleading error ("... in another thread"); claimed for good by an unrouted block, it kept every other thread's
    runner waiting. The block undoes exactly what it registered."""
    a, b = PretrainedConfig(attn_implementation="eager"), PretrainedConfig(attn_implementation="eager")
    function = getattr(attention_routing, block).__wrapped__
    enter = (lambda: attention_routing.routed([a, b], None)) if block == "routed" else (
        lambda: attention_routing.unrouted([a, b]))
    with interrupted_at([function.__code__], 0) as seen, enter():
        lines = seen[0]
    assert lines >= 6
    for line in range(1, lines + 1):
        with pytest.raises(KeyboardInterrupt), interrupted_at([function.__code__], line), enter():
            pass
        assert_left_nothing(a, b)
