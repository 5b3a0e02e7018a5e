"""Triton gated activation `act(gate) * up` of a dense gated MLP, in one launch, rounded as torch's two ops round.

Between its gate/up projections and its down projection, a Hugging Face gated MLP (Llama's SwiGLU, Gemma's GeGLU)
runs two elementwise kernels: the activation, rounded to the projections' dtype, and the product, rounded again. A
program here computes a block of one row's activation in fp32, rounds it to the dtype, multiplies it by up in fp32 and
rounds once more: what the two torch ops compute, one launch and one pass over the rows instead of three.

Activations: SiLU, x * sigmoid(x) (Llama, Mistral, Qwen, OLMo), and the tanh approximation of GELU (Gemma),
0.5 x (1 + tanh(u)) with u = sqrt(2 / pi) (x + 0.044715 x^3), computed as x * sigmoid(2u), the same number, without
the cancellation of 1 + tanh(u) where u lies far below 0 (there torch's fp32 value keeps few bits, or none, so
16-bit outputs of such tiny values may differ from torch's). The exponential is the GPU's (or numpy's) rather than
torch's, so fp32 outputs may differ from torch's in the last place, and 16-bit ones, in few entries, by one unit
there.

`backward` serves training (fastalign.ops.gated_linear, which saves gate and up, not the product): from the product's
gradient it recomputes the product, for the down projection's weight gradient, and gives the gradients of gate and
up, rounded as torch's autograd of the two ops rounds them, in one pass instead of the forward's two ops again and
the backward's three.

Launcher contract of `forward` and `backward` (fastalign.ops.backend): gate, up [..., I] of one shape, dtype and
device, each row's entries contiguous.
"""
import torch
import triton
import triton.language as tl

from .device_guard import on_device_of_first_input


@triton.jit
def _activation(x, TANH_GELU: tl.constexpr):
    """(act(x), d act / dx) in fp32 for SiLU, x sigmoid(x), or the tanh GELU, x sigmoid(2u): both x sigmoid(s(x)),
    whose derivative is sigmoid(s) (1 + x (1 - sigmoid(s)) s'(x)); 0 where sigmoid(s) is 0, as torch's, not
    0 * -inf = NaN where x s'(x) overflows (a tanh-GELU gate below ~-1.3e13), and NaN for a NaN gate or a gate of
    -inf (0 * -inf there in torch's too), as torch's."""
    if TANH_GELU:
        slope = 1.5957691216057308 * (x + 0.044715 * x * x * x)   # 2 sqrt(2 / pi) (...): twice u
        slope_derivative = 1.5957691216057308 * (1.0 + 0.134145 * x * x)
    else:   # SiLU
        slope = x
        slope_derivative = 1.0
    sigmoid = 1.0 / (1.0 + tl.exp(-slope))
    return x * sigmoid, tl.where((sigmoid == 0.0) & (x != float("-inf")), 0.0,
                                 sigmoid * (1.0 + x * (1.0 - sigmoid) * slope_derivative))


@triton.jit(do_not_specialize=["num_cols", "stride_gate", "stride_up", "stride_out"])
def _gated_activation_kernel(Gate, Up, Out, num_cols, stride_gate, stride_up, stride_out, TANH_GELU: tl.constexpr,
                             BLOCK: tl.constexpr):
    """out[row, block] = act(gate[row, block]), rounded to the dtype, times up[row, block], rounded."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < num_cols
    gate = tl.load(Gate + row * stride_gate + cols, mask=ok, other=0.0)
    activated, _ = _activation(gate.to(tl.float32), TANH_GELU)
    activated = activated.to(gate.dtype).to(tl.float32)
    up = tl.load(Up + row * stride_up + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_out + cols, (activated * up).to(Out.dtype.element_ty), mask=ok)


@on_device_of_first_input
def forward(gate, up, *, tanh_gelu=False):
    """act(gate) * up for gate, up [..., I] of one shape and dtype; act is SiLU, or with tanh_gelu the tanh
    approximation of GELU. The output has gate's shape and dtype. The kernel steps through a row one element at a
    time: an input strided in its last dimension (gate_up[..., ::2], a transpose) is copied first."""
    if gate.shape[-1] == 0:   # rows of nothing (a reshape to [-1, 0] is ambiguous)
        return torch.empty_like(gate)
    gate, up = (t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous() for t in (gate, up))
    gate_rows, up_rows = gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1])
    out = torch.empty(gate_rows.shape, dtype=gate.dtype, device=gate.device)
    num_rows, num_cols = gate_rows.shape
    if num_rows and num_cols:
        block = min(1024, triton.next_power_of_2(num_cols))
        _gated_activation_kernel[(num_rows, triton.cdiv(num_cols, block))](
            gate_rows, up_rows, out, num_cols, gate_rows.stride(0), up_rows.stride(0), out.stride(0),
            TANH_GELU=tanh_gelu, BLOCK=block, num_warps=max(1, min(4, block // 256)), enable_fp_fusion=True)
    return out.view(gate.shape)


@triton.jit(do_not_specialize=["num_cols"])
def _gated_activation_backward_kernel(Gate, Up, GradOut, Out, GradGate, GradUp, num_cols, STORE_OUT: tl.constexpr,
                                      TANH_GELU: tl.constexpr, BLOCK: tl.constexpr):
    """For a block of one row of contiguous [rows, num_cols] tensors: out = act(gate) * up again (with STORE_OUT),
    grad_up = grad_out * act(gate) and grad_gate = act'(gate) * (grad_out * up), each product rounded to the dtype
    as torch's autograd rounds the two ops' gradients."""
    at = tl.program_id(0).to(tl.int64) * num_cols + tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK) < num_cols
    gate = tl.load(Gate + at, mask=ok, other=0.0)
    dtype = gate.dtype
    up = tl.load(Up + at, mask=ok, other=0.0).to(tl.float32)
    grad_out = tl.load(GradOut + at, mask=ok, other=0.0).to(tl.float32)
    activated, derivative = _activation(gate.to(tl.float32), TANH_GELU)
    activated = activated.to(dtype).to(tl.float32)
    if STORE_OUT:
        tl.store(Out + at, (activated * up).to(dtype), mask=ok)
    tl.store(GradUp + at, (grad_out * activated).to(dtype), mask=ok)
    grad_activated = (grad_out * up).to(dtype).to(tl.float32)
    tl.store(GradGate + at, (grad_activated * derivative).to(dtype), mask=ok)


@on_device_of_first_input
def backward(gate, up, grad_out, *, tanh_gelu=False, need_out=True):
    """(out, grad_gate, grad_up) of out = act(gate) * up given grad_out [..., I] (gate's shape; out None unless
    need_out), all in gate's dtype."""
    gate, up, grad_out = (t.contiguous() for t in (gate, up, grad_out.to(gate.dtype)))
    out = torch.empty_like(gate) if need_out else None
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(gate)
    num_cols = gate.shape[-1]
    num_rows = gate.numel() // num_cols if num_cols else 0
    if num_rows and num_cols:
        block = min(1024, triton.next_power_of_2(num_cols))
        _gated_activation_backward_kernel[(num_rows, triton.cdiv(num_cols, block))](
            gate, up, grad_out, out if need_out else gate, grad_gate, grad_up, num_cols, STORE_OUT=need_out,
            TANH_GELU=tanh_gelu, BLOCK=block, num_warps=max(1, min(4, block // 256)), enable_fp_fusion=True)
    return out, grad_gate, grad_up
