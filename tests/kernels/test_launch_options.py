"""Every kernel launch sets FMA contraction itself (on, but in the rotary and Kahan AdamW kernels, which round as
torch's separate multiply and add do): Triton 3.9 warns when enable_fp_fusion is left unset, and Triton 3.10 turns it
off by default, which would change the kernels' rounding and speed without a word."""
import torch

import fastalign
from fastalign.kernels import gated_activation
from fastalign.optim import KahanAdamW
from fastalign.kernels.paged_attention import paged_attention_triton
from fastalign.kernels import rms_norm
from fastalign.kernels.rotary import rotate_qk_triton
from fastalign.ops.backend import triton_launch_method
from tests.conftest import TRITON_DEVICE
from tests.ops.test_paged_attention import make_paged_batch

KERNELS = {"fastalign.kernels.gated_activation._gated_activation_kernel",
           "fastalign.kernels.gated_activation._gated_activation_backward_kernel",
           "fastalign.kernels.kahan_adamw._kahan_adamw_kernel",
           "fastalign.kernels.linear_cross_entropy._forward_kernel",
           "fastalign.kernels.linear_cross_entropy._gradient_kernel",
           "fastalign.kernels.linear_kl_div._forward_kernel", "fastalign.kernels.linear_kl_div._gradient_kernel",
           "fastalign.kernels.paged_attention._paged_attention_kernel",
           "fastalign.kernels.paged_attention._merge_splits_kernel", "fastalign.kernels.rms_norm._rms_norm_kernel",
           "fastalign.kernels.rms_norm._rms_norm_backward_kernel",
           "fastalign.kernels.rotary._rotary_kernel"}
UNFUSED = {"fastalign.kernels.rotary._rotary_kernel", "fastalign.kernels.kahan_adamw._kahan_adamw_kernel"}


def record_launches(monkeypatch, describe):
    """A list that gets describe(kernel name, launch keyword arguments) at every kernel launch: at the JIT's run on
    a GPU, at the grid call in the interpreter."""
    seen = []
    Launcher, method = triton_launch_method()
    original = getattr(Launcher, method)

    def record(self, *args, **kwargs):
        seen.append(describe(f"{self.fn.__module__}.{self.fn.__name__}", kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Launcher, method, record)
    return seen


def launch_every_kernel():
    """Run each Triton kernel at least once: both losses forward and backward, a paged attention with split keys, an
    RMSNorm and a gated activation, forward and backward, a rotation and an optimizer step."""
    hidden = torch.randn(6, 16, device=TRITON_DEVICE, requires_grad=True)
    weight = torch.randn(37, 16, device=TRITON_DEVICE, requires_grad=True)
    target = torch.randint(0, 37, (6,), device=TRITON_DEVICE)
    loss = fastalign.linear_cross_entropy(hidden, weight, target, backend="triton")
    loss = loss + fastalign.linear_kl_div(hidden, weight, torch.randn(6, 16, device=TRITON_DEVICE), weight.detach(),
                                          backend="triton")
    loss.backward()
    batch = make_paged_batch([(40, 1), (9, 2)], 16, 4, 2, 16, device=TRITON_DEVICE)
    paged_attention_triton(**batch, scale=0.25, num_splits=2)
    rms_norm.forward(hidden, torch.ones(16, device=TRITON_DEVICE), 1e-6)
    rms_norm.backward(hidden.detach(), torch.ones(16, device=TRITON_DEVICE), hidden.detach(), 1e-6)
    q, k, cos = (torch.randn(shape, device=TRITON_DEVICE) for shape in ((3, 4, 8), (3, 2, 8), (3, 8)))
    rotate_qk_triton(q, k, cos, cos)
    gated_activation.forward(q, q)
    gated_activation.backward(q, q, q)
    weight.grad = torch.ones_like(weight)
    KahanAdamW([weight], backend="triton").step()


def test_every_kernel_launch_sets_fp_fusion(monkeypatch):
    launches = record_launches(monkeypatch, lambda name, kwargs: (name, kwargs.get("enable_fp_fusion")))
    launch_every_kernel()
    assert {name for name, _ in launches} == KERNELS
    assert all(fusion is (name not in UNFUSED) for name, fusion in launches), launches
