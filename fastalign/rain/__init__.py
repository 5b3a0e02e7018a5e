"""RAIN (Li et al. 2023): a frozen model searches, judges and rewinds its own answers at inference time.

`rain_generate(model, tokenizer, prompts, RainConfig(), engine="tree" | "slow")` is the entry point; the
search (search.py, tree.py) is independent of how the model runs; engines run its jobs batch-1 on Hugging
Face (slow.py, the reference) or batched on a TreeRunner (tree_engine.py). Each public name is imported from its
module on first use (lazy_exports).
"""
from fastalign.lazy_exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(globals(), {
    "fastalign.rain.config": ["RainConfig"],
    "fastalign.rain.embeddings": ["HiddenStateEmbedder", "MiniLMEmbedder", "PathInfo"],
    "fastalign.rain.generate": ["RainResult", "RainRun", "rain_generate"],
    "fastalign.rain.judge": ["JudgePrompt", "JudgeTokens"],
    "fastalign.rain.sampling": ["KeyedSampler", "TorchSampler"],
    "fastalign.rain.stats": ["RainStats"],
})
