"""Pure-torch implementations of the fused ops: the linear losses chunked over rows, so that memory stays
bounded by a chunk of rows x vocabulary whatever the number of tokens, and the gated activation. Used on CPU tensors
and as `backend="torch"` anywhere. Same launcher contract as the Triton modules in `fastalign.kernels`."""
