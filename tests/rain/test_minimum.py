"""The tree's minimum: every required prefix counts once, under the part that needed it first."""
from fastalign.rain.ledger import EMPTY_KEY
from fastalign.rain.minimum import RequiredPrefixes, chain_key
from fastalign.rain.stats import RainStats


def test_add_key_counts_a_new_sequence_once_under_its_part():
    required, stats = RequiredPrefixes(), RainStats()
    key = required.add(stats, "prompt", EMPTY_KEY, [5, 6])
    assert key == chain_key(EMPTY_KEY, [5, 6])
    leaf = chain_key(key, [7])
    assert required.new_positions(key, [7, 8]) == [True, True]
    required.add_key(stats, "tree", leaf)
    required.add_key(stats, "tree", leaf)
    required.add(stats, "rollout", key, [7, 8])              # only the prefix ending in 8 is new
    assert required.new_positions(key, [7, 8]) == [False, False]
    assert stats.minimum == {"prompt": 2, "tree": 1, "rollout": 1, "judge": 0, "shared_prefix": 0}
    required.add_key(stats, "judge", chain_key(leaf, [9]))   # under the part named, whichever it is
    assert stats.minimum == {"prompt": 2, "tree": 1, "rollout": 1, "judge": 1, "shared_prefix": 0}
