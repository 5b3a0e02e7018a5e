"""Which tokens reach the matmul, and how per-token losses are reduced and their gradients scattered.

Shared by the fused linear losses. A token is *counted* when its target is not ignore_index (cross-entropy)
or its mask is True (KL); "mean" divides by the number of counted tokens (0 counted tokens give a loss
of 0, never NaN). A counted token with weight 0 contributes exactly 0, so it is dropped before the
matmul too: only *live* tokens (counted, non-zero weight) are computed.
"""
import torch


class TokenRows:
    """The live rows of an [N, ...] token stream, their weights and the reduction that follows.

    Built from a state of fixed shapes, which the forward returns for the backward to build it again (see
    func_transforms): row_weight [N] in the accumulation dtype (each counted token's weight, 0 at the others),
    num_counted (0-d), live_rows [N] int64 (the live rows' indices, then N as filler) and num_live, a 0-d int64
    tensor on the CPU: the backward knows how many rows live without waiting for the device. rows is None when
    every token is live, so that no copy of the hidden states is made.
    """

    def __init__(self, row_weight, num_counted, live_rows, num_live, reduction):
        self.num_tokens = row_weight.shape[0]
        self.reduction, self.row_weight, self.num_counted = reduction, row_weight, num_counted
        self.live_rows, self.live_count = live_rows, num_live
        live = int(num_live)
        self.rows = None if live == self.num_tokens else live_rows[:live]
        self.weight = self.gather(row_weight)

    @classmethod
    def counting(cls, counted, token_weight, reduction, acc_dtype, refused=None):
        """The TokenRows of the tokens where `counted` [N] is True, weighted by token_weight [N] (None: 1). Its
        row_weight is a copy, never the caller's buffer: the backward must see the weights of the forward even if
        the caller refills that buffer (the next micro-batch) before backpropagating.

        refused [N] bool (optional): tokens the caller refuses (e.g. targets outside the vocabulary), found in the
        same wait for the device as the live rows; None is returned when there is one, for the caller to raise."""
        row_weight = (counted.to(acc_dtype) if token_weight is None
                      else torch.where(counted, token_weight.to(acc_dtype), 0.0))
        n = row_weight.shape[0]
        live = row_weight != 0  # a NaN weight is live: its NaN loss must show
        if refused is not None:  # N + 1 more hits when any token is refused: more than N rows could give
            live = torch.cat([live, refused.any().expand(n + 1)])
        live = live.nonzero().squeeze(1)
        if live.numel() > n:
            return None
        live_rows = torch.cat([live, live.new_full((n - live.numel(),), n)])
        return cls(row_weight, counted.sum(), live_rows, torch.tensor(live.numel(), device="cpu"), reduction)

    def state(self):
        """(row_weight, num_counted, live_rows, num_live): what builds this TokenRows again."""
        return self.row_weight, self.num_counted, self.live_rows, self.live_count

    @property
    def num_live(self):
        return self.num_tokens if self.rows is None else self.rows.numel()

    def gather(self, t):
        """The live rows of a per-token tensor."""
        return t if self.rows is None else t.index_select(0, self.rows)

    def scatter(self, live_values, dtype):
        """[N, ...] tensor of `dtype` holding live_values at the live rows and zeros elsewhere."""
        if self.rows is None:
            return live_values.to(dtype)
        full = live_values.new_zeros((self.num_tokens,) + tuple(live_values.shape[1:]), dtype=dtype)
        return full.index_copy_(0, self.rows, live_values.to(dtype))

    def gradients(self, live_gradients, needs, hidden, weight, bias):
        """(d_hidden [N, H], d_weight, d_bias) in the inputs' dtypes from a launcher's (d_live, d_weight, d_bias) of
        the live rows, each or None; live_gradients None (no row lives): zeros for each gradient that needs,
        (need_hidden, need_weight, need_bias), asks for."""
        if live_gradients is None:
            return tuple(torch.zeros_like(t) if need else None for need, t in zip(needs, (hidden, weight, bias)))
        d_live, d_weight, d_bias = live_gradients
        return (None if d_live is None else self.scatter(d_live, hidden.dtype),
                None if d_weight is None else d_weight.to(weight.dtype),
                None if d_bias is None else d_bias.to(bias.dtype))

    def reduce(self, per_token):
        """Weights the live per-token losses and applies the reduction."""
        per_token = per_token * self.weight
        if self.reduction == "none":
            return self.scatter(per_token, per_token.dtype)
        total = per_token.sum()
        if self.reduction == "sum":
            return total
        return total / self.num_counted.clamp(min=1).to(total.dtype)

    def grad_scale(self, grad_output):
        """d(output)/d(per-token loss) of each live row, in the accumulation dtype: the upstream gradient times the
        token weight."""
        acc_dtype = self.row_weight.dtype
        if self.reduction == "none":
            scale = self.gather(grad_output).to(acc_dtype)
        else:
            scale = grad_output.to(acc_dtype).expand(self.num_live)
            if self.reduction == "mean":
                scale = scale / self.num_counted.clamp(min=1).to(acc_dtype)
        return (scale * self.weight).contiguous()
