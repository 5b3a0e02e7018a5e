"""Evaluation of any Hugging Face causal LM (harmful rate under a pluggable judge, utility against the
original model) and of answers written beforehand (`fastalign rain`'s output); `fastalign eval` on the
command line."""
from fastalign.evaluation.answers import Answers, read_answers
from fastalign.evaluation.generation import Generation, GenerationConfig, generate, generations, iter_generate
from fastalign.evaluation.harness import (AnswersReport, HarmReport, JudgeError, UtilityReport, evaluate_answers,
                                          evaluate_harm, evaluate_utility, iter_judged, iter_judged_answers)
from fastalign.evaluation.judges import KeywordJudge, ModerationJudge
from fastalign.evaluation.metrics import harmful_rate, mean_token_kl, mean_token_kl_of_ids, unchanged_share
from fastalign.evaluation.prompts import chat_prompt, read_prompts, spec_prompt
