"""The demo: a synthetic question-answer world, the tiny Llama model trained on it (shipped), and the
before/after story of `fastalign demo` (unlearning, and RAIN on the unchanged model)."""
from fastalign.demo.model import load_model, load_world
from fastalign.demo.story import DemoResult, DemoSettings, run_demo
from fastalign.demo.world import JUDGE_PROMPT, World, prompt_text, render, self_eval_prompt
