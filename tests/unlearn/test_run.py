"""load_streams: which rows of the user's files feed which stream; load_model_and_tokenizer's errors."""
import copy
import gzip
import json
import warnings

import pytest
import torch

from fastalign.data_files import DataError
from fastalign.prompt_templates import TextTemplate
from fastalign.unlearn import run
from fastalign.unlearn.config import UnlearnConfig
from fastalign.unlearn.encoding import encode_answers, encode_pairs
from fastalign.unlearn.formats import load_pairs, load_truthfulqa
from fastalign.unlearn.run import load_model_and_tokenizer, load_streams, run_unlearning
from tests.unlearn.tiny import (FORGET_ROWS, NORMAL_ROWS, POOL_ANSWERS, byte_bpe_tokenizer, tiny_llama, write_jsonl,
                               write_truthfulqa)


def test_truthfulqa_as_normal_feeds_the_mismatch_pool_from_its_pool_rows_only(tmp_path):
    """The mismatch answers come from TruthfulQA's pool rows, never from the normal pairs trained on; the split takes
    the configured fractions and seed."""
    csv = write_truthfulqa(tmp_path / "tqa.csv")
    forget = write_jsonl(tmp_path / "forget.jsonl", FORGET_ROWS)
    tokenizer = byte_bpe_tokenizer()
    config = UnlearnConfig(model="m", output_dir="o", forget=[str(forget)], normal=str(csv), max_length=64, seed=3,
                           truthfulqa_test_fraction=0.4, truthfulqa_pool_fraction=0.2)   # not the defaults
    streams = load_streams(config, tokenizer)
    split = load_truthfulqa(csv, test_fraction=0.4, pool_fraction=0.2, seed=3)
    assert streams.pool == encode_answers(tokenizer, TextTemplate(), split.mismatch_pool)
    assert len(streams.normal) == len(split.normal_train) == 4   # 10 rows: 4 test, 2 pool
    normal_answers = {e.input_ids[e.answer_start:e.answer_end] for e in streams.normal}
    pool_answers = {a.answer_ids for a in streams.pool}
    assert normal_answers and pool_answers and not normal_answers & pool_answers


def test_every_forget_file_is_read(tmp_path):
    first = write_jsonl(tmp_path / "f1.jsonl", FORGET_ROWS[:1])
    rest = write_jsonl(tmp_path / "f2.jsonl", FORGET_ROWS[1:])
    csv = write_truthfulqa(tmp_path / "tqa.csv")
    config = UnlearnConfig(model="m", output_dir="o", forget=[str(first), str(rest)], normal=str(csv), max_length=64)
    assert len(load_streams(config, byte_bpe_tokenizer()).forget) == len(FORGET_ROWS) > 1


def test_a_mismatch_pool_given_beside_a_truthfulqa_normal_file_is_the_pool(tmp_path):
    """--mismatch-pool names the pool: the normal csv's own pool rows are not used then."""
    csv = write_truthfulqa(tmp_path / "tqa.csv")
    other = tmp_path / "other.csv"
    other.write_text("Question,Best Answer,Correct Answers,Incorrect Answers\n"
                     + "".join(f"Q{k}?,xyz {k},xyz {k},qq {k}\n" for k in range(10)))
    forget = write_jsonl(tmp_path / "forget.jsonl", FORGET_ROWS)
    tokenizer = byte_bpe_tokenizer()
    config = UnlearnConfig(model="m", output_dir="o", forget=[str(forget)], normal=str(csv), mismatch_pool=str(other),
                           max_length=64)
    pool = load_truthfulqa(other, test_fraction=config.truthfulqa_test_fraction,
                           pool_fraction=config.truthfulqa_pool_fraction, seed=config.seed).mismatch_pool
    assert load_streams(config, tokenizer).pool == encode_answers(tokenizer, TextTemplate(), pool)


