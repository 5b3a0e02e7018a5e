"""Pure-torch implementations of the fused ops: the linear losses chunked over rows, so that memory stays
bounded by a chunk of rows x vocabulary whatever the number of tokens, the gated activation, and the step of
fastalign.KahanAdamW (chunked too). Used on CPU tensors and as `backend="torch"` anywhere. Same launcher contract as
the Triton modules in `fastalign.kernels`."""
