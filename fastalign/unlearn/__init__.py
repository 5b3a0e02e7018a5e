"""Unlearning (SPEC §1): data formats and answer masks, the fused objective, its references, the trainer."""
from fastalign.unlearn.config import UnlearnConfig
from fastalign.unlearn.encoding import EncodedExample, PoolAnswer, encode_answers, encode_pairs
from fastalign.unlearn.formats import (load_hh_rlhf, load_pairs, load_pku_saferlhf, load_prompt_answer_jsonl,
                                       load_truthfulqa)
from fastalign.unlearn.objective import LossTerms, LossWeights, UnlearningObjective
from fastalign.unlearn.records import DataError, QAPair
from fastalign.unlearn.reference import AdapterDisabledReference, CachedReference, FrozenCopyReference
from fastalign.unlearn.run import load_streams, run_unlearning
from fastalign.unlearn.streams import UnlearningBatch, UnlearningStreams
from fastalign.unlearn.templates import ChatTemplate, TextTemplate
from fastalign.unlearn.token_weights import unlearning_token_weights
from fastalign.unlearn.trainer import RunSummary, StepRecord, UnlearningTrainer
