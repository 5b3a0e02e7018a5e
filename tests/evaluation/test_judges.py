import copy
import re
import threading

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification,
                          PretrainedConfig, PreTrainedTokenizerFast)

from fastalign.evaluation.judges import KeywordJudge, ModerationJudge, harmful_label_index


@pytest.fixture(scope="module")
def classifier(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_labels=2, id2label={0: "safe", 1: "unsafe"},
                         label2id={"safe": 0, "unsafe": 1}, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        model.score.weight.mul_(30)  # spread the probabilities so that the threshold splits the pairs
    return model


def one_at_a_time(classifier, tokenizer, text):
    with torch.no_grad():
        return float(torch.softmax(classifier(**tokenizer([text], return_tensors="pt")).logits[0], -1)[1])


def test_moderation_judge_scores_each_text_as_alone(world, tokenizer, classifier):
    pairs = [(qa.question, answer) for qa in world.harmful[:5] for answer in (qa.answer, qa.refusal)]
    judge = ModerationJudge(classifier, tokenizer, harmful_label="unsafe", batch_size=3,
                            template="{prompt} {answer}")
    probs = judge.probabilities(pairs)
    expected = [one_at_a_time(classifier, tokenizer, f"{p} {a}") for p, a in pairs]
    assert probs == pytest.approx(expected, abs=1e-5)
    threshold = sorted(probs)[len(probs) // 2]
    judge.threshold = threshold
    assert judge(pairs) == [p >= threshold for p in probs]
    assert 0 < sum(judge(pairs)) < len(pairs)


def test_moderation_judge_scores_each_text_as_alone_with_absolute_positions(world, tokenizer):
    """The demo tokenizer pads on the left: a classifier with absolute position embeddings (GPT-2, BERT) then read
    a shorter text of a batch at shifted positions, and its verdict depended on the other texts (0.05 alone, 0.96
    next to longer ones)."""
    assert tokenizer.padding_side == "left"
    assert_scored_as_alone(gpt2_classifier(len(tokenizer), tokenizer.pad_token_id), tokenizer, world)


def gpt2_classifier(vocab_size, pad_token_id):
    """A random two-label GPT-2 classifier whose scores are far from 0.5 (a shifted reading shows)."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=1, n_head=4, n_positions=128,
                        pad_token_id=pad_token_id, id2label={0: "safe", 1: "unsafe"}, label2id={"safe": 0, "unsafe": 1})
    gpt2 = GPT2ForSequenceClassification(config).eval()
    with torch.no_grad():
        gpt2.score.weight.mul_(30)
    return gpt2


def assert_scored_as_alone(model, tokenizer, world):
    """Answers of several lengths scored in one batch get the scores each gets alone."""
    pairs = [(qa.question, answer) for qa in world.harmful[:3] + world.normal[:3] for answer in (qa.answer, "No.")]
    probs = ModerationJudge(model, tokenizer, batch_size=len(pairs)).probabilities(pairs)
    assert probs == pytest.approx([one_at_a_time(model, tokenizer, a) for _, a in pairs], abs=1e-5)


@pytest.mark.parametrize("model_pad, tokenizer_pad", [("eos", "pad"), (None, None)])
def test_moderation_judge_scores_a_decoder_classifier_as_alone_whatever_its_pad_token(world, tokenizer, model_pad,
                                                                                      tokenizer_pad):
    """A decoder classifier (GPT-2, Llama) reads the score at a text's last token, found by the id its config
    calls padding, not by the attention mask: a batch padded with the tokenizer's other pad token was scored at
    a pad position (0.90 for 0.16 alone); and without a pad token (GPT-2 as published) every batch was an
    error. Each text is scored as alone."""

    tok = copy.deepcopy(tokenizer)
    ids = {"eos": tok.eos_token_id, "pad": tok.pad_token_id, None: None}
    if tokenizer_pad is None:
        tok.pad_token = None
    assert_scored_as_alone(gpt2_classifier(len(tok), ids[model_pad]), tok, world)


@pytest.mark.parametrize("labels, problem_type", [(["toxic", "threat", "insult"], "multi_label_classification"),
                                                   (["harmfulness"], None)])
def test_moderation_judge_uses_sigmoid_for_independent_labels(world, tokenizer, labels, problem_type):
    """A multi-label classifier (e.g. toxic-bert) or a single-logit one scores each label by its own sigmoid;
    a softmax would mix the labels, and over a single logit always give 1."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_labels=len(labels), id2label=dict(enumerate(labels)),
                         label2id={n: i for i, n in enumerate(labels)}, problem_type=problem_type,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForSequenceClassification(config).eval()
    texts = [qa.answer for qa in world.harmful[:4]]
    judge = ModerationJudge(model, tokenizer, harmful_label=labels[0], batch_size=4)
    with torch.no_grad():
        expected = [float(model(**tokenizer([t], return_tensors="pt")).logits[0, 0].sigmoid()) for t in texts]
    assert judge.probabilities([("", t) for t in texts]) == pytest.approx(expected, abs=1e-5)


def test_moderation_label_is_checked(tokenizer, classifier):
    with pytest.raises(ValueError, match="'toxic' is not one of the model's labels"):
        ModerationJudge(classifier, tokenizer, harmful_label="toxic")
    with pytest.raises(ValueError, match="out of range"):
        ModerationJudge(classifier, tokenizer, harmful_label=2)
    assert ModerationJudge(classifier, tokenizer, harmful_label="UNSAFE").label == 1


def test_moderation_label_given_as_an_index_is_taken_as_given(tokenizer, classifier):
    """Index 0 is a label like any other (not "none given", which infers "unsafe", index 1); a negative index
    is out of range, not the label counted from the end."""
    assert ModerationJudge(classifier, tokenizer, harmful_label=0).label == 0
    with pytest.raises(ValueError, match="harmful_label -1 out of range for a model with 2 labels"):
        ModerationJudge(classifier, tokenizer, harmful_label=-1)


@pytest.mark.parametrize("kwargs, message", [
    ({"harmful_label": 1.0}, "harmful_label must be a label's name or index, got 1.0"),   # an IndexError when judging
    ({"harmful_label": True}, "harmful_label must be a label's name or index, got True"),  # was taken as index 1
    ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),   # a bare error of range()
    ({"batch_size": -1}, "batch_size must be an integer >= 1, got -1"),   # judged nothing, silently
    ({"max_length": 0}, "max_length must be an integer >= 1, got 0"),   # a torch size mismatch
])
def test_moderation_settings_it_cannot_use_are_refused_by_name(tokenizer, classifier, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ModerationJudge(classifier, tokenizer, **kwargs)


@pytest.mark.parametrize("threshold", [50, -0.1, float("nan")])
def test_moderation_threshold_must_be_a_probability(tokenizer, classifier, threshold):
    """A threshold above 1 (a percentage) or NaN marked no pair harmful, silently."""
    with pytest.raises(ValueError, match="threshold must be a probability in"):
        ModerationJudge(classifier, tokenizer, threshold=threshold)


@pytest.mark.parametrize("threshold", [0, 1, 0.0, 1.0])
def test_moderation_threshold_at_the_bounds_of_a_probability_is_accepted(tokenizer, classifier, threshold):
    """0 (every pair harmful) and 1 are probabilities: the CLI lets them through, and a refusal here named
    --harmful-label."""
    assert ModerationJudge(classifier, tokenizer, threshold=threshold).threshold == threshold


@pytest.mark.parametrize("template", ["{prompt}", "Q: {question}\nA: {answer}", "{answer} {0}", "{answer!r}",
                                      "{answer:>9}", "{answer", "{answer} }", None])
def test_moderation_template_needs_the_answer_and_no_other_field(tokenizer, classifier, template):
    """A template without {answer} judged the prompt alone; another field, a conversion or an unpaired brace failed
    at the first pair judged (KeyError, IndexError) or read the answer changed."""
    with pytest.raises(ValueError, match="template"):
        ModerationJudge(classifier, tokenizer, template=template)
    ModerationJudge(classifier, tokenizer, template="{{json}} Q: {prompt} A: {answer}")


TOXIC_BERT = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]


@pytest.mark.parametrize("labels, index", [
    (["safe", "unsafe"], 1), (["toxic", "non-toxic"], 0), (["Non-Toxic", "Toxic"], 1), (["neutral", "toxic"], 1),
    (["nothate", "hate"], 1), (["NOT_HARMFUL", "HARMFUL"], 1), (["non-offensive", "offensive"], 1),
    (["HATE_SPEECH", "normal"], 0), (TOXIC_BERT, 0), (["toxicity", "severe_toxicity", "obscene"], 0),
    (["LABEL_0", "LABEL_1"], 1), (["normal", "hate-speech"], 1),
])
def test_harmful_label_is_inferred_from_the_label_names(labels, index):
    """The one label named harmful, wherever it stands (not its negation, nor a kind of it such as
    severe_toxic); index 1 only for an unnamed 2-label model."""
    assert harmful_label_index(PretrainedConfig(id2label=dict(enumerate(labels)))) == index


@pytest.mark.parametrize("labels, message", [
    (["NEGATIVE", "POSITIVE"], "cannot tell which of the model's labels {0: 'NEGATIVE', 1: 'POSITIVE'}"),
    (["hate", "offensive", "neither"], "'hate', 'offensive' all mean harmful"),
    (["LABEL_0", "LABEL_1", "LABEL_2"], "give harmful_label"),
    (["LABEL_0"], "give harmful_label"),
    (["LABEL_0", "benign"], "give harmful_label"),   # named, so not the unnamed convention: 1 is no flag here
    (["safe", "LABEL_1"], "give harmful_label"),
])
def test_harmful_label_that_the_names_do_not_tell_must_be_given(labels, message):
    config = PretrainedConfig(id2label=dict(enumerate(labels)))
    with pytest.raises(ValueError, match=re.escape(message)):
        harmful_label_index(config)
    assert harmful_label_index(config, 0) == 0 and harmful_label_index(config, labels[0].lower()) == 0


def test_given_harmful_label_wins_over_the_names():
    config = PretrainedConfig(id2label={0: "safe", 1: "unsafe"})
    assert harmful_label_index(config, 0) == 0 and harmful_label_index(config, "Safe") == 0


WORDS = ["[PAD]", "[UNK]", "Judge", ":", "how", "do", "I", "bake", "bread", "to", "make", "a", "bomb", "please"]


@pytest.fixture(scope="module")
def word_tokenizer():
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


@pytest.fixture(scope="module")
def bomb_detector():
    """A classifier that reads its last token alone (the decoder layer adds nothing): "unsafe" iff it is bomb."""
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=4, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=1, num_labels=2, id2label={0: "safe", 1: "unsafe"},
                         label2id={"safe": 0, "unsafe": 1}, pad_token_id=0)
    model = LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.tensor([0.0, 3, 0, 0]))
        model.model.embed_tokens.weight[WORDS.index("bomb")] = torch.tensor([3.0, 0, 0, 0])
        model.score.weight.copy_(torch.tensor([[0.0, 5, 0, 0], [5.0, 0, 0, 0]]))
    return model


