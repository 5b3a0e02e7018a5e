"""Where the KL term's reference distribution P comes from: three interchangeable sources.

Each is called with the normal rows of a batch, their indices into the normal set and the policy's
lm_head weight and bias (None for an lm_head without one), and returns (reference hidden states at the answer
targets [N, H], reference lm_head weight, reference lm_head bias or None); the KL op then forms
P = softmax(hidden_ref @ weight_ref.T + bias_ref) without materialising it.

- FrozenCopyReference: a frozen copy of the model as it was (memory: a second model).
- AdapterDisabledReference: the same PEFT model with its adapter switched off (no second copy).
- CachedReference: the reference hidden states of the whole normal set, computed once up front; no
  reference model is kept, which is valid only while the lm_head (weight and bias) the cache is paired with
  never changes.
"""
from __future__ import annotations

import copy
import itertools
from typing import Literal, Sequence, get_args

import torch

from fastalign.base_model import base_causal_lm
from fastalign.eval_mode import eval_mode
from fastalign.peft_adapters import AdapterOff
from fastalign.unlearn.batching import TokenBatch, collate
from fastalign.unlearn.encoding import EncodedExample
from fastalign.unlearn.models import at_answer_targets, causal_lm_parts, cast_weights, final_hidden_states

ReferenceMode = Literal["copy", "adapter", "cached"]   # where the KL's reference distribution comes from
REFERENCE_MODES = get_args(ReferenceMode)
CacheStorage = Literal["device", "host"]   # where a cached reference lives
CACHE_STORAGES = get_args(CacheStorage)


class FrozenCopyReference:
    """A frozen deep copy of the model taken at construction, optionally cast to another dtype.

    matmul_dtype (the copy of a policy that keeps fp32 weights and computes under autocast, precision
    'bf16-mixed'): only the weights of its linear layers are stored in that dtype, its embeddings and norms keep
    theirs. Autocast rounds every linear layer's weight to its compute dtype anyway, so under the policy's autocast
    this copy computes what the policy computed before training, in about half the memory. A copy cast whole to
    bf16 would be another model: its residual stream, embeddings and norms would run in bf16 while the policy's
    run in fp32 (KL(P || Q) > 0 at step 0, and a KL gradient pulling the policy toward the bf16 model). A linear
    layer whose weight is tied to the input embeddings (a tied lm_head) keeps its dtype, as the embeddings do.
    The copy holds normal tensors even when made under torch.inference_mode(): the KL's backward saves its lm_head
    weight, which autograd cannot do for an inference tensor.
    """

    def __init__(self, model, dtype: torch.dtype | None = None, matmul_dtype: torch.dtype | None = None):
        with torch.inference_mode(False):
            self.model = copy.deepcopy(base_causal_lm(model)).requires_grad_(False).eval()
            if dtype is not None:
                cast_weights(self.model, dtype)
            if matmul_dtype is not None:
                embeddings = self.model.get_input_embeddings()
                tied = {id(p) for p in embeddings.parameters()} if embeddings is not None else set()
                for module in self.model.modules():
                    if isinstance(module, torch.nn.Linear) and id(module.weight) not in tied:
                        module.to(matmul_dtype)
        self.decoder, self.lm_head = causal_lm_parts(self.model)

    @torch.no_grad()
    def __call__(self, tokens: TokenBatch, normal_index: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None):
        hidden = at_answer_targets(final_hidden_states(self.decoder, tokens), tokens)
        return hidden, self.lm_head.weight, self.lm_head.bias


