"""PromptSearch's expansion: the priors of a node's children from what the engine drew."""
import math
import random
from types import SimpleNamespace

import pytest
import torch

from fastalign.rain import RainConfig
from fastalign.rain.dialogue import answer_text, has_new_turn, judge_path_ids
from fastalign.rain.jobs import Draft, EvaluateJob, Evaluation, ExpandJob, ExpandResult, PromptContext
from fastalign.rain.minimum import RequiredPrefixes, chain_key
from fastalign.rain.search import PromptSearch

from tests.test_token_text import TEXT, trap

from .tiny import PROMPTS, tokenizer

END_IDS = frozenset({tokenizer().eos_token_id})


def run_search(search, evaluate, max_batches=500):
    """Drives search.run() to its end: `evaluate(job)` answers each EvaluateJob, every expansion ranks tokens 10-12
    equally and every path embeds to a fresh unit vector. Fails on an empty batch or a search that never ends."""
    steps, results, embedded = search.run(), None, 0
    for _ in range(max_batches):
        try:
            jobs = steps.send(results)
        except StopIteration as stop:
            return stop.value
        assert jobs, "the search yielded an empty batch of jobs"
        results = []
        for job in jobs:
            if isinstance(job, EvaluateJob):
                results.append(evaluate(job))
            elif isinstance(job, ExpandJob):
                results.append(ExpandResult(ranked_ids=[10, 11, 12], ranked_logits=[0.0, 0.0, 0.0]))
            else:
                results.append([torch.eye(64)[embedded + i] for i in range(len(job.paths))])
                embedded += len(job.paths)
    pytest.fail(f"the search did not end within {max_batches} batches")


def test_expansion_priors_are_normalised_and_mixed_at_the_root():
    """Root: softmax over the top candidates, mixed 3:1 with uniform (root_prior_mix 0.25). Deeper: the raw
    token-set priors (greedy clipped to the samples' sum) normalised, not mixed."""
    ctx = PromptContext(index=0, prompt_text="", root_ids=[5], head_ids=[], root_key=0, max_length=100)
    search = PromptSearch(ctx, RainConfig(), tokenizer(), END_IDS, embedder=None, judge=None,
                          required=RequiredPrefixes(), on_commit=None)
    root = search.tree.root
    logits = [3.0, 2.0, 1.0, 0.0]
    search._expand(root, [5], ExpandResult(ranked_ids=[10, 11, 12, 13], ranked_logits=logits), 1)
    softmax = torch.softmax(torch.tensor(logits), dim=0).tolist()
    assert [c.p for c in root.children] == pytest.approx([0.75 * p + 0.25 / 4 for p in softmax])

    child = root.children[0]
    greedy = Draft((20, 21), math.log(0.3))
    samples = [Draft((22, 23), math.log(0.1)), Draft((24, 25), math.log(0.05))]
    search._expand(child, [5, 10], ExpandResult(greedy=greedy, samples=samples), 2)
    raw = [0.15, 0.1, 0.05]                                # greedy clipped to the samples' sum
    assert [c.p for c in child.children] == pytest.approx([r / sum(raw) for r in raw])


@pytest.mark.parametrize("length", [1, 2])
def test_priors_from_nan_logits_are_refused_naming_the_logits(length):
    """NaN logits made every child's prior NaN, select_child found none to walk to, and the prompt failed with
    "AttributeError: 'NoneType' object has no attribute 'tokens'", naming neither the model nor NaN."""
    ctx = PromptContext(index=0, prompt_text="", root_ids=[5], head_ids=[], root_key=0, max_length=100)
    search = PromptSearch(ctx, RainConfig(), tokenizer(), END_IDS, embedder=None, judge=None,
                          required=RequiredPrefixes(), on_commit=None)
    nan = float("nan")
    result = (ExpandResult(ranked_ids=[10, 11], ranked_logits=[nan, 0.0]) if length == 1 else
              ExpandResult(greedy=Draft((20, 21), nan), samples=[Draft((22, 23), math.log(0.1))]))
    with pytest.raises(FloatingPointError, match="is nan: the model's next-token logits are not finite"):
        search._expand(search.tree.root, [5], result, length)