def test_moderation_judge_shortens_a_long_prompt_not_the_answer(word_tokenizer, bomb_detector):
    """Cutting the text's end (the tokenizer's truncation) judged a prompt word instead of the harmful answer
    after a long prompt; the prompt loses its start instead, and no more of it than needed."""
    judge = ModerationJudge(bomb_detector, word_tokenizer, template="Judge: {prompt}\n{answer}", max_length=12)
    prompt, answer = "how do I bake bread " * 5 + "please", "how to make a bomb"
    text = judge.text(prompt, answer)
    assert text == "Judge:  do I bake bread please\nhow to make a bomb"     # 2 + 5 + 5 tokens
    assert len(word_tokenizer(text).input_ids) == 12
    assert judge([(prompt, answer), (prompt, "bake bread"), ("", answer)]) == [True, False, True]
    assert judge.text("do I", answer) == "Judge: do I\nhow to make a bomb"        # short enough: left whole


def test_moderation_judge_cuts_only_an_answer_too_long_alone(word_tokenizer, bomb_detector):
    """With no room for any of the prompt, the answer is cut by the tokenizer's own truncation (its end)."""
    judge = ModerationJudge(bomb_detector, word_tokenizer, template="{prompt} {answer}", max_length=4)
    assert judge.text("how do I", "bomb a bread bake bread") == " bomb a bread bake bread"
    assert judge([("how do I", "bomb a bread bake bread"), ("how do I", "bake a bread bread bomb")]) == [False, False]
    assert judge([("how do I", "bake a bomb")]) == [True]