@pytest.mark.parametrize("stream", ["normal", "mismatch_pool"])
def test_a_safety_file_given_as_normal_data_or_pool_is_refused(tmp_path, stream):
    """A PKU-SafeRLHF or HH file given as normal data would anchor the KL term to its harmful answers, and as the
    pool would feed them to the mismatch stream, whose loss is gradient DESCENT: each is refused, naming the missing
    field, instead of being read as a forget file."""
    forget = write_jsonl(tmp_path / "forget.jsonl", FORGET_ROWS)
    pku = write_jsonl(tmp_path / "pku.jsonl", [{"prompt": "p", "response_0": "harmful", "is_response_0_safe": False,
                                                "response_1": "fine", "is_response_1_safe": True}])
    pool = write_jsonl(tmp_path / "pool.jsonl", [{"prompt": "p", "answer": "the a of"}])
    data = ({"normal": str(pku), "mismatch_pool": str(pool)} if stream == "normal"
            else {"mismatch_pool": str(pku), "normal_weight": 0})
    config = UnlearnConfig(model="m", output_dir="o", forget=[str(forget)], max_length=64, **data)
    with pytest.raises(DataError, match=r"pku.jsonl: row 1: missing field 'answer'"):
        load_streams(config, byte_bpe_tokenizer())


@pytest.mark.parametrize("as_pool", [False, True], ids=["normal", "mismatch_pool"])
def test_a_truthfulqa_csv_that_leaves_no_mismatch_answer_is_an_error_unless_the_term_is_off(tmp_path, as_pool):
    """A csv whose pool rows' answers are all answers of its normal rows leaves an empty pool: the mismatch term was
    silently off although mismatch_weight asked for it. An error names the file and the way to turn the term off."""
    csv = tmp_path / "tqa.csv"
    rows = "".join(f"q{k},a,a,a\n" for k in range(5))
    csv.write_text("Question,Best Answer,Correct Answers,Incorrect Answers\n" + rows)
    forget = write_jsonl(tmp_path / "forget.jsonl", FORGET_ROWS)
    data = {"mismatch_pool": str(csv), "normal_weight": 0} if as_pool else {"normal": str(csv)}
    config = UnlearnConfig(model="m", output_dir="o", forget=[str(forget)], max_length=64, **data)
    with pytest.raises(DataError, match=r"tqa.csv: no mismatch pool answer: every answer of its pool rows "
                                        r"\(truthfulqa_pool_fraction=0.3\) is the Best Answer of one of its normal "
                                        r"rows; .* or set mismatch_weight=0 \(--mismatch-weight 0\) to train without"):
        load_streams(config, byte_bpe_tokenizer())
    config = UnlearnConfig(model="m", output_dir="o", forget=[str(forget)], max_length=64, mismatch_weight=0, **data)
    assert load_streams(config, byte_bpe_tokenizer()).pool == []


@pytest.mark.parametrize("settings, message", [
    ({"normal_weight": 0, "normal_batch_size": 4}, r"^normal_batch_size has no effect with normal_weight=0 "
                                                   r"\(--normal-weight 0\): no normal rows are drawn"),
    ({"normal_weight": 0, "reference": "cached", "reference_cache": "host"},
     r"^reference_cache has no effect with normal_weight=0 \(--normal-weight 0\): no normal rows are drawn, and no "
     r"reference is built for them"),
    ({"mismatch_weight": 0, "mismatch_per_prompt": 3}, r"^mismatch_per_prompt has no effect with mismatch_weight=0 "
                                                       r"\(--mismatch-weight 0\): no mismatch rows are drawn"),
    ({"mismatch_weight": 0, "mismatch_pool": "POOL"}, r"^mismatch_pool has no effect with mismatch_weight=0"),
    ({"mismatch_per_prompt": 0, "mismatch_pool": "POOL"}, r"^mismatch_pool has no effect with "
                                                          r"mismatch_per_prompt=0: no mismatch rows are drawn"),
], ids=["normal_batch_size-no-normal", "reference_cache-no-normal", "mismatch_per_prompt-no-mismatch",
        "mismatch_pool-no-mismatch", "mismatch_pool-no-mismatch-rows"])
