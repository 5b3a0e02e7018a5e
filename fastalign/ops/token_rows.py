"""Which tokens reach the matmul, and how per-token losses are reduced and their gradients scattered.

Shared by the fused linear losses. A token is *counted* when its target is not ignore_index (cross-entropy)
or its mask is True (KL); "mean" divides by the number of counted tokens (0 counted tokens give a loss
of 0, never NaN). A counted token with weight 0 contributes exactly 0, so it is dropped before the
matmul too: only *live* tokens (counted, non-zero weight) are computed.
"""


class TokenRows:
    """The live rows of an [N, ...] token stream, their weights and the reduction that follows.

    rows is None when every token is live, so that no copy of the hidden states is made.
    """

    def __init__(self, counted, token_weight, reduction, acc_dtype):
        self.num_tokens = counted.shape[0]
        self.reduction = reduction
        live = counted if token_weight is None else counted & (token_weight != 0)
        self.rows = None if bool(live.all()) else live.nonzero().squeeze(1)
        # a copy, never the caller's buffer: the backward must see the weights of the forward even if the caller
        # refills that buffer (the next micro-batch) before backpropagating
        self.weight = None if token_weight is None else self.gather(token_weight).to(acc_dtype, copy=True)
        self.num_counted = counted.sum()

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

    def reduce(self, per_token):
        """Weights the live per-token losses and applies the reduction."""
        if self.weight is not None:
            per_token = per_token * self.weight
        if self.reduction == "none":
            return self.scatter(per_token, per_token.dtype)
        total = per_token.sum()
        if self.reduction == "sum":
            return total
        return total / self.num_counted.clamp(min=1).to(total.dtype)

    def grad_scale(self, grad_output, acc_dtype):
        """d(output)/d(per-token loss) of each live row: the upstream gradient times the token weight."""
        if self.reduction == "none":
            scale = self.gather(grad_output).to(acc_dtype)
        else:
            scale = grad_output.to(acc_dtype).expand(self.num_live)
            if self.reduction == "mean":
                scale = scale / self.num_counted.clamp(min=1).to(acc_dtype)
        if self.weight is not None:
            scale = scale * self.weight
        return scale.contiguous()
