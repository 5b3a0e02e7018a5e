"""check_flat_units on its own: which FSDP settings cannot flatten a unit that mixes frozen and trainable weights, and
whether FSDP1 itself agrees (the two-process runs, in test_distributed.py, show the error raised on every process
and the runs it lets train)."""
import pytest
import torch

from fastalign.unlearn.sharding import (check_flat_units, full_model_state, head_weight, load_optimizer_state,
                                        load_trainable_state, optimizer_state, trainable_names, trainable_state)
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
    # the attention and MLP blocks are units; what the root's children leave to it (embeddings, norms, lm_head: 2528
    # weights) passes the policy's size too, but the root is no unit of the policy's: it is the root unit, named so
    "root_unit_over_the_size": (dict(SIZE, min_num_params=2500), False, ["lm_head"], "the root unit holds the frozen "
                                "lm_head.weight beside the trainable model.embed_tokens.weight"),
}


def fsdp1_flattens(model, plugin):
    """Whether FSDP1 without use_orig_params wraps `model` under the plugin's auto-wrap policy, or fails to flatten
    a unit ("Must flatten tensors with uniform `requires_grad`")."""
    import copy

    from torch.distributed.fsdp import FullyShardedDataParallel
    policy = copy.copy(plugin)
    policy.set_auto_wrap_policy(model)
    try:
        FullyShardedDataParallel(model, auto_wrap_policy=policy.auto_wrap_policy, use_orig_params=False,
                                 device_id=torch.device("cpu"))
        return True
    except ValueError as error:
        assert "uniform `requires_grad`" in str(error)
        return False


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
    """Refused where a unit mixes them, and the plugin left as it was (the check resolves its policy on a copy: the
    plugin is accelerate's own, which prepares the objective later)."""
    model, plugin = model_and_plugin(case)
    named, policy = CASES[case][3], plugin.auto_wrap_policy
    if named is None:
        check_flat_units(model, plugin)
        assert plugin.auto_wrap_policy is policy
        return
    with pytest.raises(ValueError, match="FSDP version 1 without use_orig_params") as error:
        check_flat_units(model, plugin)
    message = str(error.value)
    assert named in message and plugin.auto_wrap_policy is policy
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
    assert fsdp1_flattens(*model_and_plugin(case)) == (CASES[case][3] is None)


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


class Attending(torch.nn.Module):
    """torch's multi-head attention (3168 weights in its input projection, 1056 in its output one) and an lm_head."""

    def __init__(self):
        super().__init__()
        self.attention, self.lm_head = torch.nn.MultiheadAttention(32, 4), torch.nn.Linear(32, 10, bias=False)

    def get_output_embeddings(self):
        return self.lm_head


def test_a_module_the_policy_does_not_recurse_into_keeps_its_children_in_its_own_unit(one_process_group):
    """The size policy never recurses into torch's nn.MultiheadAttention (a leaf to FSDP), so its output projection,
    large enough to be a unit, stays with the input projection, in the unit that holds the attention: the root unit
    here, where a frozen output projection beside the trainable input one fails to flatten."""
    model = Attending()
    model.attention.out_proj.requires_grad_(False)
    plugin = accelerate.FullyShardedDataParallelPlugin(fsdp_version=1, use_orig_params=False, **SIZE)
    with pytest.raises(ValueError, match="the root unit holds the frozen attention.out_proj.weight beside the "
                                         "trainable attention.in_proj_weight"):
        check_flat_units(model, plugin)
    assert not fsdp1_flattens(model, plugin)


def test_a_lora_model_is_checked_and_named_as_its_base_model():
    """A PEFT model's units are those of the base model it wraps, and the error names its weights as the base model
    does (LoRA's frozen base weight beside its adapter in a layer's unit)."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(37), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    plugin = accelerate.FullyShardedDataParallelPlugin(fsdp_version=1, use_orig_params=False, **TRANSFORMER)
    with pytest.raises(ValueError, match="FSDP version 1 without use_orig_params") as error:
        check_flat_units(model, plugin)
    assert ("unit model.layers.0 holds the frozen model.layers.0.self_attn.q_proj.base_layer.weight beside the "
            "trainable model.layers.0.self_attn.q_proj.lora_A.default.weight") in str(error.value)


def lm_head_of_a_model(seed=0):
    """A two-module model whose second module, its "lm_head", has no bias; and a copy of that weight."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 6, bias=False))
    return model, model[1].weight.detach().clone()