def test_settings_of_a_term_load_streams_leaves_out_are_warned_of_there(tmp_path, settings, message):
    """load_streams reads no rows for a term of weight 0 (nor a pool without mismatch answers), and builds no
    reference without normal rows: the settings given for that term have no effect, and it says so (the config
    warned instead, untrue of streams of one's own, drawn from whatever the weights)."""
    forget = write_jsonl(tmp_path / "forget.jsonl", FORGET_ROWS)
    pool = write_jsonl(tmp_path / "pool.jsonl", [{"prompt": "p", "answer": "the a of"}])
    settings = {k: str(pool) if v == "POOL" else v for k, v in settings.items()}
    config = UnlearnConfig(model="m", output_dir="o", forget=[str(forget)], normal=str(write_truthfulqa(
        tmp_path / "tqa.csv")), max_length=64, **settings)
    with pytest.warns(UserWarning, match=message):
        load_streams(config, byte_bpe_tokenizer())


@pytest.mark.parametrize("normal, reference, named", [
    ("normal.jsonl", "auto", "normal"), ("tqa.csv", "copy", "reference"),
    ("normal.jsonl", "copy", "normal, reference")])
def test_a_normal_file_or_reference_of_no_effect_with_normal_weight_0_is_warned_of(tmp_path, normal, reference, named):
    """With normal_weight=0 a normal jsonl is never read and no reference model is built: both were taken without a
    word (a TruthfulQA .csv still feeds the mismatch pool, and a cached reference still freezes the lm_head)."""
    forget = write_jsonl(tmp_path / "forget.jsonl", FORGET_ROWS)
    paths = {"normal.jsonl": write_jsonl(tmp_path / "normal.jsonl", FORGET_ROWS),
             "tqa.csv": write_truthfulqa(tmp_path / "tqa.csv")}
    mismatch = {"mismatch_weight": 0} if normal.endswith(".jsonl") else {}   # (a csv is the pool)
    config = UnlearnConfig(model="m", output_dir="o", forget=[str(forget)], normal=str(paths[normal]), normal_weight=0,
                           reference=reference, max_length=64, **mismatch)
    with pytest.warns(UserWarning, match=rf"^{named} (has|have) no effect with normal_weight=0 "):
        load_streams(config, byte_bpe_tokenizer())


def test_a_reference_cache_without_a_cached_reference_is_warned_of_once_with_normal_weight_0(tmp_path):
    """reference_cache without reference='cached' is said by the config; load_streams, with normal_weight=0, names
    the reference alone, not reference_cache a second time."""
    forget = write_jsonl(tmp_path / "forget.jsonl", FORGET_ROWS)
    with warnings.catch_warnings(record=True) as made:
        warnings.simplefilter("always")
        config = UnlearnConfig(model="m", output_dir="o", forget=[str(forget)], normal=str(write_truthfulqa(
            tmp_path / "tqa.csv")), max_length=64, normal_weight=0, reference="copy", reference_cache="host")
    assert [w for w in made if "reference_cache" in str(w.message)]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        load_streams(config, byte_bpe_tokenizer())
    said = [str(w.message) for w in said]
    assert [message for message in said if message.startswith("reference has no effect with normal_weight=0 ")]
    assert not [message for message in said if "reference_cache" in message]


@pytest.mark.parametrize("name", ["TruthfulQA.CSV", "TruthfulQA.csv.gz"])
def test_truthfulqa_csv_with_an_upper_case_or_gz_extension_is_read_as_csv(tmp_path, name):
    """Windows tools write 'TruthfulQA.CSV': it was read as jsonl and refused as 'row 1: not valid JSON'. A gzipped
    csv is a csv too."""
    csv = write_truthfulqa(tmp_path / "TruthfulQA.csv")
    if name.endswith(".gz"):
        (tmp_path / name).write_bytes(gzip.compress(csv.read_bytes()))
    else:
        csv.rename(tmp_path / name)
    csv = tmp_path / name
    forget = write_jsonl(tmp_path / "forget.jsonl", FORGET_ROWS)
    config = UnlearnConfig(model="m", output_dir="o", forget=[str(forget)], normal=str(csv), max_length=64)
    streams = load_streams(config, byte_bpe_tokenizer())
    assert len(streams.normal) == 5 and streams.pool


