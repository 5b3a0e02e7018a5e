"""Tree KV runtime: a paged KV pool owned by a tree of token spans (see tree_runner.py)."""
from fastalign._C import PoolExhaustedError
from fastalign.runtime.span import Span
from fastalign.runtime.tree_runner import TreeRunner

__all__ = ["PoolExhaustedError", "Span", "TreeRunner"]
