"""Judges: callables that mark (prompt, answer) pairs harmful (True) or not (False).

The protocol is just `judge(pairs: Sequence[tuple[str, str]]) -> Sequence[bool]`, one verdict per pair,
so any function fits. Shipped here:
- `KeywordJudge`: harmful iff the answer contains one of the given words or phrases (whole-word match,
  case-insensitive): a cheap rule for models whose harmful outputs have known markers;
- `ModerationJudge`: wraps a moderation classifier the user supplies (any Hugging Face sequence-classification
  model and its tokenizer, single- or multi-label): harmful iff the probability of its harmful label reaches a
  threshold;
- the demo world's exact judge is `World.judge` (fastalign.demo.world).
`check_verdicts` validates what a judge returned, so that a faulty judge fails loudly, never silently.
"""
import re
from typing import Callable, List, Sequence, Tuple, Union

import torch

Pair = Tuple[str, str]
Judge = Callable[[Sequence[Pair]], Sequence[bool]]


def check_verdicts(verdicts, pairs: Sequence[Pair]) -> List[bool]:
    """The verdicts as a list of bools; ValueError if there is not exactly one bool per pair. A torch tensor
    or a numpy array (what a scikit-learn classifier's `predict` returns) counts as its list of values."""
    if hasattr(verdicts, "tolist"):
        verdicts = verdicts.tolist()
    try:
        verdicts = list(verdicts)
    except TypeError:
        raise ValueError(f"judge must return a sequence of bools, got {type(verdicts).__name__}") from None
    if len(verdicts) != len(pairs):
        raise ValueError(f"judge returned {len(verdicts)} verdicts for {len(pairs)} (prompt, answer) pairs")
    bad = [v for v in verdicts if not isinstance(v, (bool, int)) or v not in (0, 1)]
    if bad:
        raise ValueError(f"judge verdicts must be bools, got {bad[0]!r} ({type(bad[0]).__name__})")
    return [bool(v) for v in verdicts]


class KeywordJudge:
    """Harmful iff the answer contains any of `keywords` as whole words (case-insensitive)."""

    def __init__(self, keywords: Sequence[str]):
        keywords = [k.strip() for k in keywords if k.strip()]
        if not keywords:
            raise ValueError("KeywordJudge needs at least one non-empty keyword")
        self.keywords = keywords
        # not next to a word character: unlike \b, this also holds for a keyword that starts or ends in one
        # that is none ("c++", "$100", "step 1:")
        self._pattern = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(k) for k in keywords) + r")(?!\w)",
                                   re.IGNORECASE)

    def __call__(self, pairs: Sequence[Pair]) -> List[bool]:
        return [self._pattern.search(answer) is not None for _, answer in pairs]


class ModerationJudge:
    """A user-supplied sequence classifier as a judge.

    The classifier reads `template.format(prompt=..., answer=...)` (default: the answer alone); a pair is
    harmful iff the probability of label `harmful_label` (an index or a name from the model's `id2label`)
    is at least `threshold`. That probability is the softmax over the labels, or the label's own sigmoid
    for a classifier trained so (config `problem_type` "multi_label_classification", or a single logit).
    """

    def __init__(self, model, tokenizer, harmful_label: Union[int, str] = 1, threshold: float = 0.5,
                 template: str = "{answer}", batch_size: int = 16, max_length: int = 512):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.label = self._label_index(model, harmful_label)
        self.sigmoid = (getattr(model.config, "problem_type", None) == "multi_label_classification"
                        or getattr(model.config, "num_labels", 2) == 1)
        self.threshold, self.template = threshold, template
        self.batch_size, self.max_length = batch_size, max_length

    @staticmethod
    def _label_index(model, label: Union[int, str]) -> int:
        id2label = getattr(model.config, "id2label", None) or {}
        num_labels = getattr(model.config, "num_labels", len(id2label))
        if isinstance(label, str):
            by_name = {str(name).lower(): int(i) for i, name in id2label.items()}
            if label.lower() not in by_name:
                raise ValueError(f"harmful_label {label!r} is not one of the model's labels {sorted(by_name)}")
            return by_name[label.lower()]
        if not 0 <= label < num_labels:
            raise ValueError(f"harmful_label {label} out of range for a model with {num_labels} labels")
        return label

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "ModerationJudge":
        """Loads a local sequence-classification model and its tokenizer from `path`."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        return cls(AutoModelForSequenceClassification.from_pretrained(path), AutoTokenizer.from_pretrained(path),
                   **kwargs)

    @torch.no_grad()
    def probabilities(self, pairs: Sequence[Pair]) -> List[float]:
        """The classifier's probability of the harmful label for every pair."""
        device = next(self.model.parameters()).device
        out: List[float] = []
        for start in range(0, len(pairs), self.batch_size):
            texts = [self.template.format(prompt=p, answer=a) for p, a in pairs[start:start + self.batch_size]]
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(device)
            logits = self.model(**enc).logits.float()
            probs = logits.sigmoid() if self.sigmoid else torch.softmax(logits, -1)
            out += probs[:, self.label].tolist()
        return out

    def __call__(self, pairs: Sequence[Pair]) -> List[bool]:
        return [p >= self.threshold for p in self.probabilities(pairs)]
