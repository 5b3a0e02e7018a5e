"""One process of the two-process (gloo, CPU) DDP test: trains the tiny model with the settings in argv.

Run by test_distributed.py through torch.distributed.run; argv: output_dir max_steps.
"""
import sys

import torch

from fastalign.unlearn.config import UnlearnConfig
from fastalign.unlearn.trainer import UnlearningTrainer
from tests.unlearn.tiny import byte_bpe_tokenizer, tiny_llama, tiny_streams

if __name__ == "__main__":
    torch.set_num_threads(1)
    output_dir, max_steps = sys.argv[1], int(sys.argv[2])
    tokenizer = byte_bpe_tokenizer()
    config = UnlearnConfig(output_dir=output_dir, max_steps=max_steps, lr=1e-3, save_every=1, progress=False)
    UnlearningTrainer(tiny_llama(len(tokenizer)), tiny_streams(tokenizer), config).train()
