"""RAIN (Li et al. 2023): a frozen model searches, judges and rewinds its own answers at inference time.

`rain_generate(model, tokenizer, prompts, RainConfig(), engine="tree" | "slow")` is the entry point; the
search (search.py, tree.py) is independent of how the model runs; engines run its jobs batch-1 on Hugging
Face (slow.py, the reference) or batched on a TreeRunner (tree_engine.py).
"""
from .config import RainConfig
from .embeddings import HiddenStateEmbedder, MiniLMEmbedder, PathInfo
from .generate import RainResult, RainRun, rain_generate
from .judge import JudgePrompt, JudgeTokens
from .sampling import KeyedSampler, TorchSampler
from .stats import RainStats

__all__ = ["RainConfig", "HiddenStateEmbedder", "MiniLMEmbedder", "PathInfo", "RainResult", "RainRun",
           "rain_generate", "JudgePrompt", "JudgeTokens", "KeyedSampler", "TorchSampler", "RainStats"]