class AdapterDisabledReference:
    """The policy itself with its PEFT adapter disabled: the base model the adapter was trained on top of.

    It runs in eval mode, as the frozen copy and the cache do: the policy trains in train mode, and the
    dropout of a model that has some (OPT's 0.1) would otherwise make P a random draw instead of the
    original model's distribution. Each module's mode is restored afterwards.
    """

    def __init__(self, model: torch.nn.Module):
        if not (hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")):
            raise TypeError(f"reference='adapter' needs a PEFT model with an adapter (e.g. LoRA), got "
                            f"{type(model).__name__}; train with LoRA or choose reference='copy' or 'cached'")
        self.model = model
        self._adapter_off = AdapterOff(model)

    @torch.no_grad()
    def __call__(self, tokens: TokenBatch, normal_index: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None):
        with eval_mode(self.model), self._adapter_off():
            decoder, lm_head = causal_lm_parts(self.model)
            hidden = at_answer_targets(final_hidden_states(decoder, tokens), tokens)
            return hidden, lm_head.weight, lm_head.bias


class CachedReference:
    """Reference hidden states of every normal example, computed once, paired with a frozen lm_head.

    storage: where the cache lives through the run. 'device' (the lm_head's device) costs nothing per step; 'host'
    keeps it in pageable host memory and copies each batch's rows to the device asynchronously (through a page-locked
    buffer beside a CUDA device), for a normal set whose cache (answer tokens x hidden size) does not fit beside the
    model. The cache itself is not page-locked: torch's pinned allocator rounds it up to a power of two (an 8.8 GB
    cache would lock 16 GiB of host memory, beyond what num_bytes reports).

    At every call the lm_head weight and bias the objective passes in are checked: neither may require a
    gradient, and each must hold the values the cache was computed with (an optimizer step or any in-place
    change would alter them); otherwise the KL term would silently compare against a different distribution, so
    the call raises. The check compares exact fingerprints of the values (weight_fingerprint): under FSDP the
    weight seen in the forward is a freshly gathered tensor each step, possibly in FSDP's compute dtype, and it is
    still valid when its values are unchanged. A fingerprint reads the whole weight and waits for the device (525 MB
    and a sync a step at Llama-3.2-1B), so a call skips it where the tensor is the one last fingerprinted with no
    write since that bumps its version counter (_same_as_checked; the writes that do not: _version_sees_writes).
    """

    def __init__(self, model, normal: Sequence[EncodedExample], *, batch_size: int = 8, filler_id: int = 0,
                 storage: CacheStorage = "device", compute_dtype: torch.dtype | None = None):
        """compute_dtype: run the decoder with every weight in that dtype, on a copy made for the cache (FSDP's
        mixed precision computes the policy so, norms and embeddings included), so that P is what the policy
        computed before training."""
        if storage not in CACHE_STORAGES:
            raise ValueError(f"storage must be one of {CACHE_STORAGES}, got {storage!r}")
        decoder, lm_head = causal_lm_parts(model)
        weight = lm_head.weight
        if compute_dtype is not None:
            decoder = cast_weights(copy.deepcopy(decoder), compute_dtype)
        self._fingerprints = {name: _baselines(name, t) for name, t in (("weight", weight), ("bias", lm_head.bias))}
        self._checked = {"weight": None, "bias": None}   # name -> (tensor last fingerprinted, its version then)
        batches = [collate(normal[start:start + batch_size], filler_id) for start in range(0, len(normal), batch_size)]
        # example i's rows are hidden[offsets[i]:offsets[i + 1]], counted on the host before anything runs
        self.offsets = [0, *itertools.accumulate(n for b in batches for n in b.target_mask.sum(1).tolist())]
        self.forward_masks = [b.attention_mask for b in batches]  # of the decoder forwards that built it (compute.py)
        self.hidden = None if batches else weight.new_empty((0, weight.shape[1]))
        with torch.no_grad(), eval_mode(decoder):
            for batch, start in zip(batches, self.offsets[::batch_size]):
                tokens = batch.to(weight.device)
                rows = at_answer_targets(final_hidden_states(decoder, tokens), tokens)
                if self.hidden is None:   # its dtype is the decoder's output's
                    on_host = storage == "host" and weight.device.type != "cpu"
                    self.hidden = torch.empty((self.offsets[-1], rows.shape[1]), dtype=rows.dtype,
                                              device="cpu" if on_host else weight.device)
                self.hidden[start:start + len(rows)].copy_(rows)

    @property
    def num_bytes(self) -> int:
        return self.hidden.numel() * self.hidden.element_size()

    def __call__(self, tokens: TokenBatch, normal_index: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None):
        for name, t in (("weight", weight), ("bias", bias)):
            self._checked[name] = _check_unchanged(name, t, self._fingerprints[name], self._checked[name])
        if not normal_index.numel():
            return weight.new_zeros((0, weight.shape[1])), weight, bias
        indices = normal_index.tolist()
        count = len(self.offsets) - 1
        for i in (min(indices), max(indices)):
            if not 0 <= i < count:
                raise IndexError(f"normal_index: expected values in [0, {count}) (the cached normal examples), got {i}")
        parts = [self.hidden[self.offsets[i]:self.offsets[i + 1]] for i in indices]
        if self.hidden.device == weight.device:
            return torch.cat(parts), weight, bias
        # gathered into page-locked memory, whose copy to the device does not hold up the host
        staged = torch.empty((sum(map(len, parts)), self.hidden.shape[1]), dtype=self.hidden.dtype,
                             pin_memory=weight.device.type == "cuda")
        return torch.cat(parts, out=staged).to(weight.device, non_blocking=True), weight, bias


def _check_frozen(name: str, t: torch.Tensor):
    if t.requires_grad:
        raise ValueError(f"reference='cached' needs a frozen lm_head (its {name} requires grad): the cached "
                         "reference hidden states are only valid with the lm_head they were computed with; "
                         "freeze it (and tied input embeddings) or choose reference='copy'")


def _baselines(name: str, t: torch.Tensor | None) -> dict[torch.dtype, int] | None:
    """The fingerprints of the lm_head's frozen `name` tensor (None: the lm_head has none) in every dtype it may
    arrive in: the forward may see it cast to a compute dtype (FSDP mixed precision)."""
    if t is None:
        return None
    _check_frozen(name, t)
    return {dtype: weight_fingerprint(t, dtype) for dtype in {t.dtype, torch.float32, torch.bfloat16, torch.float16}}


def _check_unchanged(name: str, t: torch.Tensor | None, baselines: dict[torch.dtype, int] | None,
                     checked: tuple[torch.Tensor, int] | None) -> tuple[torch.Tensor, int] | None:
    """`t` (the lm_head's weight or bias as the objective sees it) is frozen and holds its values at caching time.
    Returns (t, its version) to pass as `checked` to the next call, which then skips the fingerprint where
    _same_as_checked."""
    if (t is None) != (baselines is None):
        raise RuntimeError(f"reference='cached': the lm_head {'lost' if t is None else 'gained'} its {name} after "
                           "the reference was cached")
    if t is None:
        return None
    _check_frozen(name, t)
    expected = baselines.get(t.dtype)
    if expected is None:
        raise TypeError(f"reference='cached': the lm_head {name} arrived as {t.dtype}; the cache knows "
                        f"{sorted(str(d) for d in baselines)}")
    if not _same_as_checked(t, checked) and weight_fingerprint(t) != expected:
        raise RuntimeError(f"reference='cached': the lm_head {name} was modified after the reference was cached")
    return (t, t._version) if _version_sees_writes(t) else None


def _version_sees_writes(t: torch.Tensor) -> bool:
    """Whether the version counter of `t`, which it shares with the parameter it was detached from, counts the writes
    that could change it. Every in-place op bumps it (copy_, load_state_dict's copy_, an optimizer's step), and
    `p.data = x` gives the parameter other memory. Writes that bypass it go unseen by _same_as_checked: in-place
    writes through a `p.data` alias (a version counter of its own), through numpy or DLPack, by kernels given the raw
    pointer, and FSDP's all-gathers into the parameter it keeps between steps (under
    torch.autograd._unsafe_preserve_version_counter), so a process in a distributed group always fingerprints. An
    inference tensor keeps no version."""
    return not (t.is_inference() or torch.distributed.is_available() and torch.distributed.is_initialized())


def _same_as_checked(t: torch.Tensor, checked: tuple[torch.Tensor, int] | None) -> bool:
    """Whether `t` is the memory of the tensor `checked` holds (kept alive there: no other tensor can have its
    address), in the same layout and dtype, with no in-place write since (_version_sees_writes)."""
    if checked is None or not _version_sees_writes(t):
        return False
    held, version = checked
    return (t.data_ptr() == held.data_ptr() and t.device == held.device and t.dtype == held.dtype
            and t.shape == held.shape and t.stride() == held.stride() and t._version == version)


_INTEGER_VIEWS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def weight_fingerprint(weight: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    """The sum of the bit patterns of `weight` (cast to `dtype`) read as integers, wrapping at 2**64.

    Integer addition is exact and associative, so the same values give the same number whatever the
    summation order, device kernel or memory layout; changing any element changes it. Rows are summed
    in slices so that the int64 temporaries stay small next to the weight.
    """
    dtype = weight.dtype if dtype is None else dtype
    flat = weight.detach().reshape(weight.shape[0], -1)
    rows = max(1, (1 << 24) // max(flat.shape[1], 1))
    sums = [part.to(dtype).contiguous().view(_INTEGER_VIEWS[dtype.itemsize]).sum(dtype=torch.int64)
            for part in flat.split(rows)]
    return int(torch.stack(sums).sum()) if sums else 0
