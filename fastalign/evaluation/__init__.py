"""Evaluation of any Hugging Face causal LM: harmful rate under a pluggable judge, utility against the
original model; `fastalign eval` on the command line."""
from fastalign.evaluation.generation import GenerationConfig, generate, iter_generate
from fastalign.evaluation.harness import HarmReport, JudgeError, UtilityReport, evaluate_harm, evaluate_utility, iter_judged
from fastalign.evaluation.judges import KeywordJudge, ModerationJudge
from fastalign.evaluation.metrics import harmful_rate, mean_token_kl, unchanged_share
from fastalign.evaluation.prompts import read_prompts, spec_prompt
