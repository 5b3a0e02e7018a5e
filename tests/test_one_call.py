"""one_call_at_a_time: a call made while another runs is refused by name before it runs; the lock is given back
however the running call ends."""
import threading

import pytest

from fastalign.one_call import one_call_at_a_time


class Counter:
    def __init__(self):
        self._busy, self.runs = threading.Lock(), 0

    @one_call_at_a_time("its inner", "serialise the calls")
    def run(self, inner=None):
        self.runs += 1
        if inner is not None:
            inner()
        return self.runs


def test_a_call_from_inside_the_running_one_is_refused_by_name_and_later_calls_run():
    counter = Counter()
    with pytest.raises(RuntimeError, match=r"^Counter\.run: another call is running on this Counter \(from another "
                                           r"thread, or from inside its inner\); each Counter runs one call at a "
                                           r"time: serialise the calls$"):
        counter.run(inner=counter.run)
    assert counter.runs == 1               # the refused call did not run
    assert counter.run() == 2              # the refusal ended the outer call, which gave the lock back
    with pytest.raises(ZeroDivisionError):
        counter.run(inner=lambda: 1 / 0)
    assert counter.run() == 4


def test_another_objects_call_is_not_refused():
    first, second = Counter(), Counter()
    assert first.run(inner=second.run) == 1 and second.runs == 1


class SignallingLock:
    """A lock that sets `decided` when a call would wait for it (a blocking acquire of the held lock)."""

    def __init__(self, decided):
        self.inner, self.decided = threading.Lock(), decided

    def acquire(self, blocking=True, timeout=-1):
        if self.inner.acquire(blocking=False):
            return True
        if blocking:
            self.decided.set()
            return self.inner.acquire(timeout=timeout)
        return False

    def release(self):
        self.inner.release()


def test_a_call_from_another_thread_is_refused_at_once_not_run_after_the_running_one():
    """A call that waited for the lock would run once the running call ends, on state that call left, unasked;
    it is refused without waiting, though the running call ends while it would have waited."""
    decided, running, go, outcome = threading.Event(), threading.Event(), threading.Event(), {}
    counter = Counter()
    counter._busy = SignallingLock(decided)

    def hold():
        running.set()
        if not go.wait(timeout=60):   # a guard against a hung test, not a synchronisation
            raise TimeoutError("the test never let the running call go")

    def second_call():
        try:
            outcome["runs"] = counter.run()
        except RuntimeError as err:
            outcome["error"] = err
        finally:
            decided.set()

    first = threading.Thread(target=counter.run, kwargs={"inner": hold}, daemon=True)
    second = threading.Thread(target=second_call, daemon=True)
    try:
        first.start()
        assert running.wait(timeout=60)
        second.start()
        assert decided.wait(timeout=60)   # refused, or waiting for the lock
    finally:
        go.set()
        first.join(timeout=60)
        second.join(timeout=60)
    assert "runs" not in outcome and "another call is running" in str(outcome.get("error"))
    assert counter.runs == 1
