"""One of two gloo processes on the CPU that run CausalLMLoss wrapped by DDP or FSDP2, for test_causal_lm_loss.py:
argv = output directory, then wrapper names ("ddp", "fsdp2": decoder layers a unit each, the lm_head in the root
unit; "fsdp2_head_unit": the lm_head a unit of its own; "ddp_kl", "fsdp2_kl": CausalLMKLDiv to a teacher;
"ddp_fused_forward", "fsdp2_fused_forward": the model itself wrapped, its forward fused by fuse_causal_lm_loss).
Process r takes rows 2r and 2r + 1 of the test's batch of 4, with num_items_in_batch the whole batch's count of labelled
tokens, as a Trainer passes it; rank 0 writes each parameter's full gradient to <dir>/<wrapper>.pt."""
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from fastalign import CausalLMKLDiv, CausalLMLoss, fuse_causal_lm_loss
from tests.test_causal_lm_loss import VOCAB, batch
from tests.unlearn.tiny import tiny_llama


def teacher():
    """A wider model over the same vocabulary, the same on both processes."""
    return tiny_llama(VOCAB, hidden_size=48, seed=1)


def wrapped_loss(model, wrapper):
    """The wrapped module (DDP's, or FSDP2's root), and its call's loss."""
    if wrapper.endswith("_fused_forward"):   # the model wrapped as it is, its forward taking the fused loss
        loss = fuse_causal_lm_loss(model, backend="torch")
    else:   # the KL to a teacher, which the loss module holds frozen (under FSDP2, in its root unit)
        loss = (CausalLMKLDiv(model, teacher(), backend="torch") if wrapper.endswith("_kl")
                else CausalLMLoss(model, backend="torch"))
    if wrapper.startswith("ddp"):
        wrapped = DistributedDataParallel(loss)
    else:
        for layer in model.model.layers:
            fully_shard(layer)
        if wrapper == "fsdp2_head_unit":
            fully_shard(model.lm_head)
        wrapped = fully_shard(loss)
    return wrapped, fused_forward_loss if loss is model else (lambda output: output)


def fused_forward_loss(output):
    """The loss of a fused forward's output, which has no logits where the fused loss ran."""
    if output.logits is not None:
        raise AssertionError("the wrapped model ran its own forward, not the fused one")
    return output.loss


def main(out, wrappers):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    inputs = batch(rows=4)
    counted = int((inputs["labels"][:, 1:] != -100).sum())
    mine = {name: t[2 * rank:2 * rank + 2] for name, t in inputs.items()}
    for wrapper in wrappers:
        model = tiny_llama(VOCAB)   # the same weights on both processes
        wrapped, loss_of = wrapped_loss(model, wrapper)   # held through the backward: DDP's reducer lives in it
        loss_of(wrapped(**mine, num_items_in_batch=counted)).backward()
        grads = {name: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                 for name, p in model.named_parameters()}
        if rank == 0:
            torch.save(grads, os.path.join(out, f"{wrapper}.pt"))
        del wrapped
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2:])
    # gloo's teardown at the interpreter's exit can abort the process ("terminate called without an active
    # exception") after everything was written (as tests/unlearn/distributed_worker.py found): end without it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
