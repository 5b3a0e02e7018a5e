"""Unlearning (SPEC §1): data formats and answer masks, the fused objective, its references, the trainer.

Each public name is imported from its module on first use (lazy_exports), so that `fastalign unlearn --help` loads
no trainer."""
from fastalign.lazy_exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(globals(), {
    "fastalign.unlearn.backward_step": ["step_in_backward"],
    "fastalign.unlearn.config": ["UnlearnConfig"],
    "fastalign.unlearn.encoding": ["EncodedExample", "PoolAnswer", "encode_answers", "encode_pairs"],
    "fastalign.unlearn.formats": ["load_hh_rlhf", "load_pairs", "load_pku_saferlhf", "load_prompt_answer_jsonl",
                                  "load_truthfulqa"],
    "fastalign.unlearn.layer_stand_ins": ["fused_layers"],
    "fastalign.unlearn.objective": ["LossTerms", "LossWeights", "UnlearningObjective"],
    "fastalign.unlearn.packing": ["PackedRows", "RowPacker", "pack_rows"],
    "fastalign.unlearn.records": ["DataError", "QAPair"],
    "fastalign.unlearn.reference": ["AdapterDisabledReference", "CachedReference", "FrozenCopyReference"],
    "fastalign.unlearn.run": ["load_streams", "run_unlearning"],
    "fastalign.unlearn.streams": ["UnlearningBatch", "UnlearningStreams"],
    "fastalign.unlearn.templates": ["ChatTemplate", "TextTemplate"],
    "fastalign.unlearn.token_weights": ["unlearning_token_weights"],
    "fastalign.unlearn.trainer": ["RunSummary", "StepRecord", "UnlearningTrainer"],
})