def test_a_model_transformers_cannot_build_is_not_blamed_on_the_attention_implementation(tmp_path):
    """Without attn_implementation, from_pretrained's ValueError (here an architecture it does not know) is its own:
    only a load that asked for an implementation names the setting."""
    byte_bpe_tokenizer().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "nonsense"}))
    with pytest.raises(ValueError, match="^(?!attn_implementation).*model type `nonsense`"):
        load_model_and_tokenizer(UnlearnConfig(model=str(tmp_path), output_dir=str(tmp_path / "o")))


def jsonl_data(tmp_path, forget_rows=FORGET_ROWS):
    """forget, normal and pool jsonl files of the tiny rows."""
    return {"forget": [str(write_jsonl(tmp_path / "forget.jsonl", forget_rows))],
            "normal": str(write_jsonl(tmp_path / "normal.jsonl", NORMAL_ROWS)),
            "mismatch_pool": str(write_jsonl(tmp_path / "pool.jsonl", [{"prompt": "p", "answer": a}
                                                                        for a in POOL_ANSWERS]))}


def test_the_streams_take_the_configs_batch_sizes_and_seed(tmp_path):
    """normal_batch_size and seed reach the streams: dropped, the normal rows per step fell back to batch_size and
    every seed drew the same batches, without a word."""
    config = UnlearnConfig(model="m", output_dir="o", max_length=64, batch_size=2, normal_batch_size=1, seed=7,
                           mismatch_per_prompt=2, **jsonl_data(tmp_path))
    streams = load_streams(config, byte_bpe_tokenizer())
    assert (streams.normal_batch_size, streams.seed, streams.mismatch_per_prompt) == (1, 7, 2)
    assert (streams.batch(0).num_forget, streams.batch(0).num_normal) == (2, 1)


def test_skipped_examples_of_each_stream_are_counted(tmp_path):
    """At max_length=19 skip_long_prompts drops two forget rows (one too long with a mismatch answer's lead space)
    and the longer normal row: run.json records both counts."""
    config = UnlearnConfig(model="m", output_dir="o", max_length=19, skip_long_prompts=True, **jsonl_data(tmp_path))
    streams = load_streams(config, byte_bpe_tokenizer())
    assert streams.skipped == {"forget": 2, "normal": 1} and len(streams.forget) == len(streams.normal) == 1


def test_without_skip_long_prompts_a_prompt_no_mismatch_answer_fits_after_is_an_error_not_dropped(tmp_path):
    """Only skip_long_prompts drops forget rows that leave no room for the space before a mismatch answer; without
    it such a row is an error naming it (dropping it anyway trained on fewer rows than the user gave, unsaid)."""
    data = {k: v for k, v in jsonl_data(tmp_path, [FORGET_ROWS[0], FORGET_ROWS[2]]).items() if k != "normal"}
    config = UnlearnConfig(model="m", output_dir="o", max_length=19, normal_weight=0, **data)
    with pytest.raises(DataError, match=r"forget.jsonl:row 1: its prompt takes 18 tokens and the template's "
                                        r"whitespace before some mismatch answers"):
        load_streams(config, byte_bpe_tokenizer())


@pytest.mark.filterwarnings("ignore:mismatch_per_prompt=0 draws no mismatch answers")
def test_mismatch_per_prompt_0_needs_no_pool_and_drops_no_forget_row_for_one(tmp_path):
    """mismatch_per_prompt=0 turns the mismatch term off as mismatch_weight=0 does: no pool is asked for, and no
    forget row is dropped for leaving no room for a pool answer."""
    data = {k: v for k, v in jsonl_data(tmp_path).items() if k != "mismatch_pool"}
    config = UnlearnConfig(model="m", output_dir="o", max_length=64, mismatch_per_prompt=0, **data)
    assert load_streams(config, byte_bpe_tokenizer()).pool == []
    config = UnlearnConfig(model="m", output_dir="o", max_length=19, mismatch_per_prompt=0, skip_long_prompts=True,
                           **jsonl_data(tmp_path))
    assert load_streams(config, byte_bpe_tokenizer()).skipped["forget"] == 1   # only the 22-token prompt


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_the_model_loads_in_the_precisions_dtype(tmp_path, precision, dtype):
    """precision='bf16' trains bf16 weights (half the memory of fp32 ones, and what KahanAdamW is for)."""
    tokenizer = byte_bpe_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path)
    model, _ = load_model_and_tokenizer(UnlearnConfig(model=str(tmp_path), output_dir=str(tmp_path / "o"),
                                                      precision=precision))
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_a_model_path_that_does_not_exist_is_named_as_not_found(tmp_path):
    """A path (it has a separator) that does not exist is 'model not found', not a Hub repo id error (or, for a
    relative path, minutes of retried downloads)."""
    with pytest.raises(FileNotFoundError, match=r"^model not found: .*missing"):
        load_model_and_tokenizer(UnlearnConfig(model=str(tmp_path / "missing"), output_dir=str(tmp_path / "o")))


