"""A second process holding an output's lock (fastalign.output_lock) as a running fastalign command does, until
the test ends it normally or kills it with SIGKILL."""
import contextlib
import multiprocessing
import os
import signal

import pytest

from fastalign.output_lock import fcntl, output_lock

needs_fcntl = pytest.mark.skipif(fcntl is None, reason="no fcntl: outputs are not locked")


def _hold(output: str, directory: bool, holding, leave):
    with output_lock(output, "--output", directory=directory):
        holding.set()
        leave.wait()


class Holder:
    def __init__(self, output, directory: bool):
        context = multiprocessing.get_context("fork")   # the child only locks and waits: nothing to import again
        self.holding, self.leave = context.Event(), context.Event()
        self.process = context.Process(target=_hold, args=(str(output), directory, self.holding, self.leave))
        self.process.start()
        assert self.holding.wait(60), "the holder did not take the lock"

    @property
    def pid(self) -> int:
        return self.process.pid

    def end(self):
        """Ends the holder's block, as a command that finished."""
        self.leave.set()
        self.process.join(60)
        assert self.process.exitcode == 0

    def kill(self):
        """kill -9: the process ends without leaving the block."""
        os.kill(self.pid, signal.SIGKILL)
        self.process.join(60)
        assert self.process.exitcode == -signal.SIGKILL


@contextlib.contextmanager
def holding(output, directory: bool = False):
    """A Holder of `output`'s lock for the block; killed at its end if still alive."""
    holder = Holder(output, directory)
    try:
        yield holder
    finally:
        if holder.process.is_alive():
            holder.kill()
