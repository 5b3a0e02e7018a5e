"""Slow, obviously correct float64 versions of the fused linear losses, for tests.

They materialise the full [N, V] logits in float64 and follow the definitions line by line. Like the ops, they
take hidden states [..., H] of any leading shape, with per-token arguments of that shape ("none" returns it).
"""
import torch


def _flat(t):
    """A per-token tensor of the tokens' shape as a vector (None stays None)."""
    return None if t is None else t.reshape(-1)


def _reduce(per_token, counted, reduction, tokens):
    if reduction == "none":
        return per_token.reshape(tokens)
    total = per_token.sum()
    return total if reduction == "sum" else total / max(int(counted.sum()), 1)


def _soft_capped(logits, softcap):
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def _head_logits(hidden, weight, bias, softcap):
    """float64 logits hidden @ weight.T + bias of a linear head, then soft-capped (as HF models cap lm_head(h))."""
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    return _soft_capped(logits, softcap)


def linear_cross_entropy_reference(hidden, weight, target, *, token_weight=None, bias=None, ignore_index=-100,
                                   reduction="mean", softcap=None, label_smoothing=0.0):
    """float64 sum/mean/none of w_t * (logsumexp(z_t) - z_t[y_t]) over non-ignored tokens (z soft-capped,
    softcap * tanh(z / softcap), with a softcap); with label_smoothing eps, z_t[y_t] is
    (1 - eps) z_t[y_t] + eps mean_v z_t[v], the cross-entropy against the target (1 - eps) onehot(y_t) + eps / V."""
    tokens = hidden.shape[:-1]
    logits = _head_logits(hidden.flatten(0, -2), weight, bias, softcap)
    target, token_weight = _flat(target).long(), _flat(token_weight)  # a uint8 target must not see -100 as 156
    counted = target != ignore_index
    safe_target = torch.where(counted, target, torch.zeros_like(target))
    target_logit = logits.gather(1, safe_target[:, None]).squeeze(1)
    if label_smoothing:   # (only then: a bias of -inf makes the mean -inf, and 0 * -inf NaN)
        target_logit = (1 - label_smoothing) * target_logit + label_smoothing * logits.mean(dim=1)
    ce = torch.logsumexp(logits, dim=1) - target_logit
    if token_weight is not None:
        ce = ce * token_weight.double()
    return _reduce(torch.where(counted, ce, torch.zeros_like(ce)), counted, reduction, tokens)


def linear_kl_div_reference(hidden, weight, ref_hidden, ref_weight, *, bias=None, ref_bias=None, token_weight=None,
                            mask=None, reduction="mean", softcap=None):
    """float64 sum/mean/none of w_t * KL(P_t || Q_t) over masked-in tokens, Q = softmax(hidden @ weight.T + bias),
    P = softmax(ref_hidden @ ref_weight.T + ref_bias); P is not differentiated (both logits soft-capped with a
    softcap)."""
    tokens = hidden.shape[:-1]
    hidden, ref_hidden = hidden.flatten(0, -2), ref_hidden.flatten(0, -2)
    token_weight, mask = _flat(token_weight), _flat(mask)
    log_q = torch.log_softmax(_head_logits(hidden, weight, bias, softcap), dim=1)
    log_p = torch.log_softmax(_head_logits(ref_hidden.detach(), ref_weight.detach(),
                                           None if ref_bias is None else ref_bias.detach(), softcap), dim=1)
    kl = torch.where(log_p == float("-inf"), 0.0, log_p.exp() * (log_p - log_q)).sum(1)  # 0 log 0 = 0 (a -inf bias)
    if token_weight is not None:
        kl = kl * token_weight.double()
    counted = torch.ones_like(kl, dtype=torch.bool) if mask is None else mask
    return _reduce(torch.where(counted, kl, torch.zeros_like(kl)), counted, reduction, tokens)