def test_head_weight_gathers_an_fsdp2_unit_and_refuses_what_it_cannot_gather(one_process_group):
    """A plain lm_head's weight is read as it is; FSDP2's unit of its own is gathered (unsharded) into the full weight;
    a weight still sharded (a DTensor: the objective was not the module FSDP2 wrapped) and FSDP1's unit of its own
    are errors that say so, not a shard read as the weight."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.tensor import DTensor

    model, full = lm_head_of_a_model()
    assert head_weight(model[1]) is model[1].weight
    mesh = init_device_mesh("cpu", (1,))
    fully_shard(model[1], mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert isinstance(model[1].weight, DTensor)
    weight = head_weight(model[1])
    assert not isinstance(weight, DTensor) and torch.equal(weight, full)
    model[1].reshard()
    root_only, _ = lm_head_of_a_model()
    fully_shard(root_only, mesh=mesh)   # the lm_head's weight is the root unit's, sharded outside its forward
    with pytest.raises(RuntimeError, match="still sharded"):
        head_weight(root_only[1])
    fsdp1 = FullyShardedDataParallel(lm_head_of_a_model()[0][1], device_id=torch.device("cpu"))
    with pytest.raises(NotImplementedError, match="FSDP \\(version 1\\) unit of its own"):
        head_weight(fsdp1)


def test_a_checkpoints_trainable_and_optimizer_state_load_back_into_a_fresh_model():
    """What resume does: the trainable weights (the frozen lm_head left out of them) and the optimizer state keyed by
    their names load into a freshly loaded model and optimizer, which then hold the saved ones; the frozen lm_head
    stays as loaded; the state given is left as it was."""
    def trained(seed, steps):
        torch.manual_seed(seed)
        model = tiny_llama(37)
        model.lm_head.weight.requires_grad_(False)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(steps):
            model(input_ids=torch.arange(5)[None], labels=torch.arange(5)[None]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return model, optimizer

    model, optimizer = trained(0, 2)
    weights, moments = trainable_state(model), optimizer_state(model, optimizer)
    names = set(weights)
    fresh, fresh_optimizer = trained(1, 1)
    head = fresh.lm_head.weight.detach().clone()
    load_trainable_state(fresh, weights)
    assert set(weights) == names and "lm_head.weight" not in names
    load_optimizer_state(fresh, fresh_optimizer, moments)
    for name, parameter in fresh.named_parameters():
        assert torch.equal(parameter, model.get_parameter(name) if parameter.requires_grad else head), name
    loaded = optimizer_state(fresh, fresh_optimizer)["state"]
    assert set(loaded) == names and all(
        torch.equal(loaded[name][key], moments["state"][name][key]) for name in names for key in loaded[name])


@pytest.mark.parametrize("frozen", ["now", "then"])
def test_an_optimizer_state_of_other_parameters_than_the_trainable_ones_is_refused_naming_them(frozen):
    """A state whose parameters are not the model's trainable ones: torch's loader loaded those in common alone,
    silently (a resume after a Ctrl-C that left LoRA layers frozen trained 12 of its 16 weights, the others' state
    dropped). Refused, naming them, whether the model freezes a weight the state holds or trains one it lacks."""
    def optimized(frozen_norm):
        model = tiny_llama(37)
        model.model.norm.weight.requires_grad_(not frozen_norm)
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    model, optimizer = optimized(frozen == "then")
    model(input_ids=torch.arange(5)[None], labels=torch.arange(5)[None]).loss.backward()
    optimizer.step()
    moments = optimizer_state(model, optimizer)
    fresh, fresh_optimizer = optimized(frozen == "now")
    named = r"parameter\(s\) \['model\.norm\.weight'\]"
    expected = f"holds {named} that the model does not train" if frozen == "now" else f"lacks trainable {named}"
    with pytest.raises(ValueError, match=f"the optimizer state {expected}"):
        load_optimizer_state(fresh, fresh_optimizer, moments)
