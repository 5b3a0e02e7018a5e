"""Step-indexed batches: deterministic, disjoint across processes, mismatch rows built from the pool, read from
several threads alike."""
import dataclasses
import json
import threading

import numpy as np
import pytest
import torch

from fastalign.data_files import DataError
from fastalign.unlearn.encoding import EncodedExample, PoolAnswer, encode_answers, encode_pairs
from fastalign.unlearn.records import QAPair
from fastalign.unlearn.streams import (_FORGET_STREAM, _MISMATCH_STREAM, _NORMAL_STREAM, UnlearningStreams,
                                       _EpochStream, _longest_mismatch_row, _longest_pool_answers, mismatch_fit)
from fastalign.prompt_templates import TextTemplate
from tests.unlearn.tiny import FORGET_ROWS, POOL_ANSWERS, byte_bpe_tokenizer


def example(k, prompt_len, answer_len, source):
    ids = tuple(range(100 * k, 100 * k + prompt_len + answer_len)) + (99,)  # 99: template tail
    return EncodedExample(ids, prompt_len, prompt_len + answer_len, source)


FORGET = [example(k, 3 + k % 3, 2 + k % 2, f"forget {k}") for k in range(1, 6)]
NORMAL = [example(k, 2, 4 + k % 3, f"normal {k}") for k in range(10, 13)]
POOL = [(7, 7), (8, 8, 8), (9,)]


def make(**kwargs):
    args = dict(normal=NORMAL, mismatch_pool=POOL, batch_size=2, mismatch_per_prompt=3, filler_id=0, seed=1)
    return UnlearningStreams(FORGET, **{**args, **kwargs})


def test_batches_are_a_function_of_seed_and_index():
    a, b = make(), make()
    for index in (0, 3, 11):
        x, y = a.batch(index), b.batch(index)
        assert torch.equal(x.tokens.input_ids, y.tokens.input_ids) and torch.equal(x.normal_index, y.normal_index)
    other = make(seed=2)
    assert any(not torch.equal(other.batch(i).tokens.input_ids, a.batch(i).tokens.input_ids) for i in range(4))