def test_widening_samples_on_streams_the_first_expansion_did_not_use():
    """A keyed draw is a function of its stream: a widening that reused one of the first expansion's streams
    would draw one of its samples again."""
    ctx = PromptContext(index=0, prompt_text="", root_ids=[5], head_ids=[], root_key=0, max_length=100)
    search = PromptSearch(ctx, RainConfig(token_set_lengths=(2,)), tokenizer(), END_IDS, embedder=None, judge=None,
                          required=RequiredPrefixes(), on_commit=None)
    first = next(job for job in next(search.run()) if isinstance(job, ExpandJob))
    assert (first.first_stream, first.attempts) == (1, 9)   # the greedy set and 9 samples: 10 candidates
    samples = [Draft((20 + i, 40), math.log(0.05)) for i in range(first.attempts)]
    search._expand(first.node, [5], ExpandResult(greedy=Draft((10, 11), math.log(0.3)), samples=samples), 2)
    (widening,) = next(search._widen(first.node, [5]))
    used = set(range(first.first_stream, first.first_stream + first.attempts))
    assert widening.attempts > 0
    assert used.isdisjoint(range(widening.first_stream, widening.first_stream + widening.attempts))


def test_each_widening_draws_widen_group_minus_one_samples_on_the_next_streams():
    """A widening asks for widen_group - 1 samples (the greedy set completes the group) on the streams that follow
    those drawn before: the first expansion drew streams 1 and 2, the widenings 3-5 and 6-8."""
    ctx = PromptContext(index=0, prompt_text="", root_ids=[5], head_ids=[], root_key=0, max_length=100)
    search = PromptSearch(ctx, RainConfig(token_set_lengths=(2,), candidates=3, widen_group=4), tokenizer(), END_IDS,
                          embedder=None, judge=None, required=RequiredPrefixes(), on_commit=None)
    root = search.tree.root
    search._expand(root, [5], ExpandResult(greedy=Draft((10, 11), math.log(0.3)),
                                           samples=[Draft((12, 13), math.log(0.1)), Draft((14, 15), math.log(0.1))]), 2)
    jobs = []
    for token in (20, 30):
        steps = search._widen(root, [5])
        (job,) = next(steps)
        jobs.append(job)
        with pytest.raises(StopIteration):
            steps.send([ExpandResult(samples=[Draft((token + i, 40), math.log(0.1)) for i in range(job.attempts)])])
    assert [(job.first_stream, job.attempts) for job in jobs] == [(3, 3), (6, 3)]


def test_a_candidate_an_earlier_widening_drew_keeps_its_hidden_states():
    """A widening group larger than the room (count = children + 1) leaves a drawn candidate for a later
    widening; when that one adds it, the child still has the hidden states that generated it (the hidden
    embedder pools them for every path through it)."""
    ctx = PromptContext(index=0, prompt_text="", root_ids=[5], head_ids=[], root_key=0, max_length=100)
    search = PromptSearch(ctx, RainConfig(token_set_lengths=(2,), candidates=3, widen_group=5), tokenizer(),
                          END_IDS, embedder=None, judge=None, required=RequiredPrefixes(), on_commit=None)
    root = search.tree.root

    def draft(token, p):
        return Draft((token, 40), math.log(p), torch.full((4,), float(token)))

    def widen(samples):
        steps = search._widen(root, [5])
        next(steps)
        with pytest.raises(StopIteration):
            steps.send([ExpandResult(samples=samples)])

    search._expand(root, [5], ExpandResult(greedy=draft(10, 0.3), samples=[draft(11, 0.1), draft(12, 0.05)]), 2)
    widen([draft(20, 0.1), draft(21, 0.1), draft(22, 0.1), draft(23, 0.1)])     # room for 20, 21, 22 only
    assert [c.tokens[0] for c in root.children] == [10, 11, 12, 20, 21, 22]
    # the group of children + 1 = 4, greedy 0.3 and 20-22 at 0.1, normalised (1/6 each), then mixed at the root
    assert [c.p for c in root.children[3:]] == pytest.approx([0.75 / 6 + 0.25 / 4] * 3)
    widen([draft(10, 0.3)] * 4)                                                  # nothing new drawn: 23 joins
    assert [c.tokens[0] for c in root.children] == [10, 11, 12, 20, 21, 22, 23]
    assert all(torch.equal(c.hidden_sum, torch.full((4,), float(c.tokens[0]))) for c in root.children)


