"""Slow, obviously correct paged attention: the meaning that every fast path is checked against.

For each row it gathers the context token by token through the row's block table, then runs plain
causal softmax attention in float64, one query and one head at a time. Only for tests and small shapes.
With a sliding window W, a query sees only the last W positions up to its own. With a soft cap c (Gemma 2's
attn_logit_softcapping), the scaled scores s become c * tanh(s / c) before the mask and the softmax. With sinks
(gpt-oss), head h's softmax has one more score, sinks[h], whose value is zero: the weights of the keys sum to less
than one.
"""
import torch


def paged_attention_reference(q, k_cache, v_cache, block_table, seq_lens, cu_q_lens, scale=None, window=None,
                              softcap=None, sinks=None):
    """Float64 attention of packed queries over a paged KV pool (same arguments as `fastalign.ops`).

    Query i of row r sits at position seq_lens[r] - q_len_r + i and attends to positions <= it; with a window
    W (None: no window), only to those > position - W (Hugging Face's sliding window). softcap c (None: none)
    replaces the scores s = scale * q . k by c * tanh(s / c) (Hugging Face's eager Gemma 2 attention). sinks [num_heads]
    (None: none) joins each head's softmax as one more score with a zero value (Hugging Face's eager gpt-oss).
    Query head h reads KV head h // (num_heads // num_kv_heads). Returns [T, num_heads, head_dim] float64.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.zeros(q.shape, dtype=torch.float64)
    for r in range(block_table.shape[0]):
        seq_len = int(seq_lens[r])
        start, end = int(cu_q_lens[r]), int(cu_q_lens[r + 1])
        slots = [(int(block_table[r, p // block_size]), p % block_size) for p in range(seq_len)]
        k = torch.stack([k_cache[b, o] for b, o in slots]).double() if slots else None  # [S, Hkv, D]
        v = torch.stack([v_cache[b, o] for b, o in slots]).double() if slots else None
        for i in range(end - start):
            position = seq_len - (end - start) + i
            first = 0 if window is None else max(0, position - window + 1)
            for h in range(num_heads):
                keys, values = k[first: position + 1, h // group], v[first: position + 1, h // group]
                scores = keys @ q[start + i, h].double() * scale
                if softcap is not None:
                    scores = softcap * torch.tanh(scores / softcap)
                if sinks is not None:
                    scores = torch.cat([scores, sinks[h].double().reshape(1)])
                weights = torch.softmax(scores, dim=0)[: len(values)]
                out[start + i, h] = weights @ values
    return out
