"""PagedHF: what its probe refuses, and how its routing of a model's attention stays inside the runner's forwards.
(Its trees match Hugging Face's logits in test_tree_runner.py, on the families of tiny_models.py.)"""
import copy
import threading

import pytest
import torch
from transformers import GPT2LMHeadModel, GptOssConfig, GptOssForCausalLM
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

from fastalign import TreeRunner
from fastalign.runtime import attention_routing
from tests.runtime.tiny_models import VOCAB, tiny_model


def refusal(model):
    """The reason the runner gives when made with fallback=False."""
    with pytest.raises(ValueError) as error:
        TreeRunner(model, max_tokens=64, block_size=4, fallback=False)
    return str(error.value)


def test_attention_sinks_are_refused_by_name():
    """gpt-oss passes its per-head sinks (s_aux) to the attention function: attending without them would be
    silently wrong, so the probe refuses the model and names the argument."""
    torch.manual_seed(0)
    model = GptOssForCausalLM(GptOssConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1, sliding_window=8,
        pad_token_id=0, eos_token_id=0, bos_token_id=0)).eval()
    assert "GptOssForCausalLM cannot run on the paged pool: layer 0 passes s_aux to attention" in refusal(model)
    assert not TreeRunner(model, max_tokens=64, block_size=4).paged   # the fallback takes it


class PositionsFromZero(GPT2LMHeadModel):
    """GPT-2 that ignores the positions it is given (as a model computing them from its own cache would)."""

    def forward(self, input_ids=None, position_ids=None, **kwargs):
        return super().forward(input_ids=input_ids, **kwargs)


def test_a_model_whose_logits_on_the_pool_differ_from_its_own_is_refused():
    """Routing passes the probe's first checks, but the second forward of the probe's sequence gets positions 0, 1,
    2 instead of 3, 4, 5: its logits differ from the model's own forward, and the model is refused."""
    gpt2 = tiny_model("gpt2-learned-positions")
    model = PositionsFromZero(gpt2.config).eval()
    model.load_state_dict(gpt2.state_dict())
    assert "its logits on the pool differ from its own forward's" in refusal(model)


class EagerAttention(GPT2Attention):
    """GPT-2's attention that always attends by its eager code, whatever its config names (as a module that does not
    go through transformers' attention interface)."""

    def forward(self, *args, **kwargs):
        config = self.config
        self.config = copy.copy(config)
        self.config._attn_implementation = "eager"
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.config = config


def test_a_layer_whose_attention_bypasses_the_interface_is_refused():
    """A layer that attends by itself would write no K/V to the pool; the probe sees its call missing."""
    model = tiny_model("gpt2-learned-positions")
    model.transformer.h[1].attn.__class__ = EagerAttention
    assert "the attention calls of a forward came from layers [0], not once from each of its 2 layers" in refusal(model)


def test_a_forward_where_a_layer_skips_attention_raises():
    """The same bypass arising after the probe: the forward raises instead of returning logits computed without
    that layer's cache."""
    model = tiny_model("gpt2-learned-positions")
    runner = TreeRunner(model, max_tokens=64, block_size=4)
    model.transformer.h[1].attn.__class__ = EagerAttention
    with pytest.raises(RuntimeError, match="model: 1 of its 2 layers attended in this forward"):
        runner.prefill([1, 2, 3])


def test_the_model_attends_by_its_own_implementation_outside_the_runners_forwards():
    """Routing lasts one forward: the config names the model's implementation again afterwards, and the model's
    own forward still gives its logits."""
    model = tiny_model("gpt2-learned-positions")
    implementation = model.config._attn_implementation
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.no_grad():
        before = model(ids).logits
    runner = TreeRunner(model, max_tokens=64, block_size=4)
    runner.extend([runner.prefill([5, 9])], [[2, 7]])
    assert model.config._attn_implementation == implementation
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_another_thread_using_the_model_during_a_routed_forward_is_refused():
    """While a runner's forward runs, the model's config names the routed implementation; the model's own forward
    in another thread then has no handler and is refused by name instead of attending without a cache."""
    model = tiny_model("gpt2-learned-positions")
    errors = []

    def elsewhere():
        try:
            model(torch.tensor([[1, 2]]))
        except RuntimeError as error:
            errors.append(str(error))

    with attention_routing.routed([model.config], handler=None):
        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
    assert errors and "its attention is routed to a fastalign TreeRunner's KV pool" in errors[0]
    assert model.config._attn_implementation != attention_routing.IMPLEMENTATION