def test_widening_adds_each_token_set_once_and_stays_within_max_children():
    """A candidate an earlier widening left over (beyond its room) and a later widening draws again appears twice
    in the later group: it becomes one child, not two; and a group never takes a node past max_children."""
    ctx = PromptContext(index=0, prompt_text="", root_ids=[5], head_ids=[], root_key=0, max_length=100)
    search = PromptSearch(ctx, RainConfig(token_set_lengths=(2,), candidates=3, widen_group=5, max_children=8),
                          tokenizer(), END_IDS, embedder=None, judge=None, required=RequiredPrefixes(), on_commit=None)
    root = search.tree.root

    def widen(*tokens):
        steps = search._widen(root, [5])
        next(steps)
        with pytest.raises(StopIteration):
            steps.send([ExpandResult(samples=[Draft((t, 40), math.log(0.1)) for t in tokens])])
        return [c.tokens[0] for c in root.children]

    first = [Draft((11, 40), math.log(0.1)), Draft((12, 40), math.log(0.05))]
    search._expand(root, [5], ExpandResult(greedy=Draft((10, 40), math.log(0.3)), samples=first), 2)
    assert widen(20, 21, 22, 23) == [10, 11, 12, 20, 21, 22]           # 23 drawn, no room for it yet
    assert widen(23, 10, 10, 10) == [10, 11, 12, 20, 21, 22, 23]       # 23 twice in the group: one child
    assert widen(30, 31, 32, 33) == [10, 11, 12, 20, 21, 22, 23, 30]   # room for four, max_children for one


def test_widening_one_token_sets_adds_the_next_most_likely_token():
    """1-token sets: a widening adds the next most likely token, its prior from the softmax over the top
    (children + 1) tokens, mixed with uniform at the root; the existing children keep theirs."""
    ctx = PromptContext(index=0, prompt_text="", root_ids=[5], head_ids=[], root_key=0, max_length=100)
    search = PromptSearch(ctx, RainConfig(candidates=3), tokenizer(), END_IDS, embedder=None, judge=None,
                          required=RequiredPrefixes(), on_commit=None)
    root = search.tree.root
    ids, logits = [10, 11, 12, 13, 14], [1.0, 4.0, 0.5, 3.0, 2.0]
    search._expand(root, [5], ExpandResult(ranked_ids=ids, ranked_logits=logits), 1)
    before = [c.p for c in root.children]
    assert [c.tokens for c in root.children] == [(11,), (13,), (14,)]
    with pytest.raises(StopIteration):
        next(search._widen(root, [5]))
    assert [c.tokens for c in root.children] == [(11,), (13,), (14,), (10,)]
    assert [c.p for c in root.children[:3]] == before
    top4 = torch.softmax(torch.tensor([1.0, 4.0, 3.0, 2.0]), dim=0)[0].item()     # token 10 among 10, 11, 13, 14
    assert root.children[3].p == pytest.approx(0.75 * top4 + 0.25 / 4)


def test_path_infos_pool_each_nodes_tokens_below_it_and_the_rollout():
    """The embedding of a node on the backed-up path reads the text of its own tokens, the path below it and the
    rollout, and (hidden pooling) the mean of the hidden states that generated exactly those tokens."""
    from fastalign.rain.embeddings import HiddenStateEmbedder
    from fastalign.rain.jobs import Evaluation

    tok = tokenizer()
    ctx = PromptContext(index=0, prompt_text="", root_ids=[5], head_ids=[], root_key=0, max_length=100)
    search = PromptSearch(ctx, RainConfig(), tok, END_IDS, embedder=HiddenStateEmbedder(), judge=None,
                          required=RequiredPrefixes(), on_commit=None)
    child = search._add_child(search.tree.root, [5], (10,), 1.0, torch.tensor([1.0, 0.0]))
    leaf = search._add_child(child, [5, 10], (11, 12), 1.0, torch.tensor([0.0, 2.0]))
    rollout = Evaluation(0.0, [13, 14], torch.tensor([4.0, 4.0]))
    decoded = []
    tok.decode = lambda ids, **kwargs: decoded.append(list(ids)) or type(tok).decode(tok, ids, **kwargs)
    leaf_info, child_info = search._path_infos(leaf, rollout)
    assert decoded == [], "the hidden-state embedder never reads path texts: none is decoded until read"
    assert leaf_info.text == tok.decode([11, 12, 13, 14], skip_special_tokens=True)
    assert child_info.text == tok.decode([10, 11, 12, 13, 14], skip_special_tokens=True)
    assert (leaf_info.hidden_count, child_info.hidden_count) == (4, 5)
    assert torch.equal(leaf_info.hidden_sum, torch.tensor([4.0, 6.0]))
    assert torch.equal(child_info.hidden_sum, torch.tensor([5.0, 6.0]))
    terminal = search._path_infos(leaf, Evaluation(0.0, []))           # an ended leaf has no rollout
    assert [p.hidden_count for p in terminal] == [2, 3]
    assert torch.equal(terminal[1].hidden_sum, torch.tensor([1.0, 2.0]))
    terminal[0].hidden_sum.div_(2)                      # a plug-in embedder may pool in place: the tree keeps its sums
    assert torch.equal(leaf.hidden_sum, torch.tensor([0.0, 2.0]))


