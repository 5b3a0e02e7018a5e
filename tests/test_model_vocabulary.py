"""input_vocabulary reads the rows of a model's input embeddings, under a PEFT wrapper too; pad_id picks an id among
them."""
import pytest
import torch

from fastalign.model_vocabulary import input_vocabulary, pad_id, probe_ids
from tests.unlearn.tiny import tiny_llama


@pytest.mark.parametrize("targets", [["q_proj"], ["embed_tokens", "q_proj"]])
def test_the_vocabulary_of_a_model_and_of_its_lora_wrapper(targets):
    """A LoRA on the embeddings replaces them by PEFT's layer, which has no num_embeddings: the unlearning trainer's
    check of the data's token ids against the model then read None and was skipped without a word."""
    peft = pytest.importorskip("peft")
    model = tiny_llama(101)
    assert input_vocabulary(model) == 101
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=targets))
    assert input_vocabulary(wrapped) == 101


def test_a_model_without_input_embeddings_has_no_vocabulary():
    assert input_vocabulary(torch.nn.Linear(2, 2)) is None


def test_probe_ids_fit_a_small_vocabulary_and_stay_where_it_is_not_known():
    assert probe_ids(tiny_llama(3), [1, 0, 2, 3, 4]) == [1, 0, 2, 0, 1]
    assert probe_ids(torch.nn.Linear(2, 2), [1, 0, 2, 3, 4]) == [1, 0, 2, 3, 4]


def test_padding_takes_the_pad_token_else_eos_else_0_each_only_where_the_model_embeds_it():
    """pad_id: the pad token first; past the model's input embeddings (an added pad token), end-of-sequence; neither
    (both missing or past them), 0, an id every model embeds."""
    from types import SimpleNamespace

    def pad(pad_token_id, eos_token_id, vocab_size=None):
        return pad_id(SimpleNamespace(pad_token_id=pad_token_id, eos_token_id=eos_token_id), vocab_size)

    assert pad(5, 3) == pad(5, 3, 6) == 5
    assert pad(6, 3, 6) == pad(None, 3) == 3
    assert pad(None, None) == pad(7, 6, 6) == 0


def test_a_pad_token_of_id_0_is_the_filler():
    """Id 0 is a token like any other: a tokenizer whose pad token is id 0 pads with it, not with EOS."""
    from types import SimpleNamespace

    assert pad_id(SimpleNamespace(pad_token_id=0, eos_token_id=2)) == pad_id(
        SimpleNamespace(pad_token_id=0, eos_token_id=2), 3) == 0
