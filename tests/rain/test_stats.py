"""RainStats: how per-prompt counters add up to a run's, and what a record of them holds."""
import json

from fastalign.rain.stats import RainStats


def stats(base):
    s = RainStats(committed_tokens=base, iterations=base + 1, model_calls=base + 2, required_calls=base + 3,
                  rows=base + 4, tokens=base + 5, recomputed_tokens=base + 6, wall_seconds=base + 7.0)
    for i, part in enumerate(s.minimum):
        s.minimum[part] = base + i
    for i, phase in enumerate(s.seconds):
        s.seconds[phase] = base + i / 4
    return s


def test_add_sums_every_counter_but_calls_and_wall_time():
    total = stats(10).add(stats(100))
    assert (total.committed_tokens, total.iterations, total.required_calls, total.rows, total.tokens,
            total.recomputed_tokens) == (110, 112, 116, 118, 120, 122)
    assert list(total.minimum.values()) == [110, 112, 114, 116, 118]
    assert list(total.seconds.values()) == [110.0, 110.5, 111.0, 111.5]
    assert (total.model_calls, total.wall_seconds) == (12, 17.0)     # calls were shared: not additive


def test_add_sums_runs_host_seconds_which_a_prompt_has_not():
    """A run's seconds add "host", the wall time no phase took; a prompt's have none (torchrun's summary adds runs)."""
    run = RainStats()
    run.seconds["host"] = 2.0
    assert "host" not in RainStats().seconds
    assert RainStats().add(run).add(run).seconds == dict(expand=0.0, simulate=0.0, evaluate=0.0, embed=0.0, host=4.0)


def test_record_holds_the_derived_ratios():
    record = RainStats(committed_tokens=4, model_calls=2, rows=6, tokens=20,
                       minimum=dict(prompt=3, tree=2, rollout=2, judge=2, shared_prefix=1)).as_dict()
    assert (record["minimum_tokens"], record["rows_per_call"], record["tokens_per_committed_token"],
            record["tokens_over_minimum"]) == (10, 3.0, 5.0, 2.0)
    assert record["minimum"]["prompt"] == 3 and set(record["seconds"]) == set(RainStats().seconds)
    empty = RainStats().as_dict()   # ratios with nothing to divide by: null in the JSON record, not NaN
    assert empty["rows_per_call"] == 0.0
    assert empty["tokens_over_minimum"] is None and empty["tokens_per_committed_token"] is None
    json.dumps(empty, allow_nan=False)
