"""A Ctrl-C at a chosen line: a trace function raises KeyboardInterrupt as a line of the traced code is about to run,
as CPython's SIGINT handler may raise it there."""
import contextlib
import linecache
import sys


@contextlib.contextmanager
def interrupted_at(codes, line):
    """Runs the block with KeyboardInterrupt raised as the `line`-th line event (from 1; 0: none) of the code objects
    `codes` is about to run, in this thread. Yields a one-item list counting those events so far (count them with
    line=0, then interrupt at each). A `with` statement's line is not counted: its event comes again as the block
    ends, just before the __exit__ call, where a signal is not raised (CPython checks for one after the call)."""
    seen, codes = [0], set(codes)

    def local(frame, event, arg):
        if event == "line" and not linecache.getline(frame.f_code.co_filename, frame.f_lineno).lstrip().startswith(
                "with "):
            seen[0] += 1
            if seen[0] == line:
                raise KeyboardInterrupt
        return local

    previous = sys.gettrace()
    sys.settrace(lambda frame, event, arg: local if frame.f_code in codes else None)
    try:
        yield seen
    finally:
        sys.settrace(previous)