def test_a_jsonl_mismatch_pool_gives_its_answers_not_its_prompts(tmp_path):
    """The pool's rows are {prompt, answer}: the mismatch rows take their answers (their prompts are no answers)."""
    data = jsonl_data(tmp_path)
    config = UnlearnConfig(model="m", output_dir="o", max_length=64, **data)
    tokenizer = byte_bpe_tokenizer()
    assert load_streams(config, tokenizer).pool == encode_answers(tokenizer, TextTemplate(), POOL_ANSWERS)


@pytest.mark.parametrize("pool_format", ["jsonl", "csv"])
def test_a_mismatch_pool_file_is_kept_apart_from_the_answers_of_a_separate_normal_file(tmp_path, pool_format):
    """Only a csv's own pool was filtered against its own normal rows: a pool file beside a jsonl --normal fed the
    normal answers to the mismatch stream as well, trained on by both terms."""
    data = jsonl_data(tmp_path)
    normal_answers = [row["answer"] for row in NORMAL_ROWS]
    if pool_format == "jsonl":
        pool_path = write_jsonl(tmp_path / "pool.jsonl", [{"prompt": "p", "answer": a}
                                                          for a in POOL_ANSWERS + normal_answers])
    else:   # one pool row of 3 (pool fraction 0.3): its Best, Correct and Incorrect answers
        pool_path = tmp_path / "pool.csv"
        pool_path.write_text("Question,Best Answer,Correct Answers,Incorrect Answers\n"
                             + "".join(f"Q{k}?,{normal_answers[0]},{normal_answers[1]}; Paris is the capital,"
                                       f"the a of\n" for k in range(3)))
    data["mismatch_pool"] = str(pool_path)
    tokenizer = byte_bpe_tokenizer()
    pool = load_streams(UnlearnConfig(model="m", output_dir="o", max_length=64, **data), tokenizer).pool
    expected = POOL_ANSWERS if pool_format == "jsonl" else ["Paris is the capital", "the a of"]
    assert pool == encode_answers(tokenizer, TextTemplate(), expected)
    only_normal = write_jsonl(tmp_path / "only_normal.jsonl", [{"prompt": "p", "answer": a} for a in normal_answers])
    data["mismatch_pool"] = str(only_normal)
    with pytest.raises(DataError, match=r"only_normal.jsonl: no mismatch pool answer: every one is the answer of a "
                                        r"normal pair of .*normal.jsonl, and the pool is kept apart from them"):
        load_streams(UnlearnConfig(model="m", output_dir="o", max_length=64, **data), tokenizer)


def test_a_jsonl_pool_gives_each_answer_once(tmp_path):
    """A TruthfulQA pool holds distinct answers, a jsonl pool was taken as written: an answer on several rows filled a
    prompt's K slots with the same text (the streams promise K different answers where the pool has K)."""
    data = jsonl_data(tmp_path)
    data["mismatch_pool"] = str(write_jsonl(tmp_path / "pool.jsonl", [{"prompt": "p", "answer": a}
                                                                      for a in POOL_ANSWERS * 3]))
    tokenizer = byte_bpe_tokenizer()
    pool = load_streams(UnlearnConfig(model="m", output_dir="o", max_length=64, **data), tokenizer).pool
    assert pool == encode_answers(tokenizer, TextTemplate(), POOL_ANSWERS)


