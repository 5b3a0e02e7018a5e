"""Samplers draw for all rows in one call: the keyed sampler's draws do not depend on the batch they are
drawn in (what the equivalence tests rely on); the torch sampler's pools are independent draws from each
row's distribution."""
import torch

from fastalign.rain import KeyedSampler, TorchSampler
from fastalign.rain.sampling import draw_key, extend_key, seed_key, top_k_distribution


def test_keyed_draws_are_batch_invariant():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(7, 50, generator=g) * 2, dim=-1)
    keys = [draw_key(extend_key(seed_key(1), [i]), 3) for i in range(7)]
    sampler = KeyedSampler(seed=5)
    batched = sampler.draw(probs, keys)
    assert batched == [sampler.draw(probs[i:i + 1], [keys[i]])[0] for i in range(7)]
    assert sampler.draw(probs[[3, 1]], [keys[3], keys[1]]) == [batched[3], batched[1]]
    assert sampler.draw_many(probs, keys, 4) == [[t] for t in batched] and sampler.repeatable
    assert len(set(batched)) > 2


def test_torch_pools_follow_each_rows_distribution():
    probs = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.0, 0.0, 0.25, 0.75]])
    pools = TorchSampler(seed=0).draw_many(probs, [0, 0], 4000)
    assert not TorchSampler.repeatable
    for row, pool in zip(probs, pools):
        freq = torch.bincount(torch.tensor(pool), minlength=4).float() / len(pool)
        assert torch.allclose(freq, row, atol=0.03), (freq, row)


def test_top_k_distribution_keeps_each_probability_with_its_token():
    ids, probs = top_k_distribution(torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]]), 3)
    assert ids.tolist() == [[1, 2, 3]]
    assert torch.allclose(probs[0], torch.softmax(torch.tensor([3.0, 1.0, 2.0]), dim=0))
