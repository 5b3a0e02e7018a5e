"""check_flat_units on its own: which FSDP settings cannot flatten a unit that mixes frozen and trainable weights, and
whether FSDP1 itself agrees (the two-process runs, in test_distributed.py, show the error raised on every process
and the runs it lets train)."""
import pytest
import torch

from fastalign.unlearn.sharding import check_flat_units, full_model_state, trainable_names, trainable_state
from tests.unlearn.tiny import tiny_llama

accelerate = pytest.importorskip("accelerate")

TRANSFORMER = dict(auto_wrap_policy="transformer_based_wrap")   # a unit per decoder layer, the rest in the root
SIZE = dict(auto_wrap_policy="size_based_wrap", min_num_params=1000)   # every module of >= 1000 weights a unit

# (policy, tied embeddings, frozen weights (parts of their names), the unit and the weights the error names, or None)
CASES = {
    "cached_reference": (TRANSFORMER, False, ["lm_head"], "the root unit holds the frozen lm_head.weight beside the "
                                                          "trainable model.embed_tokens.weight"),
    "cached_reference_tied": (TRANSFORMER, True, ["lm_head"],   # the embeddings are the lm_head: the final norm trains
                              "the root unit holds the frozen model.embed_tokens.weight = lm_head.weight beside the "
                              "trainable model.norm.weight"),
    "frozen_embeddings_too": (TRANSFORMER, False, ["lm_head", "embed"],
                              "the root unit holds the frozen lm_head.weight beside the trainable model.norm.weight"),
    "whole_root_frozen": (TRANSFORMER, False, ["lm_head", "embed", "model.norm"], None),
    "no_wrap": ({}, False, ["lm_head", "embed", "model.norm"],   # one unit: the layers train in it
                "the root unit holds the frozen lm_head.weight beside the trainable model.layers.0"),
    "lm_head_unit_of_its_own": (SIZE, False, ["lm_head"], None),
    "lora_like": (TRANSFORMER, False, ["q_proj"],   # a layer's frozen weight beside its trainable ones
                  "unit model.layers.0 holds the frozen model.layers.0.self_attn.q_proj.weight beside the trainable "
                  "model.layers.0.self_attn.k_proj.weight"),
    "nothing_frozen": (TRANSFORMER, False, [], None),   # reference='copy': every weight trains
    # the layers' units take their projections; what is left of a layer (its norms) is too small to be one and falls
    # to the root unit, beside the trainable final norm
    "layer_norms_size_wrap": (SIZE, False, ["layernorm"], "the root unit holds the frozen "
                              "model.layers.0.input_layernorm.weight beside the trainable model.norm.weight"),
}


def model_and_plugin(case, **plugin_options):
    policy, tied, frozen, _ = CASES[case]
    model = tiny_llama(37)
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    for name, parameter in model.named_parameters(remove_duplicate=False):   # a tied weight frozen by either name
        if any(part in name for part in frozen):
            parameter.requires_grad_(False)
    options = dict(fsdp_version=1, use_orig_params=False, **policy)
    return model, accelerate.FullyShardedDataParallelPlugin(**{**options, **plugin_options})


@pytest.mark.parametrize("case", CASES)
def test_a_unit_mixing_frozen_and_trainable_weights_is_refused_naming_both(case):
    model, plugin = model_and_plugin(case)
    named = CASES[case][3]
    if named is None:
        check_flat_units(model, plugin)
        return
    with pytest.raises(ValueError, match="FSDP version 1 without use_orig_params") as error:
        check_flat_units(model, plugin)
    message = str(error.value)
    assert named in message
    for fix in ["--fsdp_use_orig_params true", "FSDP version 2", "reference='copy'"]:
        assert fix in message


@pytest.mark.parametrize("plugin_options", [dict(use_orig_params=True), dict(fsdp_version=2)],
                         ids=["fsdp1_orig_params", "fsdp2"])
def test_fsdp_keeping_the_original_parameters_mixes_them_in_a_unit(plugin_options):
    model, plugin = model_and_plugin("cached_reference_tied", **plugin_options)
    check_flat_units(model, plugin)
    check_flat_units(model, None)   # no FSDP at all


@pytest.fixture(scope="module")
def one_process_group():
    """A gloo group of one process, for FSDP1 to wrap a model on the CPU."""
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("case", CASES)
def test_fsdp1_fails_to_flatten_exactly_where_the_check_refuses(case, one_process_group):
    """The check's units are those FSDP1 makes under accelerate's policy: FSDP1 fails ("Must flatten tensors with
    uniform `requires_grad`") exactly in the cases refused above."""
    import copy

    from torch.distributed.fsdp import FullyShardedDataParallel
    model, plugin = model_and_plugin(case)
    policy = copy.copy(plugin)
    policy.set_auto_wrap_policy(model)
    try:
        FullyShardedDataParallel(model, auto_wrap_policy=policy.auto_wrap_policy, use_orig_params=False,
                                 device_id=torch.device("cpu"))
        flattened = True
    except ValueError as error:
        assert "uniform `requires_grad`" in str(error)
        flattened = False
    assert flattened == (CASES[case][3] is None)


def test_the_trainable_state_holds_the_trainable_parameters_alone():
    """A checkpoint's weights are the trainable ones (resume loads them over the model as loaded): a frozen lm_head,
    or LoRA's frozen base, must not be written into every checkpoint; the full state still holds it."""
    model = tiny_llama(37)
    model.lm_head.weight.requires_grad_(False)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    state = trainable_state(model)
    assert set(state) == trainable_names(model) == trainable and "lm_head.weight" not in trainable
    assert all(torch.equal(state[name], model.get_parameter(name)) for name in trainable)
    assert "lm_head.weight" in full_model_state(model)