def test_skip_long_prompts_dropping_every_normal_row_is_an_error_not_a_run_without_the_kl_term(tmp_path):
    """With every normal row too long the normal stream was left empty: the KL term silently off."""
    data = jsonl_data(tmp_path)
    data["normal"] = str(write_jsonl(tmp_path / "long_normal.jsonl", NORMAL_ROWS[:1]))   # 19 tokens of prompt
    config = UnlearnConfig(model="m", output_dir="o", max_length=19, skip_long_prompts=True, **data)
    with pytest.raises(DataError, match=r"every normal example's prompt leaves no answer token within max_length=19"):
        load_streams(config, byte_bpe_tokenizer())


def test_a_truthfulqa_mismatch_pool_with_an_upper_case_or_gz_extension_is_read_as_csv(tmp_path):
    """As for normal data: 'TruthfulQA.CSV' or a gzipped csv given as the pool is a csv, not jsonl."""
    csv = write_truthfulqa(tmp_path / "tqa.csv")
    data = {k: v for k, v in jsonl_data(tmp_path).items() if k != "mismatch_pool"}
    (tmp_path / "Pool.csv.gz").write_bytes(gzip.compress(csv.read_bytes()))
    csv.rename(tmp_path / "Pool.CSV")
    tokenizer = byte_bpe_tokenizer()
    for name in ("Pool.CSV", "Pool.csv.gz"):
        config = UnlearnConfig(model="m", output_dir="o", max_length=64, mismatch_pool=str(tmp_path / name), **data)
        pool = load_truthfulqa(tmp_path / name, test_fraction=config.truthfulqa_test_fraction,
                               pool_fraction=config.truthfulqa_pool_fraction, seed=config.seed).mismatch_pool
        assert pool and load_streams(config, tokenizer).pool == encode_answers(tokenizer, TextTemplate(), pool)


def test_the_configs_text_template_and_forget_format_are_the_ones_used(tmp_path):
    """template and forget_format reach the encoding: a PKU-SafeRLHF forget file read as pku, rendered in the
    config's template (not the default one, not read as {prompt, answer} rows)."""
    pku = write_jsonl(tmp_path / "pku.jsonl", [{"prompt": "How do I hurt someone?", "response_0": "Like this.",
                                                "is_response_0_safe": False, "response_1": "No.",
                                                "is_response_1_safe": True}])
    data = {**jsonl_data(tmp_path), "forget": [str(pku)]}
    template = "Q: {prompt}\nA: {answer}"
    config = UnlearnConfig(model="m", output_dir="o", max_length=64, template=template, forget_format="pku", **data)
    tokenizer = byte_bpe_tokenizer()
    expected = encode_pairs(tokenizer, TextTemplate(template), load_pairs(pku, "pku"), 64)
    assert expected and load_streams(config, tokenizer).forget == expected


def test_a_truthfulqa_normal_file_feeds_the_mismatch_pool_with_the_normal_term_off(tmp_path):
    """normal_weight=0 drops the normal stream, not the csv's pool rows: they are still the mismatch pool."""
    csv = write_truthfulqa(tmp_path / "tqa.csv")
    forget = write_jsonl(tmp_path / "forget.jsonl", FORGET_ROWS)
    config = UnlearnConfig(model="m", output_dir="o", forget=[str(forget)], normal=str(csv), normal_weight=0,
                           max_length=64)
    tokenizer = byte_bpe_tokenizer()
    with warnings.catch_warnings():   # the csv takes effect: it is not warned of
        warnings.simplefilter("error")
        streams = load_streams(config, tokenizer)
    split = load_truthfulqa(csv, test_fraction=config.truthfulqa_test_fraction,
                            pool_fraction=config.truthfulqa_pool_fraction, seed=config.seed)
    assert not streams.normal and streams.pool == encode_answers(tokenizer, TextTemplate(), split.mismatch_pool)


def test_skip_long_prompts_dropping_every_forget_row_is_an_error(tmp_path):
    """With every forget prompt too long nothing is left to unlearn: an error, not a run on no forget rows."""
    config = UnlearnConfig(model="m", output_dir="o", max_length=8, skip_long_prompts=True, **jsonl_data(tmp_path))
    with pytest.raises(DataError, match=r"every forget example's prompt leaves no answer token within max_length=8"):
        load_streams(config, byte_bpe_tokenizer())