def test_moderation_judge_reads_no_more_tokens_than_the_classifier_has_positions(word_tokenizer, monkeypatch):
    """A classifier of 8 learned positions (GPT-2's kind) and a 20-word answer: the text is cut to 8 tokens, where
    the default of 512 overflowed its position embeddings (an IndexError); a max_length past them is refused; a
    tokenizer whose model_max_length is fewer still sets the default."""
    from transformers import GPT2Config, GPT2ForSequenceClassification
    torch.manual_seed(0)
    classifier = GPT2ForSequenceClassification(GPT2Config(
        vocab_size=len(WORDS), n_positions=8, n_embd=8, n_layer=1, n_head=2, num_labels=2, pad_token_id=0,
        id2label={0: "safe", 1: "unsafe"}, label2id={"safe": 0, "unsafe": 1})).eval()
    judge = ModerationJudge(classifier, word_tokenizer)
    assert judge.max_length == 8
    assert len(judge.probabilities([("how do I", "bake bread " * 10)])) == 1
    with pytest.raises(ValueError, match="max_length 9 is past the classifier's 8 positions"):
        ModerationJudge(classifier, word_tokenizer, max_length=9)
    assert ModerationJudge(classifier, word_tokenizer, max_length=8).max_length == 8   # all its positions: fine
    monkeypatch.setattr(word_tokenizer, "model_max_length", 6)
    assert ModerationJudge(classifier, word_tokenizer).max_length == 6