def test_widening_counts_the_lockstep_steps_that_reach_new_candidate_prefixes():
    """required_calls grows by the draw steps of a widening that read a distribution not computed before: a draw
    reads the one after each of its set's prefixes, all but the whole set. Here (10, 13, 14) reads (10, 13) at step 1
    and (20, 21, 22) reads (20,) and (20, 21) at steps 0 and 1 ((10,) the first expansion read): 2 steps, not 3."""
    ctx = PromptContext(index=0, prompt_text="", root_ids=[5], head_ids=[], root_key=0, max_length=100)
    search = PromptSearch(ctx, RainConfig(token_set_lengths=(3,), candidates=2, widen_group=3), tokenizer(), END_IDS,
                          embedder=None, judge=None, required=RequiredPrefixes(), on_commit=None)
    root = search.tree.root
    search._expand(root, [5], ExpandResult(greedy=Draft((10, 11, 12), math.log(0.3)),
                                           samples=[Draft((10, 11, 13), math.log(0.1))]), 3)
    steps = search._widen(root, [5])
    next(steps)
    before = ctx.stats.required_calls
    with pytest.raises(StopIteration):
        steps.send([ExpandResult(samples=[Draft((10, 13, 14), math.log(0.1)), Draft((20, 21, 22), math.log(0.1))])])
    assert ctx.stats.required_calls - before == 2
    steps = search._widen(root, [5])                   # now step 0 reads nothing new: only (20, 24) at step 1 is
    next(steps)
    before = ctx.stats.required_calls
    with pytest.raises(StopIteration):
        steps.send([ExpandResult(samples=[Draft((10, 13, 16), math.log(0.1)), Draft((20, 24, 25), math.log(0.1))])])
    assert ctx.stats.required_calls - before == 1


def test_required_calls_of_an_iteration_are_its_longer_chain():
    """A leaf's evaluation (its own state, each new rollout position, the judge) and its expansion (its own state, each
    lockstep step to a new candidate prefix) run side by side: the iteration needs the longer of the two chains."""
    ctx = PromptContext(index=0, prompt_text="", root_ids=[5], head_ids=[], root_key=0, max_length=100)
    search = PromptSearch(ctx, RainConfig(token_set_lengths=(3,)), tokenizer(), END_IDS, embedder=None, judge=None,
                          required=RequiredPrefixes(), on_commit=None)
    expansion = ExpandResult(greedy=Draft((10, 11, 12), 0.0), samples=[Draft((20, 21, 22), 0.0)])
    leaf = search.tree.root
    assert search._required_chain(leaf, Evaluation(0.0, []), expansion) == 3                    # 1 + 2 steps
    assert search._required_chain(leaf, Evaluation(0.0, [7, 8, 9], judged=("leaf", [1])), expansion) == 4  # 1+2+1


def test_the_judge_chain_of_a_commit_is_registered_when_no_evaluation_below_it_was_scored():
    """Evaluations the judge's cache answered register nothing; the first one scored after a commit registers the
    judge's view of the committed tokens (from the judge's head), which the leaf's path then extends."""
    ctx = PromptContext(index=0, prompt_text="", root_ids=[5], head_ids=[], root_key=0, max_length=3, head_key=7)
    required = RequiredPrefixes()
    search = PromptSearch(ctx, RainConfig(root_visits=2, min_new_visits=1), tokenizer(), END_IDS,
                          embedder=SimpleNamespace(needs_hidden=False), judge=SimpleNamespace(suffix_ids=[]),
                          required=required, on_commit=lambda *args: None)
    prompt_root = search.tree.root
    answer = run_search(search, lambda job: Evaluation(
        0.0, [], judged=None if search.tree.root is prompt_root else ("leaf", [9]))).answer_ids
    assert len(answer) == 2
    assert chain_key(7, judge_path_ids(answer[:1], END_IDS)) in required.keys


