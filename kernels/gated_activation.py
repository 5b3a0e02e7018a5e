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
"""
import torch
import triton
import triton.language as tl

from .device_guard import on_device_of_first_input


@triton.jit(do_not_specialize=["num_cols", "stride_gate", "stride_up", "stride_out"])
def _gated_activation_kernel(Gate, Up, Out, num_cols, stride_gate, stride_up, stride_out, TANH_GELU: tl.constexpr,
                             BLOCK: tl.constexpr):
    """out[row, block] = act(gate[row, block]), rounded to the dtype, times up[row, block], rounded."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < num_cols
    gate = tl.load(Gate + row * stride_gate + cols, mask=ok, other=0.0)
    x = gate.to(tl.float32)
    if TANH_GELU:
        slope = 1.5957691216057308 * (x + 0.044715 * x * x * x)   # 2 sqrt(2 / pi) (...): twice u
    else:   # SiLU
        slope = x
    activated = (x / (1.0 + tl.exp(-slope))).to(gate.dtype).to(tl.float32)
    up = tl.load(Up + row * stride_up + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_out + cols, (activated * up).to(Out.dtype.element_ty), mask=ok)


@on_device_of_first_input
def gated_activation_triton(gate, up, *, tanh_gelu=False):
    """act(gate) * up for gate, up [..., I] of one shape and dtype (last dimensions contiguous); act is SiLU, or with
    tanh_gelu the tanh approximation of GELU. The output has gate's shape and dtype."""
    gate_rows, up_rows = gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1])
    out = torch.empty(gate_rows.shape, dtype=gate.dtype, device=gate.device)
    num_rows, num_cols = gate_rows.shape
    if num_rows and num_cols:
        block = min(1024, triton.next_power_of_2(num_cols))
        _gated_activation_kernel[(num_rows, triton.cdiv(num_cols, block))](
            gate_rows, up_rows, out, num_cols, gate_rows.stride(0), up_rows.stride(0), out.stride(0),
            TANH_GELU=tanh_gelu, BLOCK=block, num_warps=max(1, min(4, block // 256)), enable_fp_fusion=True)
    return out.view(gate.shape)
