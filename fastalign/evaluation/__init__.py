"""Evaluation of any Hugging Face causal LM (harmful rate under a pluggable judge, utility against the
original model) and of answers written beforehand (`fastalign rain`'s output); `fastalign eval` on the
command line. Each public name is imported from its module on first use (lazy_exports)."""
from fastalign.lazy_exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(globals(), {
    "fastalign.evaluation.answers": ["Answers", "read_answers"],
    "fastalign.evaluation.generation": ["Generation", "GenerationConfig", "generate", "generations", "iter_generate"],
    "fastalign.evaluation.harness": ["AnswersReport", "HarmReport", "JudgeError", "UtilityReport", "evaluate_answers",
                                     "evaluate_harm", "evaluate_utility", "iter_judged", "iter_judged_answers"],
    "fastalign.evaluation.judges": ["KeywordJudge", "ModerationJudge"],
    "fastalign.evaluation.metrics": ["harmful_rate", "mean_token_kl", "mean_token_kl_of_ids", "unchanged_share"],
    "fastalign.evaluation.prompts": ["chat_prompt", "read_prompts", "spec_prompt"],
})
