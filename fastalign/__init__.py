"""fastalign: fast kernels and engines for aligning language models without RLHF.

Each public name is imported from its module on first use (lazy_exports): `import fastalign` loads no engine.
"""
from fastalign.lazy_exports import lazy_exports

__version__ = "0.1.0"

__all__, __getattr__, __dir__ = lazy_exports(globals(), {
    "fastalign.ops.linear_cross_entropy": ["linear_cross_entropy"],
    "fastalign.ops.linear_kl_div": ["linear_kl_div"],
    "fastalign.ops.gated_linear": ["gated_activation", "gated_linear"],
    "fastalign.ops.rms_norm": ["rms_norm"],
    "fastalign.optim": ["KahanAdamW"],
    "fastalign.unlearn.token_weights": ["unlearning_token_weights"],
    "fastalign.unlearn": ["UnlearnConfig", "UnlearningObjective", "UnlearningTrainer", "run_unlearning"],
    "fastalign.runtime": ["PoolExhaustedError", "Span", "TreeRunner"],
    "fastalign.rain": ["JudgePrompt", "RainConfig", "rain_generate"],
    "fastalign.evaluation": ["GenerationConfig", "KeywordJudge", "ModerationJudge", "evaluate_answers", "evaluate_harm",
                             "evaluate_utility"],
    "fastalign.demo": ["load_model as load_demo_model", "load_world as load_demo_world"],
})
