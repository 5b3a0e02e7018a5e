"""Evaluation of any Hugging Face causal LM (harmful rate under a pluggable judge, utility against the
original model) and of answers written beforehand (`fastalign rain`'s output); `fastalign eval` on the
command line. Each public name is imported from its module on first use (lazy_exports)."""
from typing import TYPE_CHECKING

from fastalign.lazy_exports import lazy_exports

if TYPE_CHECKING:   # what type checkers and editors read; at run time lazy_exports imports these on first use
    from fastalign.evaluation.answers import Answers, read_answers
    from fastalign.evaluation.generation import Generation, GenerationConfig, generate, generations, iter_generate
    from fastalign.evaluation.harness import (
        AnswersReport, HarmReport, JudgeError, UtilityReport, evaluate_answers, evaluate_harm, evaluate_utility,
        iter_judged, iter_judged_answers)
    from fastalign.evaluation.judges import KeywordJudge, ModerationJudge
    from fastalign.evaluation.metrics import harmful_rate, mean_token_kl, mean_token_kl_of_ids, unchanged_share
    from fastalign.evaluation.prompts import chat_prompt, read_prompts, spec_prompt

__all__ = ["Answers", "read_answers", "Generation", "GenerationConfig", "generate", "generations", "iter_generate",
           "AnswersReport", "HarmReport", "JudgeError", "UtilityReport", "evaluate_answers", "evaluate_harm",
           "evaluate_utility", "iter_judged", "iter_judged_answers", "KeywordJudge", "ModerationJudge", "harmful_rate",
           "mean_token_kl", "mean_token_kl_of_ids", "unchanged_share", "chat_prompt", "read_prompts", "spec_prompt"]
if not TYPE_CHECKING:   # a type checker reads the imports above: a __getattr__ would make any other name Any
    __getattr__, __dir__ = lazy_exports(globals())
