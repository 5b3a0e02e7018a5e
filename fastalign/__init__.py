"""fastalign: fast kernels and engines for aligning language models without RLHF.

Each public name is imported from its module on first use (lazy_exports): `import fastalign` loads no engine.
"""
from typing import TYPE_CHECKING

from fastalign.lazy_exports import lazy_exports

__version__ = "0.1.0"

if TYPE_CHECKING:   # what type checkers and editors read; at run time lazy_exports imports these on first use
    from fastalign.ops.linear_cross_entropy import linear_cross_entropy
    from fastalign.ops.linear_kl_div import linear_kl_div
    from fastalign.ops.gated_linear import gated_activation, gated_linear
    from fastalign.ops.rms_norm import rms_norm
    from fastalign.causal_lm_loss import CausalLMLoss
    from fastalign.causal_lm_kl_div import CausalLMKLDiv
    from fastalign.fused_loss_forward import fuse_causal_lm_loss
    from fastalign.optim import KahanAdamW
    from fastalign.unlearn.token_weights import unlearning_token_weights
    from fastalign.unlearn import UnlearnConfig, UnlearningObjective, UnlearningTrainer, run_unlearning
    from fastalign.runtime import PoolExhaustedError, Span, TreeRunner
    from fastalign.rain import JudgePrompt, RainConfig, rain_generate
    from fastalign.evaluation import (
        GenerationConfig, KeywordJudge, ModerationJudge, evaluate_answers, evaluate_harm, evaluate_utility)
    from fastalign.demo import load_model as load_demo_model, load_world as load_demo_world

__all__ = ["linear_cross_entropy", "linear_kl_div", "gated_activation", "gated_linear", "rms_norm", "CausalLMLoss",
           "CausalLMKLDiv", "fuse_causal_lm_loss", "KahanAdamW", "unlearning_token_weights", "UnlearnConfig",
           "UnlearningObjective", "UnlearningTrainer", "run_unlearning", "PoolExhaustedError", "Span", "TreeRunner",
           "JudgePrompt", "RainConfig", "rain_generate", "GenerationConfig", "KeywordJudge", "ModerationJudge",
           "evaluate_answers", "evaluate_harm", "evaluate_utility", "load_demo_model", "load_demo_world"]
if not TYPE_CHECKING:   # a type checker reads the imports above: a __getattr__ would make any other name Any
    __getattr__, __dir__ = lazy_exports(globals())
