import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from fastalign.evaluation.judges import KeywordJudge, ModerationJudge


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


def test_keyword_judge_matches_whole_words_case_insensitively():
    judge = KeywordJudge(["pick a lock", "bomb", " "])
    assert judge([("", "First PICK A LOCK."), ("", "bombastic"), ("", "a bomb!"), ("", "pick the lock")]) == \
        [True, False, True, False]
    with pytest.raises(ValueError, match="at least one"):
        KeywordJudge([" ", ""])


def test_keyword_judge_matches_keywords_that_start_or_end_in_punctuation():
    judge = KeywordJudge(["c++", "$100", "step 1:"])
    assert judge([("", "Use C++ here."), ("", "pay $100 now"), ("", "Step 1: mix"), ("", "c++x"),
                  ("", "a$100"), ("", "step 1:a")]) == [True, True, True, False, False, False]
