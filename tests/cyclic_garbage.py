"""Counting what only Python's cyclic collector frees: objects a block leaves in reference cycles."""
import gc


def cyclic_garbage(run, types) -> int:
    """Runs `run()` with automatic collection off (after a full collection) and returns how many objects of `types`
    (a type or tuple of types) it left as garbage that reference counting cannot free: the cycles a full collection
    then finds. The collector's settings are left as found."""
    enabled, debug = gc.isenabled(), gc.get_debug()
    gc.collect()
    gc.disable()
    try:
        run()
        gc.set_debug(debug | gc.DEBUG_SAVEALL)
        saved = len(gc.garbage)
        gc.collect()
        found = sum(isinstance(o, types) for o in gc.garbage[saved:])
        del gc.garbage[saved:]
        return found
    finally:
        gc.set_debug(debug)
        if enabled:
            gc.enable()
