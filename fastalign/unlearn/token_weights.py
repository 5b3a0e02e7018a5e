"""Per-token weights that turn the two answer streams of unlearning into one signed cross-entropy.

SPEC §1: L_fgt = mean_i -(1/|A_i|) sum_{t in A_i} CE_t (gradient ascent on forget answers) and
L_rdn = mean_j (1/|A_j|) sum_{t in A_j} CE_t (descent on mismatched answers). With the weights below,
linear_cross_entropy(h, W, y, token_weight=w, reduction="sum") over the concatenated streams equals
w_fgt * L_fgt + w_rdn * L_rdn exactly.
"""

import torch

from fastalign.ops.checks import is_finite_real


def _stream_weights(name, answer_mask, sign_weight):
    """sign_weight / (|A_i| * B) on the answer tokens of each row i of an [B, T] mask, 0 elsewhere."""
    if not isinstance(answer_mask, torch.Tensor) or answer_mask.dim() != 2 or answer_mask.dtype != torch.bool:
        got = (f"shape {tuple(answer_mask.shape)}, dtype {answer_mask.dtype}"
               if isinstance(answer_mask, torch.Tensor) else type(answer_mask).__name__)
        raise TypeError(f"{name} must be a [batch, tokens] bool tensor, got {got}")
    answer_tokens = answer_mask.sum(1, keepdim=True)
    per_row = sign_weight / (answer_tokens.clamp(min=1).to(torch.float32) * max(answer_mask.shape[0], 1))
    return torch.where(answer_mask, per_row, torch.zeros((), device=answer_mask.device)).flatten()


def unlearning_token_weights(forget_mask: torch.Tensor | None, mismatch_mask: torch.Tensor | None, *,
                             forget_weight: float = 0.5, mismatch_weight: float = 1.0) -> torch.Tensor:
    """float32 token weights for the forget stream followed by the mismatch stream, flattened row-major.

    forget_mask [B_f, T_f] and mismatch_mask [B_r, T_r] are bool, True at rows whose *target* is an answer
    token (aligned with the shifted targets: row t predicts token t + 1). Either may be None (stream absent).
    Forget answer tokens get -forget_weight / (|A_i| * B_f), mismatch answer tokens +mismatch_weight /
    (|A_j| * B_r), every other token 0; a sequence without answer tokens contributes 0 (never NaN). Both
    weights are finite numbers >= 0 (SPEC §1's w_fgt and w_rdn): the streams give the signs.
    """
    for name, value in (("forget_weight", forget_weight), ("mismatch_weight", mismatch_weight)):
        if not is_finite_real(value) or value < 0:   # the stream gives the sign
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    parts = []
    if forget_mask is not None:
        parts.append(_stream_weights("forget_mask", forget_mask, -float(forget_weight)))
    if mismatch_mask is not None:
        parts.append(_stream_weights("mismatch_mask", mismatch_mask, float(mismatch_weight)))
    if not parts:
        raise ValueError("unlearning_token_weights needs forget_mask, mismatch_mask or both; got neither")
    if len(parts) == 2 and parts[0].device != parts[1].device:
        raise ValueError(f"forget_mask is on {parts[0].device} but mismatch_mask on {parts[1].device}")
    return torch.cat(parts)
