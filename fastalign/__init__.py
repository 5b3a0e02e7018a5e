"""fastalign: fast kernels and engines for aligning language models without RLHF."""
__version__ = "0.1.0"

from fastalign.ops.linear_cross_entropy import linear_cross_entropy
from fastalign.ops.linear_kl_div import linear_kl_div
from fastalign.unlearn.token_weights import unlearning_token_weights
from fastalign.unlearn import UnlearnConfig, UnlearningObjective, UnlearningTrainer, run_unlearning
from fastalign.runtime import PoolExhaustedError, Span, TreeRunner
from fastalign.rain import JudgePrompt, RainConfig, rain_generate
from fastalign.evaluation import (GenerationConfig, KeywordJudge, ModerationJudge, evaluate_answers, evaluate_harm,
                                  evaluate_utility)
from fastalign.demo import load_model as load_demo_model, load_world as load_demo_world
