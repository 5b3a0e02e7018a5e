"""Unlearning (SPEC §1): data formats and answer masks, the fused objective, its references, the trainer.

Each public name is imported from its module on first use (lazy_exports), so that `fastalign unlearn --help` loads
no trainer."""
from typing import TYPE_CHECKING

from fastalign.lazy_exports import lazy_exports

if TYPE_CHECKING:   # what type checkers and editors read; at run time lazy_exports imports these on first use
    from fastalign.unlearn.backward_step import step_in_backward
    from fastalign.unlearn.batching import TokenBatch
    from fastalign.unlearn.config import UnlearnConfig
    from fastalign.unlearn.encoding import EncodedExample, PoolAnswer, encode_answers, encode_pairs
    from fastalign.unlearn.extras import MissingExtraError
    from fastalign.unlearn.formats import (
        load_hh_rlhf, load_pairs, load_pku_saferlhf, load_prompt_answer_jsonl, load_truthfulqa)
    from fastalign.unlearn.layer_stand_ins import fused_layers
    from fastalign.unlearn.objective import LossTerms, LossWeights, UnlearningObjective
    from fastalign.unlearn.packing import PackedRows, RowPacker, pack_rows
    from fastalign.unlearn.records import QAPair
    from fastalign.unlearn.reference import AdapterDisabledReference, CachedReference, FrozenCopyReference
    from fastalign.unlearn.run import load_streams, run_unlearning
    from fastalign.unlearn.streams import UnlearningBatch, UnlearningStreams
    from fastalign.unlearn.token_weights import unlearning_token_weights
    from fastalign.unlearn.trainer import RunSummary, StepRecord, UnlearningTrainer
    # helpers of the whole package, which the README documents under fastalign.unlearn
    from fastalign.data_files import DataError
    from fastalign.prompt_templates import ChatTemplate, TextTemplate

__all__ = ["step_in_backward", "TokenBatch", "UnlearnConfig", "EncodedExample", "PoolAnswer", "encode_answers",
           "encode_pairs", "MissingExtraError", "load_hh_rlhf", "load_pairs", "load_pku_saferlhf",
           "load_prompt_answer_jsonl", "load_truthfulqa", "fused_layers", "LossTerms", "LossWeights",
           "UnlearningObjective", "PackedRows", "RowPacker", "pack_rows", "DataError", "QAPair",
           "AdapterDisabledReference", "CachedReference", "FrozenCopyReference", "load_streams", "run_unlearning",
           "UnlearningBatch", "UnlearningStreams", "ChatTemplate", "TextTemplate", "unlearning_token_weights",
           "RunSummary", "StepRecord", "UnlearningTrainer"]
if not TYPE_CHECKING:   # a type checker reads the imports above: a __getattr__ would make any other name Any
    __getattr__, __dir__ = lazy_exports(globals())
