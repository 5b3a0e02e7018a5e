"""One layer's attention on the paged pool, as both paged model runners compute it: the new tokens' K/V written
into the layer's blocks, then paged attention of the batch's rows over them."""
from fastalign.ops.paged_attention import (check_paged_attention, check_write_kv, paged_attention_unchecked,
                                          write_kv_unchecked)


def pool_attention(index, q, k, v, pool, batch, *, scale, window, softcap, backend, sinks=None, rotation=None):
    """The attention output [T, q_heads, head_dim] of q [T, q_heads, head_dim] over pool layer `index`, once the new
    tokens' k, v [T, kv_heads, head_dim] (rotated as the layer rotates them) are written there; k and v None: the
    layer reads the K/V that an earlier layer of this forward wrote to `index` (Gemma 4's shared K/V). With
    rotation = (rotate, cos, sin) (fastalign.runtime.rotary; only with k and v), q and k come unrotated, and rotate
    rotates them and stores k and v (one kernel on the Triton backend). With the layer's
    attention sinks [q_heads] where it has them (gpt-oss). Only the first pool layer of each shape has its arguments
    go through the ops' shape, dtype and device checks (~20 us of host time per layer): every later layer's are
    shaped as that one's; the index metadata comes from the span tree's plan, whose contents the runtime tests hold
    to the Hugging Face model's outputs."""
    k_cache, v_cache = pool.k(index), pool.v(index)
    shared_prefix = batch.shared_prefix
    if k is not None:
        if index in pool.first_of_shape:
            check_write_kv(k, v, k_cache, v_cache, batch.slot_mapping, validate=False)
            check_paged_attention(q, k_cache, v_cache, batch.block_table, batch.seq_lens, batch.cu_q_lens,
                                  scale=scale, backend=backend, validate=False, shared_prefix=shared_prefix,
                                  window=window, softcap=softcap, sinks=sinks)
        if rotation is None:
            write_kv_unchecked(k, v, k_cache, v_cache, batch.slot_mapping)
        else:
            rotate, cos, sin = rotation
            q, k = rotate(q, k, cos, sin, store=(v, k_cache, v_cache, batch.slot_mapping))
        if len(batch.host_extra_src):
            write_kv_unchecked(k[batch.extra_src], v[batch.extra_src], k_cache, v_cache, batch.extra_dst)
    return paged_attention_unchecked(q, k_cache, v_cache, batch.block_table, batch.seq_lens, batch.cu_q_lens,
                                     scale=float(scale), backend=backend, shared_prefix=shared_prefix, window=window,
                                     softcap=softcap, sinks=sinks)