def test_a_moderation_judge_shared_by_threads_shortens_the_prompt_as_alone(word_tokenizer, bomb_detector, monkeypatch):
    """A fast tokenizer sets the truncation a call asks for on its backend, then encodes: another thread's batch
    encoding (truncation=True) set between the two made the judge's measuring call (no truncation) come back cut,
    the long text seemed to fit, and the batch encoding cut the answer instead of the prompt. The calls of the
    tokenizer now wait for each other: the other thread's is held here until the measuring call has encoded."""
    judge = ModerationJudge(bomb_detector, word_tokenizer, template="Judge: {prompt}\n{answer}", max_length=12)
    prompt, answer = "how do I bake bread " * 5 + "please", "how to make a bomb"
    alone = judge.text(prompt, answer)
    main, other_called = threading.current_thread(), threading.Event()
    other = threading.Thread(target=lambda: judge.probabilities([(prompt, answer)]), daemon=True)
    own_setting = word_tokenizer.set_truncation_and_padding

    class Signalling:   # judge's tokenizer lock: tells the test when the other thread waits for it
        def __init__(self, lock):
            self.lock = lock

        def __enter__(self):
            if threading.current_thread() is other:
                other_called.set()
            return self.lock.__enter__()

        def __exit__(self, *exc):
            return self.lock.__exit__(*exc)

    def set_truncation_and_padding(*args, **kwargs):
        own_setting(*args, **kwargs)
        if threading.current_thread() is other and kwargs["truncation_strategy"] != "do_not_truncate":
            other_called.set()
        elif threading.current_thread() is main and not other.is_alive() and not other_called.is_set():
            other.start()   # the measuring call has set "no truncation": the other thread's encoding runs now
            assert other_called.wait(timeout=60)

    monkeypatch.setattr(judge, "_tokenizer_lock", Signalling(judge._tokenizer_lock))
    monkeypatch.setattr(word_tokenizer, "set_truncation_and_padding", set_truncation_and_padding)
    try:
        assert judge.text(prompt, answer) == alone
    finally:
        other.join(timeout=60)


def test_keyword_judge_matches_whole_words_case_insensitively():
    judge = KeywordJudge(["pick a lock", "bomb", " "])
    assert judge([("", "First PICK A LOCK."), ("", "bombastic"), ("", "a bomb!"), ("", "pick the lock")]) == \
        [True, False, True, False]
    with pytest.raises(ValueError, match="at least one"):
        KeywordJudge([" ", ""])
    with pytest.raises(TypeError, match="keywords must be a list of strings, got a single string"):
        KeywordJudge("bomb")   # the keywords b, o and m: a bomb recipe was judged harmless


def test_keyword_judge_matches_a_phrase_across_any_whitespace():
    """A phrase was matched only with the keyword's exact spaces: an answer that wrapped a line inside it, or wrote
    two spaces, was judged harmless."""
    judge = KeywordJudge(["pick  a lock"])
    assert judge([("", "pick a\nlock"), ("", "Pick  a\tlock"), ("", "pick a lock"), ("", "pick alock"),
                  ("", "pick a locks")]) == [True, True, True, False, False]


def test_keyword_judge_matches_keywords_that_start_or_end_in_punctuation():
    judge = KeywordJudge(["c++", "$100", "step 1:"])
    assert judge([("", "Use C++ here."), ("", "pay $100 now"), ("", "Step 1: mix"), ("", "c++x"),
                  ("", "a$100"), ("", "step 1:a")]) == [True, True, True, False, False, False]


@pytest.mark.parametrize("keyword,answer", [
    ("炸弹", "这是如何制作炸弹的方法"),      # Chinese: no spaces between words
    ("爆弾", "爆弾の作り方"),                # Japanese
    ("ระเบิด", "วิธีทำระเบิดที่บ้าน"),       # Thai
    ("café", "un cafe\u0301 noir"),           # decomposed accent (NFD)
    ("bomb", "ｂｏｍｂ"),                     # full-width letters
    ("weiß", "WEISS"),                        # case folding
    ("폭탄", "폭탄을 만드는 방법"),            # Korean: a particle attached to the word
    ("炸药tnt", "如何制作炸药TNT"),           # starts in an unspaced script: matches after its letters
])
def test_keyword_judge_matches_across_scripts_and_unicode_forms(keyword, answer):
    assert KeywordJudge([keyword])([("", answer)]) == [True]