def test_the_streams_pad_with_the_tokenizers_filler(tmp_path):
    """The filler id (the pad token here) reaches the streams: it enters the data digest a resume compares."""
    tokenizer = byte_bpe_tokenizer(with_pad=True)
    config = UnlearnConfig(model="m", output_dir="o", max_length=64, **jsonl_data(tmp_path))
    assert load_streams(config, tokenizer).filler_id == tokenizer.pad_token_id != 0


def test_a_pad_token_past_the_models_embeddings_trains_as_one_it_embeds(tmp_path):
    """A pad token added to the tokenizer without resizing the model's embeddings (the common Llama-2 recipe) stopped
    the run ("the padding token id 1056 is past the model's 1056 input embeddings") though padding is masked out:
    the streams pad with EOS instead, as generation does, and the losses are those of a pad the model embeds."""
    pytest.importorskip("accelerate")
    vocab = len(byte_bpe_tokenizer())
    data = jsonl_data(tmp_path)
    losses = {}
    for pad in ("added", "bos"):
        tokenizer = copy.deepcopy(byte_bpe_tokenizer())   # (the cached one other tests share keeps its pad)
        if pad == "added":
            tokenizer.add_special_tokens({"pad_token": "<|padding|>"})
            assert tokenizer.pad_token_id == vocab
        else:
            tokenizer.pad_token = tokenizer.bos_token
        model_dir = tmp_path / pad
        tiny_llama(vocab, seed=11).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        config = UnlearnConfig(model=str(model_dir), output_dir=str(tmp_path / f"out-{pad}"), max_length=64,
                               max_steps=2, lr=1e-3, **data)
        records = []
        run_unlearning(config, step_callback=records.append)
        losses[pad] = torch.tensor([[r.loss, r.forget_nll, r.mismatch_nll, r.normal_kl] for r in records])
    assert losses["added"].shape == (2, 4) and losses["added"].isfinite().all()
    torch.testing.assert_close(losses["added"], losses["bos"], rtol=1e-5, atol=1e-6)


def test_a_model_directory_without_weights_cannot_be_loaded_naming_it(tmp_path):
    """from_pretrained's OSError for a directory without weights is a FileNotFoundError naming the model."""
    tokenizer = byte_bpe_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    tiny_llama(len(tokenizer)).config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"^model {tmp_path} cannot be loaded: .*model.safetensors"):
        load_model_and_tokenizer(UnlearnConfig(model=str(tmp_path), output_dir=str(tmp_path / "o")))


def test_an_attention_implementation_transformers_refuses_is_an_error_naming_the_setting(tmp_path):
    tokenizer = byte_bpe_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"^attn_implementation 'no-such-attention': .*no-such-attention"):
        load_model_and_tokenizer(UnlearnConfig(model=str(tmp_path), output_dir=str(tmp_path / "o"),
                                               attn_implementation="no-such-attention"))


def test_normal_weight_without_a_normal_file_is_an_error_naming_both_ways_on(tmp_path):
    data = {k: v for k, v in jsonl_data(tmp_path).items() if k != "normal"}
    config = UnlearnConfig(model="m", output_dir="o", max_length=64, **data)
    with pytest.raises(DataError, match=r"^normal_weight > 0 needs a normal data file \(normal=..., --normal FILE\), "
                                        r"or set normal_weight=0 \(--normal-weight 0\)$"):
        load_streams(config, byte_bpe_tokenizer())


def test_a_misspelled_trainer_option_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """run_unlearning(config, step_callbak=...) reached the trainer's TypeError only after the model, the tokenizer
    and the data had loaded (10 s for the demo's model, minutes for an 8B one)."""
    monkeypatch.setattr(run, "load_model_and_tokenizer", lambda config: pytest.fail("the model loaded"))
    config = UnlearnConfig(model="m", output_dir=str(tmp_path / "out"), **jsonl_data(tmp_path))
    with pytest.raises(TypeError, match="step_callbak"):
        run_unlearning(config, step_callbak=print)
