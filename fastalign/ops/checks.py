"""Argument checks shared by the fused linear loss ops (and the runtime's integer arguments).

Every check names the argument and what was expected, so that bad input fails here with a clear
message instead of deep inside a kernel.
"""
import math
import numbers
import sys
from typing import Literal, get_args

import numpy as np
import torch

Reduction = Literal["mean", "sum", "none"]   # the `reduction` argument of the losses
REDUCTIONS = get_args(Reduction)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BOOLS = frozenset((bool, np.bool_))   # the types of a list's elements that numpy reads as the ints 0 and 1


def is_integer(value):
    """True for Python and NumPy integers; False for bools, which are ints to Python but never a count."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def int_ids(values, name, what, empty=False) -> np.ndarray:
    """`values`, a 1-D sequence of ints (a list, NumPy array or tensor), as a NumPy int array; else a ValueError
    naming `name` and the int `what` expected: another shape or dtype, no element (unless `empty`), or a bool among
    ints, which numpy reads as 1 (the elements' types are gathered in C: no Python step per element)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        array = np.asarray(values)
    except ValueError:  # a ragged nested sequence: refused below as a 1-D array of objects
        array = np.asarray(values, dtype=object)
    if array.shape == (0,):
        if empty:
            return array.astype(np.int64)   # [] reads as float64
        raise ValueError(f"{name}: expected a non-empty 1-D sequence of int {what}, got an empty one")
    if array.ndim != 1 or array.dtype.kind not in "iu":   # bools are of kind "b"
        raise ValueError(f"{name}: expected a {'' if empty else 'non-empty '}1-D sequence of int {what}, got shape "
                         f"{list(array.shape)} of {array.dtype}")
    if not isinstance(values, np.ndarray) and not _BOOLS.isdisjoint(map(type, values)):
        raise ValueError(f"{name}: expected int {what}, got a bool among them (numpy reads True as 1)")
    return array


def is_real(value):
    """True for Python and NumPy real numbers; False for bools, which are numbers to Python but never a rate."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def real_as_float(value) -> float | None:
    """`value` as a float (inf and NaN too) where is_real(value); None for another type, and for an int too big for a
    float (YAML and JSON read 400 digits as one), which float() and math.isfinite refuse with an OverflowError."""
    if not is_real(value):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def is_finite_real(value):
    """True for a real number (is_real) that is finite as a float: False for inf, NaN and an int too big for a float,
    so that a check of "a finite number" refuses such an int by name instead of raising OverflowError."""
    number = real_as_float(value)
    return number is not None and math.isfinite(number)


def check_count(name, value, least, where=""):
    """ValueError, naming `name` (after `where`), unless `value` is an integer (NumPy's too, never a bool) >= least."""
    if not is_integer(value) or value < least:
        raise ValueError(f"{where}{name} must be an integer >= {least}, got {value!r}")


# The largest seed: the samplers key on 64 bits (2**64 was searched as seed 0, -1 as 2**64 - 1), and torch.manual_seed
# refuses a larger one only once the model has loaded ("Overflow when unpacking long long").
SEED_MAX = 2 ** 64 - 1


def check_seed(name, value, where="") -> int:
    """`value` as a plain int (a NumPy integer too); ValueError naming `name` (after `where`) unless it is an integer
    in [0, SEED_MAX]: a bool, a float or a text stood for other draws than the integer it reads as."""
    if not is_integer(value) or not 0 <= value <= SEED_MAX:
        raise ValueError(f"{where}{name} must be an integer in [0, 2**64), got {value!r}")
    return int(value)


def refuse_one_string(name, value):
    """TypeError for a str where a list of texts belongs: a str is a sequence too, of its characters."""
    if isinstance(value, str):
        raise TypeError(f"{name} must be a list of strings, got a single string (wrap it in a list)")


def _describe(t):
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _is_dtensor(t):
    """Whether `t` is a torch.distributed DTensor (none exists before torch.distributed.tensor is imported)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _check_dense(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if _is_dtensor(t):   # torch's own error comes from deep inside the chunked matmul ("mixed Tensor and DTensor")
        raise ValueError(f"{name} must be a plain tensor, got a DTensor (placements {tuple(t.placements)}), as "
                         f"FSDP2 leaves a weight outside its unit's forward: pass {name}.full_tensor() (its backward "
                         "hands the gradient back to the shards), or compute "
                         "the loss with fastalign.CausalLMLoss or CausalLMKLDiv, modules that FSDP wraps with the "
                         "model and that gather the lm_head weight inside their forward")
    if t.is_nested:   # torch.nested's default layout is torch.strided: torch failed on its .shape ("Internal error")
        raise TypeError(f"{name} must be a dense tensor, got a nested tensor (layout {t.layout}): pad it "
                        "(torch.nested.to_padded_tensor; a loss then takes a mask or token weights of 0 at the "
                        "padding), or pack its rows into one dense tensor")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")


def check_tensor(name, t, *, ndim, dtypes=None, like=None):
    """`t` is a dense tensor of rank `ndim` (None: any, checked before by check_token_shape), with a dtype in
    `dtypes` and on the device of `like`."""
    _check_dense(name, t)
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got {_describe(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {_describe(t)}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} must be on {like.device} like the hidden states, got {_describe(t)}")


def token_dims(name, hidden):
    """The tokens' shape of hidden [..., H]: its leading dimensions (a model's [B, T, H] hidden states have [B, T])."""
    _check_dense(name, hidden)
    if hidden.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dimensions ([..., H]: the tokens, then H), got "
                         f"{_describe(hidden)}")
    return hidden.shape[:-1]


def check_token_shape(name, t, tokens, *, width=None):
    """An optional tensor with one entry per token of hidden (shape `tokens`, its leading dimensions), or with
    `width` named, one row per token ([*tokens, width]). Checked before the other checks, which then describe
    the tensors as given; `as_rows` flattens them once all are checked."""
    if t is None:
        return
    _check_dense(name, t)
    if t.dim() != len(tokens) + (width is not None) or t.shape[:len(tokens)] != tokens:
        expected = list(tokens) + ([] if width is None else [width])
        raise ValueError(f"{name} must have shape [{', '.join(map(str, expected))}] (one entry per token of hidden), "
                         f"got {_describe(t)}")


def as_rows(t, tokens):
    """`t` (checked by check_token_shape; None stays None) flattened over the tokens: the ops compute on rows."""
    return None if t is None else t.reshape(math.prod(tokens), *t.shape[len(tokens):])


def check_linear(hidden_name, hidden, weight_name, weight):
    """hidden [..., H] and weight [V, H]: floating, same dtype and device, matching H, V >= 1."""
    check_tensor(hidden_name, hidden, ndim=None, dtypes=FLOAT_DTYPES)
    check_tensor(weight_name, weight, ndim=2, like=hidden)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{weight_name} must have the dtype of {hidden_name} ({hidden.dtype}), got {weight.dtype}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{weight_name} must be [V, H] with H = {hidden_name}.shape[-1] = {hidden.shape[-1]}, "
            f"got {_describe(weight)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{weight_name} must have at least one row (vocabulary size V >= 1), got {_describe(weight)}")


def check_bias(name, bias, weight_name, weight):
    """An optional bias [V] of the linear head whose weight [V, H] is `weight`: its dtype, on its device."""
    if bias is None:
        return
    check_tensor(name, bias, ndim=1, like=weight)
    if bias.shape[0] != weight.shape[0] or bias.dtype != weight.dtype:
        raise ValueError(f"{name} must be [{weight.shape[0]}] of dtype {weight.dtype} (one entry per row of "
                         f"{weight_name}), got {_describe(bias)}")


def check_per_token(name, t, like, *, dtypes):
    """An optional per-token tensor (its shape checked by check_token_shape) with a dtype in `dtypes` on the device
    of `like`; a constant of the loss (check_constant)."""
    if t is None:
        return
    check_tensor(name, t, ndim=None, dtypes=dtypes, like=like)
    check_constant(name, t)


def check_constant(name, t):
    """ValueError where an optional tensor that is a constant of the loss requires grad: it would silently get no
    gradient."""
    if t is not None and t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} requires grad, but it is a constant of the loss and gets no gradient: pass "
                         f"{name}.detach()")


def out_of_range_targets(target, ignore_index, vocab):
    """[N] bool: the targets (int64) that are neither a class of the vocabulary nor ignore_index. Data-dependent, so
    it runs in the loss's Function on plain tensors (under torch.func.vmap the caller's tensors are batched, and
    cannot be), and is read with the live rows (TokenRows.counting): one wait for the device serves both."""
    return (target != ignore_index) & ((target < 0) | (target >= vocab))


def refuse_targets(target, out_of_range, ignore_index, vocab):
    """The ValueError for targets that out_of_range_targets found."""
    bad = int(target[out_of_range][0])
    raise ValueError(f"target values must lie in [0, {vocab}) or equal ignore_index={ignore_index}; found {bad}")


def check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_softcap(softcap):
    """None (no cap) or a positive finite number: the logit soft cap c of c * tanh(z / c)."""
    if softcap is not None and not (is_finite_real(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a positive finite number (a model's final_logit_softcapping), "
                         f"got {softcap!r}")


def check_label_smoothing(label_smoothing):
    """A real number in [0, 1] (TypeError for another type, ValueError outside): the share eps of the uniform
    distribution in the smoothed target, (1 - eps) onehot(y) + eps / V, as torch's cross_entropy takes it."""
    if not is_real(label_smoothing):
        raise TypeError(f"label_smoothing must be a real number in [0, 1], got {label_smoothing!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing!r}")
