"""RAIN (Li et al. 2023): a frozen model searches, judges and rewinds its own answers at inference time.

`rain_generate(model, tokenizer, prompts, RainConfig(), engine="tree" | "slow")` is the entry point; the
search (search.py, tree.py) is independent of how the model runs; engines run its jobs batch-1 on Hugging
Face (slow.py, the reference) or batched on a TreeRunner (tree_engine.py). Each public name is imported from its
module on first use (lazy_exports).
"""
from typing import TYPE_CHECKING

from fastalign.lazy_exports import lazy_exports

if TYPE_CHECKING:   # what type checkers and editors read; at run time lazy_exports imports these on first use
    from fastalign.rain.config import RainConfig
    from fastalign.rain.embeddings import HiddenStateEmbedder, MiniLMEmbedder, PathInfo
    from fastalign.rain.generate import RainResult, RainRun, rain_generate
    from fastalign.rain.judge import JudgePrompt, JudgeTokens
    from fastalign.rain.sampling import KeyedSampler, TorchSampler
    from fastalign.rain.stats import RainStats

__all__ = ["RainConfig", "HiddenStateEmbedder", "MiniLMEmbedder", "PathInfo", "RainResult", "RainRun", "rain_generate",
           "JudgePrompt", "JudgeTokens", "KeyedSampler", "TorchSampler", "RainStats"]
if not TYPE_CHECKING:   # a type checker reads the imports above: a __getattr__ would make any other name Any
    __getattr__, __dir__ = lazy_exports(globals())
