"""The demo: a synthetic question-answer world, the tiny Llama model trained on it (shipped), and the
before/after story of `fastalign demo` (unlearning, and RAIN on the unchanged model). Each public name is imported
from its module on first use (lazy_exports)."""
from typing import TYPE_CHECKING

from fastalign.lazy_exports import lazy_exports

if TYPE_CHECKING:   # what type checkers and editors read; at run time lazy_exports imports these on first use
    from fastalign.demo.model import load_model, load_world
    from fastalign.demo.story import DemoResult, DemoSettings, run_demo
    from fastalign.demo.world import JUDGE_PROMPT, World, prompt_text, render, self_eval_prompt

__all__ = ["load_model", "load_world", "DemoResult", "DemoSettings", "run_demo", "JUDGE_PROMPT", "World", "prompt_text",
           "render", "self_eval_prompt"]
if not TYPE_CHECKING:   # a type checker reads the imports above: a __getattr__ would make any other name Any
    __getattr__, __dir__ = lazy_exports(globals())