def test_each_commit_waits_for_min_new_visits_even_after_the_root_has_root_visits():
    """With min_new_visits above root_visits the root reaches root_visits first: the batches that follow must still
    ask for the missing new visits (not for root_visits - visits, which is none)."""
    ctx = PromptContext(index=0, prompt_text="", root_ids=[5], head_ids=[], root_key=0, max_length=4)
    config = RainConfig(token_set_lengths=(1,), root_visits=2, min_new_visits=4)
    search = PromptSearch(ctx, config, tokenizer(), END_IDS,
                          embedder=SimpleNamespace(needs_hidden=False), judge=SimpleNamespace(suffix_ids=[]),
                          required=RequiredPrefixes(), on_commit=lambda *args: None)
    output = run_search(search, lambda job: Evaluation(0.0, []))
    assert len(output.answer_ids) == 3
    assert [commit["new_visits"] for commit in output.commits] == [4, 4, 4]


def test_a_leaf_picked_twice_ends_the_batch_of_parallel_leaves():
    """Selection is deterministic: once it finds a leaf already in the batch, selecting again finds it again (and
    may widen nodes on the way for nothing), so the batch ends there."""
    ctx = PromptContext(index=0, prompt_text="", root_ids=[5], head_ids=[], root_key=0, max_length=4)
    search = PromptSearch(ctx, RainConfig(parallel_leaves=4), tokenizer(), END_IDS, embedder=None, judge=None,
                          required=RequiredPrefixes(), on_commit=None)
    selections, select = [], search._select
    search._select = lambda: selections.append(1) or select()
    jobs = next(search.run())
    assert [type(job) for job in jobs] == [EvaluateJob, ExpandJob] and len(selections) == 2


def answer_search(config, end_ids=END_IDS):
    ctx = PromptContext(index=0, prompt_text=PROMPTS[0], root_ids=tokenizer()(PROMPTS[0])["input_ids"], head_ids=[],
                        root_key=0, max_length=10**6)
    return PromptSearch(ctx, config, tokenizer(), end_ids, embedder=None, judge=None, required=RequiredPrefixes(),
                        on_commit=None)


def test_a_child_opens_a_new_turn_where_the_whole_answer_does():
    """A child's new turn is looked for in the answer's end only (the text its token set ends): answers of random
    tokens (characters split over byte tokens, special tokens) added to in token sets of 1 to 10 make the first child
    whose whole answer holds the turn marker terminal, and none before it, for random markers and a trap for a window
    one token short of the set."""
    tok, rng = tokenizer(), random.Random()
    for _ in range(16):
        answer, ends, marker, _ = trap(tok, rng)
        if rng.random() < 0.5:
            whole = answer_text(tok, answer, 0)
            size = rng.randrange(1, 12)
            start = rng.randrange(len(whole) - size + 1)
            marker = whole[start:start + size]
        search = answer_search(RainConfig(turn_marker=marker), end_ids=frozenset())
        node, root = search.tree.root, search.ctx.root_ids
        for before, end in zip([0] + ends, ends):
            node = search._add_child(node, root + answer[:before], answer[before:end], 1.0)
            assert node.terminal == has_new_turn(answer_text(tok, answer[:end], 0), marker)
            if node.terminal:
                break


def test_the_tokens_decoded_per_child_do_not_grow_with_the_answer():
    """Each child's new-turn check decoded the whole answer (1000 tokens at the end of a 1000-token answer, O(answer^2)
    per answer): now a window of its last tokens."""
    tok = tokenizer()
    answer = tok(TEXT * 20, add_special_tokens=False)["input_ids"][:1000]
    search, decoded = answer_search(RainConfig(turn_marker="Human:")), []
    node, root, real_decode = search.tree.root, search.ctx.root_ids, type(tok).decode

    def counting_decode(self, ids, *args, **kwargs):
        decoded[-1] += len(ids)
        return real_decode(self, ids, *args, **kwargs)

    type(tok).decode = counting_decode
    try:
        for start in range(0, len(answer), 10):
            decoded.append(0)
            node = search._add_child(node, root + answer[:start], answer[start:start + 10], 1.0)
            assert not node.terminal
    finally:
        type(tok).decode = real_decode
    # windows of len("Human:") + 8 + 9 tokens after 8 more, each decoded 3 times at most, doubled twice at most
    widths = [(6 + 8 + 9) * 2 ** k for k in range(3)]
    assert len(answer) == 1000 and max(decoded) <= sum(3 * (w + 8) for w in widths) < 1000
