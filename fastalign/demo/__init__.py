"""The demo: a synthetic question-answer world, the tiny Llama model trained on it (shipped), and the
before/after story of `fastalign demo` (unlearning, and RAIN on the unchanged model). Each public name is imported
from its module on first use (lazy_exports)."""
from fastalign.lazy_exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(globals(), {
    "fastalign.demo.model": ["load_model", "load_world"],
    "fastalign.demo.story": ["DemoResult", "DemoSettings", "run_demo"],
    "fastalign.demo.world": ["JUDGE_PROMPT", "World", "prompt_text", "render", "self_eval_prompt"],
})