def test_epochs_visit_every_example_once_in_a_fresh_order():
    streams = make(batch_size=1)
    orders = [tuple(streams.batch(5 * epoch + i).tokens.input_ids[0, 0].item() // 100 for i in range(5))
              for epoch in range(4)]
    assert all(sorted(order) == [1, 2, 3, 4, 5] for order in orders)
    assert len(set(orders)) > 1


def test_rows_follow_the_seeded_epoch_permutations_in_any_reading_order():
    """Batch j holds positions [j*B, (j+1)*B) of the concatenated permutations default_rng([seed, stream, epoch]):
    read out of order, a batch spanning two epochs and a batch read twice (the kept permutation) included."""
    streams = make(batch_size=3, normal_batch_size=2)

    def expected(n, size, stream, j):
        return [int(np.random.default_rng([1, stream, p // n]).permutation(n)[p % n])
                for p in range(j * size, (j + 1) * size)]

    for j in (7, 0, 1, 1, 12, 3, 2, 40, 0):
        batch = streams.batch(j)
        assert [e.source for e in batch.examples[:3]] == [FORGET[i].source for i in expected(5, 3, _FORGET_STREAM, j)]
        assert batch.normal_index.tolist() == expected(3, 2, _NORMAL_STREAM, j)


def test_a_thread_reading_a_batch_while_another_draws_its_epoch_gets_that_epochs_rows(monkeypatch):
    """Data-loading threads may read batches of one UnlearningStreams at once. Thread A reads the first batch of
    epoch 1 and is paused right after its first store into the kept permutation; thread B reads the same batch
    meanwhile. The epoch was kept before its permutation, so that B got epoch 0's rows."""
    streams = make(batch_size=5, normal=None, mismatch_per_prompt=0)
    expected = [[e.source for e in make(batch_size=5).batch(j).examples[:5]] for j in (0, 1)]
    assert expected[0] != expected[1]
    assert [e.source for e in streams.batch(0).examples] == expected[0]     # epoch 0 kept
    paused, go, out = threading.Event(), threading.Event(), {}

    def pausing_setattr(self, name, value):
        object.__setattr__(self, name, value)
        if threading.current_thread() is first and not paused.is_set():
            paused.set()
            assert go.wait(timeout=60)    # a guard against a hung test, not a synchronisation

    monkeypatch.setattr(_EpochStream, "__setattr__", pausing_setattr)
    first = threading.Thread(target=lambda: out.update(a=[e.source for e in streams.batch(1).examples]), daemon=True)
    first.start()
    try:
        assert paused.wait(timeout=60)
        second = [e.source for e in streams.batch(1).examples]
    finally:
        go.set()
        first.join(timeout=60)
    assert out["a"] == second == expected[1]


def test_longest_mismatch_row_is_the_longest_row_the_pool_makes():
    """check_context reads the pool once for all prompts: each prompt's longest mismatch row is still the longest
    of the rows it makes with each pool answer (encoded answers of several seams, hand-built ones with its tail)."""
    tokenizer, template = byte_bpe_tokenizer(), TextTemplate("### Question: {prompt}\n ### Answer: {answer}\n")
    forget = encode_pairs(tokenizer, template, [QAPair(r["prompt"], r["answer"], f"forget {i}")
                                                for i, r in enumerate(FORGET_ROWS)], 64)
    answers = POOL_ANSWERS + ["7 digits stand apart", "a much longer answer than the others, with words"]
    pool = encode_answers(tokenizer, template, answers) + [PoolAnswer((5,) * 80), PoolAnswer((6, 6))]
    assert len({a.seams for a in pool}) > 2
    for e in forget + FORGET:
        assert_pool_reading_matches_the_rows(e, pool)


@pytest.mark.parametrize("template", ["{prompt}\n\n{answer}", "### Question: {prompt}\n ### Answer: {answer}\n"])
def test_mismatch_fit_is_whether_every_mismatch_row_starts_its_answer_within_max_length(template):
    """mismatch_fit, read from the pool's kinds of seams and lead tokens, against the rows themselves: each forget
    example fits at max_length L exactly when every pool answer's row has its first answer token before L (a
    template whose answers follow two newlines, which stand apart from them: two lead tokens)."""
    tokenizer, template = byte_bpe_tokenizer(), TextTemplate(template)
    forget = encode_pairs(tokenizer, template, [QAPair(r["prompt"], r["answer"], f"forget {i}")
                                                for i, r in enumerate(FORGET_ROWS)], 64)
    pool = encode_answers(tokenizer, template, POOL_ANSWERS)
    for e in forget:
        assert_pool_reading_matches_the_rows(e, pool)


def assert_pool_reading_matches_the_rows(forget, pool):
    """What the streams read of the pool without building a forget example's mismatch rows agrees with the rows:
    the longest row (check_context), and whether every row starts its answer within max_length (mismatch_fit, on
    both sides of the bound)."""
    rows = [forget.with_answer(a, "mixed") for a in pool]
    assert _longest_mismatch_row(forget, _longest_pool_answers(pool)) == max(len(row.input_ids) for row in rows)
    first_answer_token = max(row.answer_start for row in rows)
    for length in (first_answer_token, first_answer_token + 1):
        assert mismatch_fit([forget], pool, length) == [first_answer_token < length], (forget.source, length)


def test_mismatch_rows_respect_max_length():
    """A pool answer longer than the room left after the forget prompt is cut to max_length."""
    streams = make(mismatch_pool=[tuple(range(50, 70)), (7, 7)], mismatch_per_prompt=4, max_length=10)
    long_drawn = False
    for index in range(5):
        batch = streams.batch(index)
        assert batch.tokens.input_ids.shape[1] <= 10
        mismatch = batch.examples[batch.num_forget:batch.num_forget + batch.num_mismatch]
        assert all(len(e.input_ids) <= 10 and e.answer_end <= 10 and e.num_answer_targets >= 1 for e in mismatch)
        long_drawn |= any(50 in e.input_ids for e in mismatch)
    assert long_drawn


def test_check_context_bounds_every_row_a_batch_can_hold():
    """The longest row may be a mismatch row (a forget prompt around a long pool answer), cut to max_length."""
    streams = make(mismatch_pool=[(7,) * 6], max_length=64)
    widest = max(streams.batch(i).tokens.input_ids.shape[1] for i in range(10))
    assert widest == 12
    streams.check_context(12)
    streams.check_context(None)
    with pytest.raises(DataError, match=r"forget \d with the longest mismatch pool answer: 12 tokens, more than "
                                         r"the model's context \(max_position_embeddings=11\); set max_length "
                                         r"\(--max-length\) to at most 11"):
        streams.check_context(11)
    make(mismatch_pool=[(7,) * 6], max_length=10).check_context(10)
    with pytest.raises(DataError, match=r"forget 5: 9 tokens"):
        make(mismatch_per_prompt=0, normal=None).check_context(8)
    # a normal row is a row of the batch too (its KL forward would fail past the context alike)
    with pytest.raises(DataError, match=r"normal long: 15 tokens, more than the model's context"):
        make(mismatch_per_prompt=0, normal=NORMAL + [example(20, 2, 12, "normal long")]).check_context(14)


def test_each_prompt_gets_k_different_pool_answers():
    """K of 5 pool answers per prompt: drawn with replacement, all 5 would differ only 4% of the time."""
    pool = [(50 + k,) for k in range(5)]
    for k in (3, 5):
        streams = make(mismatch_pool=pool, mismatch_per_prompt=k)
        for index in range(10):
            batch = streams.batch(index)
            mismatch = batch.examples[batch.num_forget:batch.num_forget + batch.num_mismatch]
            for prompt in range(batch.num_forget):
                answers = {e.input_ids[e.answer_start] for e in mismatch[prompt * k:(prompt + 1) * k]}
                assert len(answers) == k


def test_mismatch_answers_are_fresh_seeded_draws_for_each_forget_row():
    """Forget row i of batch j takes K pool answers drawn by default_rng([seed, mismatch stream, j*B + i]), read out of
    order alike: over 40 batches every pool answer is drawn, and the prompts' sets of answers change from row to row
    (the same K answers for every prompt and step would pass a check of the rows' shape alone)."""
    pool = [(50 + k,) for k in range(7)]
    streams, drawn = make(mismatch_pool=pool, mismatch_per_prompt=3), []
    for j in (5, 0, 39, *range(40)):
        batch = streams.batch(j)
        mismatch = batch.examples[batch.num_forget:batch.num_forget + batch.num_mismatch]
        for i in range(batch.num_forget):
            answers = [e.input_ids[e.answer_start] - 50 for e in mismatch[3 * i:3 * i + 3]]
            expected = np.random.default_rng([1, _MISMATCH_STREAM, 2 * j + i]).choice(7, size=3, replace=False)
            assert answers == expected.tolist(), (j, i)
            drawn.append(frozenset(answers))
    assert set().union(*drawn) == set(range(7)) and len(set(drawn)) > 10, drawn


def test_layout_counts_and_mismatch_rows():
    batch = make().batch(4)
    assert (batch.num_forget, batch.num_mismatch, batch.num_normal) == (2, 6, 2)
    ids, mask = batch.tokens.input_ids, batch.tokens.target_mask
    lengths = batch.tokens.attention_mask.sum(1)
    assert ids.shape[1] == int(lengths.max())
    for m in range(6):
        forget_row = ids[m // 3]
        row = 2 + m
        prompt_len = FORGET[int(forget_row[0]) // 100 - 1].answer_start
        assert torch.equal(ids[row, :prompt_len], forget_row[:prompt_len])
        answer = ids[row, prompt_len:lengths[row] - 1].tolist()
        assert tuple(answer) in POOL and ids[row, lengths[row] - 1] == 99
        assert mask[row].nonzero().squeeze(1).tolist() == list(range(prompt_len - 1, prompt_len - 1 + len(answer)))
    assert [NORMAL[i].source for i in batch.normal_index.tolist()] == \
        [NORMAL[int(ids[8 + r, 0]) // 100 - 10].source for r in range(2)]


def test_processes_draw_different_rows():
    streams = make(batch_size=1, mismatch_per_prompt=0)
    rows = {streams.batch(0, rank=r, world_size=2).tokens.input_ids[0, 0].item() for r in range(2)}
    assert len(rows) == 2
    assert streams.batch(1, rank=0, world_size=2).tokens.input_ids[0, 0] == streams.batch(2).tokens.input_ids[0, 0]


def test_a_process_draws_the_whole_batch_of_its_global_index():
    """Process r of R at step i draws batch i*R + r of a single process, mismatch answers included."""
    streams = make()
    for rank in range(2):
        assert streams.batch(3, rank=rank, world_size=2).examples == streams.batch(6 + rank).examples


def test_a_step_draws_the_same_rows_however_its_global_batch_is_split():
    """R processes of batch B draw what one process of batch R*B draws, mismatch answers included: a
    distributed run equals a single-device run with the same global batch."""
    pool = [(7,) * n for n in range(1, 9)]
    whole, split = make(mismatch_pool=pool, mismatch_per_prompt=2, batch_size=4, normal_batch_size=2), \
        make(mismatch_pool=pool, mismatch_per_prompt=2, batch_size=2, normal_batch_size=1)

    def parts(batch):
        rows = batch.examples
        return (rows[:batch.num_forget], rows[batch.num_forget:batch.num_forget + batch.num_mismatch],
                rows[batch.num_forget + batch.num_mismatch:])
    for step in range(4):
        ranks = [parts(split.batch(step, rank=r, world_size=2)) for r in range(2)]
        assert parts(whole.batch(step)) == tuple(ranks[0][i] + ranks[1][i] for i in range(3))


def test_forget_and_normal_orders_are_drawn_independently():
    """Equal-sized forget and normal sets are not walked in the same order (each stream has its own seed)."""
    streams = make(normal=[example(k, 2, 3, f"normal {k}") for k in range(10, 15)], batch_size=1,
                   mismatch_per_prompt=0)
    forget_order = [FORGET.index(streams.batch(i).examples[0]) for i in range(5)]
    normal_order = [streams.batch(i).normal_index.item() for i in range(5)]
    assert forget_order != normal_order


def test_normal_batch_size_sets_the_number_of_normal_rows():
    """normal_batch_size=None takes batch_size; 0 is no normal rows (not "unset"); normal_index is a long tensor."""
    batch = make(normal_batch_size=5).batch(0)
    assert (batch.num_forget, batch.num_normal, len(batch.normal_index)) == (2, 5, 5)
    assert batch.normal_index.dtype == torch.long
    assert make(normal_batch_size=None).batch(0).num_normal == 2
    batch = make(normal_batch_size=0).batch(0)
    assert (batch.num_forget, batch.num_mismatch, batch.num_normal, len(batch.normal_index)) == (2, 6, 0, 0)


def test_empty_pool_answers_are_never_drawn():
    """An answer with no ids, or only its lead tokens (the template's whitespace), is no answer: never drawn, and a
    pool of such answers only leaves the mismatch stream out (it made rows with nothing to train on)."""
    streams = make(mismatch_pool=[(), PoolAnswer((9,), lead=1), (7, 7)])
    for index in range(3):
        batch = streams.batch(index)
        mismatch = batch.examples[batch.num_forget:batch.num_forget + batch.num_mismatch]
        assert mismatch and all(e.input_ids[e.answer_start:e.answer_end] == (7, 7) for e in mismatch)
    for pool in ([], [()], [PoolAnswer((9,), lead=1)]):
        batch = make(mismatch_pool=pool).batch(0)
        assert (batch.num_forget, batch.num_mismatch, batch.num_normal) == (2, 0, 2), pool


def test_absent_streams_and_bad_arguments():
    batch = UnlearningStreams(FORGET, batch_size=2).batch(0)
    assert (batch.num_forget, batch.num_mismatch, batch.num_normal) == (2, 0, 0)
    with pytest.raises(ValueError, match="forget set is empty"):
        UnlearningStreams([])
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        UnlearningStreams(FORGET, batch_size=0)
    # rank 3 of 2 drew rank 1's rows of the next draw
    for where in (dict(rank=3, world_size=2), dict(rank=-1, world_size=2), dict(world_size=0)):
        with pytest.raises(ValueError, match="needs an index >= 0 and a rank in"):
            UnlearningStreams(FORGET).batch(0, **where)
    # a negative K reached numpy's choice(size=-1) at the first batch, or was taken as 0 without a pool
    for pool in (POOL, None):
        with pytest.raises(ValueError, match=r"mismatch_per_prompt must be an integer >= 0, got -1"):
            UnlearningStreams(FORGET, mismatch_pool=pool, mismatch_per_prompt=-1)
    # a negative normal batch drew no normal rows (the KL term off, silently); a float one failed inside range()
    for size in (-1, 1.5):
        with pytest.raises(ValueError, match=rf"normal_batch_size must be an integer >= 0, got {size}"):
            UnlearningStreams(FORGET, normal=FORGET, normal_batch_size=size)


def test_a_prompt_that_leaves_no_room_for_a_mismatch_answer_is_named():
    """The template's space before some pool answers stands apart from them (lead tokens): a forget prompt that
    leaves room for its own answer may leave none for those, which a batch would find mid-run."""
    forget = [EncodedExample((1, 2, 3, 4, 5), 3, 5, "forget 1", seams=((1, 3),))]
    pool = [PoolAnswer((9, 7, 7), lead=1)]
    rows = UnlearningStreams(forget, mismatch_pool=pool, max_length=5, batch_size=1).batch(0).examples[1:]
    assert [(r.input_ids, r.answer_start) for r in rows] == [((1, 2, 3, 9, 7), 4)] * 5   # cut to max_length
    with pytest.raises(DataError, match="forget 1: its prompt takes 3 tokens .* max_length=4"):
        UnlearningStreams(forget, mismatch_pool=pool, max_length=4)
    UnlearningStreams(forget, mismatch_pool=pool, max_length=4, mismatch_per_prompt=0)   # no mismatch rows


def test_token_ids_past_the_models_vocabulary_are_named():
    """A tokenizer that does not match the model (a pad token added without resizing the embeddings) failed inside
    the embedding with an IndexError; the example, pool answer or padding id holding such an id is named."""
    largest = max(max(e.input_ids) for e in FORGET + NORMAL)   # 1202: forget and normal ids run up to it
    make().check_vocabulary(largest + 1)
    make().check_vocabulary(None)
    with pytest.raises(DataError, match=rf"normal 12: token id {largest} is past the model's {largest} input "
                                        "embeddings: the tokenizer does not match the model"):
        make().check_vocabulary(largest)
    small = UnlearningStreams([EncodedExample((1, 2, 3, 4), 2, 4, "forget 0")], mismatch_pool=POOL)
    with pytest.raises(DataError, match="mismatch pool answer 2: token id 9 is past the model's 9 input"):
        small.check_vocabulary(9)
    # a pool answer's lead and tail (the template's tokens around it) are rows' tokens too
    for answer in (PoolAnswer((9, 1, 2), lead=1), PoolAnswer((1, 2, 9), end=2)):
        with pytest.raises(DataError, match="mismatch pool answer 0: token id 9 is past the model's 9 input"):
            UnlearningStreams(small.forget, mismatch_pool=[answer]).check_vocabulary(9)
    with pytest.raises(DataError, match=r"the padding token id 5000 is past the model's 1300 input embeddings"):
        make(filler_id=5000).check_vocabulary(1300)


def test_answer_ids_past_the_lm_heads_rows_are_named():
    """The loss's targets (forget answers, pool answers) index the lm_head's rows, which may be fewer than the input
    embeddings' (Mllama's text model: 8 image tokens read, never predicted): such an id passed the check of the input
    rows and failed mid-run, at the first batch holding it, with a ValueError naming no example. Prompt ids, a pool
    answer's lead and tail, and normal answers (the KL term takes no target) are no targets."""
    normal = [EncodedExample((1, 2, 8, 8), 2, 4, "normal 0")]
    pool = [(1, 2), PoolAnswer((8, 1, 2, 8), lead=1, end=3)]
    streams = UnlearningStreams([EncodedExample((9, 1, 2, 3), 2, 4, "forget 0")], normal=normal, mismatch_pool=pool)
    streams.check_vocabulary(10, 4)
    streams.check_vocabulary(10, None)
    with pytest.raises(DataError, match=r"^forget 0: answer token id 3 is past the model's 3 lm_head rows"):
        streams.check_vocabulary(10, 3)
    streams = UnlearningStreams([EncodedExample((9, 1, 2, 1), 2, 4, "forget 0")], mismatch_pool=pool + [(3,)])
    with pytest.raises(DataError, match=r"^mismatch pool answer 2: answer token id 3 is past the model's 3 lm_head"):
        streams.check_vocabulary(10, 3)

def test_a_padding_id_equal_to_the_vocabulary_size_is_named():
    """Ids run 0..vocab_size-1: a padding id of vocab_size (a pad token appended without resizing) has no embedding."""
    make(filler_id=1299).check_vocabulary(1300)
    with pytest.raises(DataError, match=r"the padding token id 1300 is past the model's 1300 input embeddings"):
        make(filler_id=1300).check_vocabulary(1300)


def test_digest_changes_with_the_token_ids_spans_seams_padding_and_stream_of_every_example():
    """A resume compares the streams' digest with its checkpoint's: any change of what the batches are built from
    (an example's ids, answer span or seams, a pool answer's, the padding id, an example moved to another stream)
    must change it; where the examples were read (their source) must not."""
    def digest(forget=FORGET, normal=NORMAL, pool=POOL, filler_id=0):
        return UnlearningStreams(forget, normal=normal, mismatch_pool=pool, mismatch_per_prompt=3, filler_id=filler_id,
                                 max_length=64).digest()

    base, e, last = digest(), FORGET[0], NORMAL[-1]
    changed = [digest(filler_id=1), digest(forget=FORGET[:-1], normal=FORGET[-1:] + NORMAL),
               digest(normal=NORMAL[:-1], pool=[PoolAnswer(last.input_ids, last.answer_start, last.answer_end)] + POOL),
               *(digest(pool=[PoolAnswer((7, 7), **field)] + POOL[1:])
                 for field in ({"lead": 1}, {"end": 1}, {"seams": ((0, 0),)}))]
    changed += [digest(forget=[dataclasses.replace(e, **field)] + FORGET[1:])
                for field in ({"answer_start": e.answer_start - 1}, {"answer_end": e.answer_end - 1},
                              {"seams": ((1, e.answer_start - 1), (0, e.answer_start))})]
    assert len({base, *changed}) == 1 + len(changed)
    assert digest(forget=[dataclasses.replace(x, source="elsewhere") for x in FORGET]) == base


def test_the_first_prompt_without_room_for_a_mismatch_answer_is_named_with_the_lead_it_lacks():
    """Of several such forget prompts the first is named, with the most lead tokens a pool answer puts before it."""
    forget = [EncodedExample((1, 2, 3, 4, 5, 6), k, 6, f"forget {k}", seams=((1, k),)) for k in (2, 4, 3)]
    pool = [PoolAnswer((9, 9, 7, 7), lead=2), PoolAnswer((9, 7), lead=1)]
    with pytest.raises(DataError, match=r"^forget 4: its prompt takes 4 tokens and the template's whitespace before "
                                        r"some mismatch answers 2 more, which leaves no answer token within "
                                        r"max_length=5;"):
        UnlearningStreams(forget, mismatch_pool=pool, max_length=5)


def test_rows_are_padded_with_the_filler_id():
    """Rows shorter than the batch's longest are padded with filler_id (0 would be a real token of most
    vocabularies), outside the attention and target masks."""
    batch = make(filler_id=77).batch(0)
    ids, attention = batch.tokens.input_ids, batch.tokens.attention_mask.bool()
    assert (~attention).any() and (ids[~attention] == 77).all()
    assert torch.equal(ids, make(filler_id=0).batch(0).tokens.input_ids.masked_fill(~attention, 77))


def test_mismatch_rows_name_their_forget_example_and_pool_answer():
    """Each mismatch row's source names the forget example and the pool answer it was built from."""
    batch = make().batch(2)
    mismatch = batch.examples[batch.num_forget:batch.num_forget + batch.num_mismatch]
    for m, row in enumerate(mismatch):
        forget = batch.examples[m // 3]
        answer = POOL.index(row.input_ids[row.answer_start:row.answer_end])
        assert row.source == f"{forget.source} + pool answer {answer}"


def test_a_negative_padding_id_is_named():
    """A padding id below 0 (a tokenizer without a pad token, read as -1) has no embedding either."""
    with pytest.raises(DataError, match=r"the padding token id -1 is past the model's 1300 input embeddings"):
        make(filler_id=-1).check_vocabulary(1300)


def test_a_context_of_no_positions_holds_no_row():
    """positions=None is 'no bound'; 0 positions is a bound every row exceeds."""
    make().check_context(None)
    with pytest.raises(DataError, match=r"more than the model's context \(max_position_embeddings=0\)"):
        make().check_context(0)


def test_answers_cut_counts_each_stream_and_skipped_is_a_copy():
    """answers_cut counts the forget and normal examples whose answer max_length cut, each in its own stream;
    skipped is kept as given, unchanged when the caller's dict changes afterwards."""
    forget = [dataclasses.replace(e, answer_cut=k < 2) for k, e in enumerate(FORGET)]
    normal = [dataclasses.replace(e, answer_cut=k < 1) for k, e in enumerate(NORMAL)]
    skipped = {"forget": 1, "normal": 0}
    streams = UnlearningStreams(forget, normal=normal, skipped=skipped)
    assert streams.answers_cut == {"forget": 2, "normal": 1}
    skipped["forget"] = 5
    assert streams.skipped == {"forget": 1, "normal": 0}
    assert UnlearningStreams(FORGET).skipped == {}


def test_a_batch_moves_its_tokens_to_a_device():
    """UnlearningBatch.to moves the padded tokens and keeps the counts and rows."""
    batch = make().batch(0)
    moved = batch.to("meta")
    assert moved.tokens.input_ids.device.type == moved.tokens.target_mask.device.type == "meta"
    assert (moved.num_forget, moved.num_mismatch, moved.num_normal, moved.examples) == \
        (batch.num_forget, batch.num_mismatch, batch.num_normal, batch.examples)


def test_numpy_integers_are_kept_as_plain_ints():
    """Counts given as NumPy integers are stored as ints: run.json (JSON) and a checkpoint's weights-only load of
    draw_settings() take no NumPy scalars."""
    streams = make(batch_size=np.int64(2), mismatch_per_prompt=np.int32(3), normal_batch_size=np.int64(1),
                   max_length=np.int64(64), filler_id=np.int64(5), seed=np.int64(7))
    values = [*streams.draw_settings().values(), streams.filler_id]
    assert all(type(v) is int for v in values), values
    assert json.loads(json.dumps(streams.draw_settings())) == streams.draw_settings()
