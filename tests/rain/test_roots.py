"""Where the run's starting sequences are cut: at every prefix where one of them parts from or ends
inside another, and nowhere else."""
from fastalign.rain.ledger import EMPTY_KEY, prefix_keys
from fastalign.rain.roots import RootPlan


def cut_points(plan):
    return [(root.cuts, head.cuts) for root, head in plan.prompts]


def test_cuts_where_sequences_part_and_where_one_ends():
    judge_prefix = [1, 50, 51]                       # shares the BOS token 1 with every prompt
    prompts = [([1, 7, 8, 9], [7, 8, 9]),
               ([1, 7, 8, 4], [7, 8, 4]),
               ([1, 7, 8], [7, 8]),                  # ends where the first two part
               ([1, 2], [2])]
    plan = RootPlan(judge_prefix, [], prompts)
    assert plan.judge_prefix.cuts == [1, 3]
    assert cut_points(plan) == [([1, 3, 4], [1, 3, 5, 6]),
                                ([1, 3, 4], [1, 3, 5, 6]),
                                ([1, 3], [1, 3, 5]),
                                ([1, 2], [1, 3, 4])]
    # a cut's entry is kept until every sequence through it has started
    (root0, _), (root1, _) = plan.prompts[:2]
    assert plan.started(root0) == [root0.keys[3]]
    assert root1.keys[2] not in plan.started(root1)


def test_generation_prefix_is_shared_and_lone_prompts_are_not_cut():
    plan = RootPlan([1, 50], [1, 60, 61], [([5, 6], [5, 6]), ([9], [9])])
    (root_a, head_a), (root_b, head_b) = plan.prompts
    assert root_a.tokens == [1, 60, 61, 5, 6] and root_a.cuts == [1, 3, 5] and root_b.cuts == [1, 3, 4]
    assert head_a.cuts == [1, 2, 4] and head_b.cuts == [1, 2, 3]


def test_empty_judge_prefix_has_no_cuts():
    plan = RootPlan([], [], [([1, 5], [5]), ([1, 6], [6])])
    assert plan.judge_prefix.cuts == []
    assert [head.cuts for _, head in plan.prompts] == [[1], [1]]


def test_lone_prompt_is_not_cut_where_the_generation_prefix_ends():
    """Only one sequence passes through the generation prefix: its end is no place where sequences part."""
    plan = RootPlan([1, 50], [1, 60, 61], [([5, 6], [5, 6])])
    (root, head), = plan.prompts
    assert root.cuts == [1, 5] and head.cuts == [1, 2, 4]


def test_keys_are_the_ledger_keys_of_each_whole_sequence():
    """A head's keys continue the judge prefix's (its tokens may begin like a generation root)."""
    plan = RootPlan([1, 50], [], [([1, 5], [1, 5])])
    (root, head), = plan.prompts
    for seq in (plan.judge_prefix, root, head):
        assert seq.keys == list(prefix_keys(EMPTY_KEY, seq.tokens))
    assert head.tokens == [1, 50, 1, 5] and head.keys[-1] != root.keys[-1]
