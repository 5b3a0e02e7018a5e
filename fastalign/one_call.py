"""One call at a time on an object whose calls share state that a second call would corrupt (a TreeRunner's KV,
an UnlearningTrainer's model and optimizer): the decorated method holds the object's `_busy` lock (a
threading.Lock the object makes when constructed), taken without waiting, and a call made while another runs, from
another thread or from inside the running one (a callback, a hook), is refused with a RuntimeError naming the
object, before it changes anything. Waiting instead would deadlock a call from inside, and hide the misuse."""
import functools
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def one_call_at_a_time(inside: str, advice: str) -> Callable[[F], F]:
    """Decorator of a method of a class with a `_busy` lock. `inside` names where a call from inside the running
    one comes from, `advice` what to do instead; both go into the error."""
    def decorate(method):
        @functools.wraps(method)
        def guarded(self, *args, **kwargs):
            if not self._busy.acquire(blocking=False):
                owner = type(self).__name__
                raise RuntimeError(f"{owner}.{method.__name__}: another call is running on this {owner} (from "
                                   f"another thread, or from inside {inside}); each {owner} runs one call at a "
                                   f"time: {advice}")
            try:
                return method(self, *args, **kwargs)
            finally:
                self._busy.release()
        return guarded
    return decorate
