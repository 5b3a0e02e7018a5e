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