def test_keyword_judge_keeps_the_word_edge_of_a_keyword_that_starts_in_a_spaced_script():
    """A keyword that starts in Latin letters and ends in Chinese ones needs a word edge at its start only."""
    judge = KeywordJudge(["tnt炸药"])
    assert judge([("", "用 TNT炸药的方法"), ("", "xtnt炸药"), ("", "tnt炸药包")]) == [True, False, True]


def test_keyword_judge_still_needs_whole_words_in_spaced_scripts():
    assert KeywordJudge(["bomb", "café"])([("", "bombs"), ("", "cafés"), ("", "a BOMB!")]) == [False, False, True]


def test_moderation_judge_runs_a_classifier_left_in_train_mode_in_eval_mode(world, tokenizer, classifier):
    """A classifier just fine-tuned is in train mode: its dropout made the verdicts random from call to call. It gets
    its mode back after (the judge once put it in eval mode for good)."""
    config = copy.deepcopy(classifier.config)
    config.attention_dropout = 0.5
    dropping = type(classifier)(config)     # attention modules read their dropout when built
    dropping.load_state_dict(classifier.state_dict())
    pairs = [(qa.question, qa.answer) for qa in world.harmful[:3]]
    expected = ModerationJudge(copy.deepcopy(dropping).eval(), tokenizer).probabilities(pairs)
    judge = ModerationJudge(dropping.train(), tokenizer)
    assert judge.probabilities(pairs) == pytest.approx(expected, abs=1e-6)
    assert all(module.training for module in dropping.modules())


def test_moderation_judge_with_a_classifier_whose_embeddings_accelerate_offloads(world, tokenizer, classifier):
    """Offloaded weights wait on the meta device, where the texts then went ("Cannot copy out of meta tensor")."""
    accelerate = pytest.importorskip("accelerate")
    offloaded = copy.deepcopy(classifier)
    accelerate.cpu_offload(offloaded.model.embed_tokens, execution_device=torch.device("cpu"))
    pairs = [(qa.question, qa.answer) for qa in world.harmful[:3]]
    judge = ModerationJudge(offloaded, tokenizer, harmful_label="unsafe", template="{prompt} {answer}")
    expected = ModerationJudge(classifier, tokenizer, harmful_label="unsafe", template="{prompt} {answer}")
    assert judge.probabilities(pairs) == pytest.approx(expected.probabilities(pairs), abs=1e-6)


def test_moderation_judge_refuses_a_classifier_with_a_part_not_loaded(world, tokenizer, classifier):
    """A part on the meta device with no accelerate hook to load it: only the input embeddings were checked, and
    F.linear of a CPU input and a meta weight returned uninitialised memory (garbage probabilities, silently)."""
    unloaded = copy.deepcopy(classifier)
    unloaded.model.layers[0].mlp.down_proj.to("meta")
    judge = ModerationJudge(unloaded, tokenizer, harmful_label="unsafe", template="{prompt} {answer}")
    with pytest.raises(ValueError, match=r"^model: its weights are not loaded \(model.layers.0.mlp.down_proj has no "
                                         "accelerate hook .* before a ModerationJudge uses it"):
        judge.probabilities([(qa.question, qa.answer) for qa in world.harmful[:2]])


def test_moderation_judge_names_a_token_id_past_the_classifiers_embeddings(world, tokenizer):
    """A classifier with fewer embedding rows than its tokenizer's ids (a token added without resizing it) failed
    inside its embedding with an IndexError, on CUDA a device assert: the pair whose text holds such an id is named."""
    torch.manual_seed(0)
    rows = len(tokenizer) - 10
    classifier = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=rows, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_labels=2, pad_token_id=tokenizer.pad_token_id)).eval()
    pairs = [(world.normal[0].question, world.normal[0].answer), (world.harmful[0].question, world.harmful[0].answer)]
    assert max(tokenizer(pairs[0][1])["input_ids"]) < rows <= max(tokenizer(pairs[1][1])["input_ids"])
    judge = ModerationJudge(classifier, tokenizer, harmful_label=1, batch_size=1)
    with pytest.raises(ValueError, match=rf"^pair 1: token id \d+ is past the model's {rows} input embeddings"):
        judge.probabilities(pairs)
