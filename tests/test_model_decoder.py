"""decoder_of: the module that gives a causal LM's last hidden states, where get_decoder() names another."""
import pytest
import torch

from fastalign.model_decoder import decoder_of
from fastalign.unlearn.models import causal_lm_parts, check_fused_logits
from tests.runtime.tiny_models import tiny_model


@pytest.mark.parametrize("name, guessed", [("llama-gqa-untied", "LlamaModel"),
                                           ("modernbert-decoder-prediction-head", "Linear"),
                                           ("mllama-text", "MllamaForCausalLM")])
def test_the_decoder_gives_the_last_hidden_states_whatever_get_decoder_guesses(name, guessed):
    model = tiny_model(name)
    assert type(model.get_decoder()).__name__ == guessed
    decoder = decoder_of(model)
    assert decoder is model.model
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(decoder(input_ids=ids)[0], expected, rtol=0, atol=0)


def test_a_model_with_no_decoder_of_its_own_is_named():
    class HeadOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = torch.nn.Linear(4, 4)

        def get_decoder(self):
            return self.decoder

    with pytest.raises(TypeError, match=r"HeadOnly: cannot find the decoder that produces its final hidden states"):
        decoder_of(HeadOnly())

    class TakesKeywords(torch.nn.Module):   # a decoder whose forward takes its inputs as **kwargs
        def forward(self, **kwargs):
            return kwargs

    class OpaqueForward(torch.nn.Module):   # a forward whose signature cannot be read (a builtin): not a decoder
        forward = torch.relu

    model = HeadOnly()
    model.model, model.base_model = OpaqueForward(), TakesKeywords()
    assert decoder_of(model) is model.base_model


def test_unlearning_takes_mllamas_text_model_and_refuses_modernberts_prediction_head():
    """The fused losses read the decoder's output and the lm_head weight: Mllama's text model (refused before: its
    get_decoder() is the model itself) serves them; ModernBERT's logits pass a prediction head (dense, activation,
    norm) between the two, which the logits probe names instead of crashing on an nn.Linear called with input ids."""
    mllama = tiny_model("mllama-text")
    assert causal_lm_parts(mllama) == (mllama.model, mllama.lm_head)
    check_fused_logits(mllama)
    with pytest.raises(NotImplementedError, match="ModernBertDecoderForCausalLM: its logits are not its lm_head's "
                                                  "weight applied"):
        check_fused_logits(tiny_model("modernbert-decoder-prediction-head"))


def test_the_decoder_is_found_without_reading_its_signature_at_every_call(monkeypatch):
    """decoder_of runs at every loss call (causal_lm_parts: once an objective's forward, twice a CausalLMLoss call):
    inspect.signature of the decoder's forward was most of its 242 Python calls (Llama-3.2-1B). It is read once per
    forward function; a forward set on a module later is read anew."""
    import inspect
    model = tiny_model("llama-gqa-untied")
    assert decoder_of(model) is model.model
    signature, read = inspect.signature, []
    monkeypatch.setattr(inspect, "signature", lambda *args, **kwargs: read.append(args) or signature(*args, **kwargs))
    for _ in range(3):
        assert causal_lm_parts(model)[0] is model.model
    assert read == []
    model.model.forward = lambda hidden: hidden   # no input_ids: not a decoder
    model.get_decoder = lambda: model.model
    with pytest.raises(TypeError, match="cannot find the decoder"):
        decoder_of(model)
    assert len(read) >= 1
