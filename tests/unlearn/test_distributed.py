"""Two gloo processes on the CPU through accelerate (DDP) train exactly like one process that accumulates
the same two micro-batches: process r of 2 draws batch 2*step + r, as micro-batch r of one process does."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from transformers import LlamaForCausalLM

from fastalign.unlearn.config import UnlearnConfig
from fastalign.unlearn.trainer import UnlearningTrainer
from tests.unlearn.tiny import byte_bpe_tokenizer, tiny_llama, tiny_streams

pytest.importorskip("accelerate")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process_with_accumulation(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               os.path.join(ROOT, "tests", "unlearn", "ddp_worker.py"), str(tmp_path / "ddp"), "2"]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    tokenizer = byte_bpe_tokenizer()
    config = UnlearnConfig(output_dir=str(tmp_path / "single"), max_steps=2, lr=1e-3, grad_accum=2, progress=False)
    single = UnlearningTrainer(tiny_llama(len(tokenizer)), tiny_streams(tokenizer), config)
    summary = single.train()

    ddp_model = LlamaForCausalLM.from_pretrained(tmp_path / "ddp" / "model")
    for (name, a), (_, b) in zip(single.model.named_parameters(), ddp_model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    ddp_run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert ddp_run["num_processes"] == 2 and ddp_run["steps"] == 2
    assert ddp_run["compute"]["tokens"] == summary.compute["tokens"]
    assert sorted(os.listdir(tmp_path / "ddp" / "checkpoints" / "step-000001")) == ["rank-0.pt", "rank-1.pt",
                                                                                    "state.pt"]
    for single_line, ddp_line in zip((tmp_path / "single" / "log.jsonl").read_text().splitlines(),
                                     (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()):
        a, b = json.loads(single_line), json.loads(ddp_line)
        for key in ("loss", "forget_nll", "mismatch_nll", "normal_kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
