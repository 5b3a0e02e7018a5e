"""What merging a LoRA update into low-precision weights loses: measured, reported, warned of, and the unmerged
adapter saved beside model/ so that the update is kept exactly."""
import json
import math
import warnings

import pytest
import torch
from transformers import LlamaForCausalLM

from fastalign.eval_mode import eval_mode
from fastalign.unlearn.config import UnlearnConfig
from fastalign.unlearn.lora_merge import MERGE_ERROR_WARNING, merge_rounding_error
from fastalign.unlearn.models import cast_weights
from fastalign.unlearn.trainer import UnlearningTrainer
from tests.unlearn.tiny import byte_bpe_tokenizer, tiny_llama, tiny_streams

peft = pytest.importorskip("peft")
pytest.importorskip("accelerate")

LOSSY = "merging the LoRA adapter into the weights of .*model lost"


def one_linear(deltas, dtype):
    """A 4x4 Linear of ones in `dtype` under one rank-1 adapter per entry of `deltas`, each adding that constant."""
    base = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False))
    torch.nn.init.ones_(base[0].weight)
    model = peft.get_peft_model(base.to(dtype), peft.LoraConfig(r=1, lora_alpha=1, target_modules=["0"]),
                                adapter_name="a0")
    for i in range(1, len(deltas)):
        model.add_adapter(f"a{i}", peft.LoraConfig(r=1, lora_alpha=1, target_modules=["0"]))
    model.base_model.set_adapter([f"a{i}" for i in range(len(deltas))])
    layer = model.base_model.model[0]
    for i, delta in enumerate(deltas):
        torch.nn.init.ones_(layer.lora_A[f"a{i}"].weight)
        torch.nn.init.constant_(layer.lora_B[f"a{i}"].weight, delta)
    return model


def merged_error(model):
    """The share of the update merge_and_unload really loses, read off the weight it leaves."""
    layer = model.base_model.model[0].requires_grad_(False)
    delta = sum(layer.get_delta_weight(a).float() for a in layer.active_adapters)
    change = model.merge_and_unload()[0].weight.float() - 1.0
    return float((change - delta).norm() / delta.norm())


@pytest.mark.parametrize("deltas, dtype, expected", [
    ([1e-3], torch.bfloat16, 1.0),  # 1 + 1e-3 rounds back to 1: the whole update is lost
    ([2.0 ** -7], torch.bfloat16, 0.0),  # one bf16 step at 1: kept exactly
    ([0.6 * 2 ** -7] * 2, torch.bfloat16, 2 / 3),  # rounded after each adapter: 1 + 2 steps where 1.2 were meant
    ([1e-3], torch.float32, 0.0),  # fp32 keeps 1e-3 on 1 to ~6e-8
    ([0.0], torch.bfloat16, 0.0),  # no update, nothing lost
], ids=["bf16-all-lost", "bf16-exact", "bf16-two-adapters", "fp32", "zero"])
def test_merge_rounding_error_is_what_the_merge_loses(deltas, dtype, expected):
    model = one_linear(deltas, dtype)
    error = merge_rounding_error(model)
    assert error == pytest.approx(expected, abs=1e-4)
    if any(deltas):
        assert error == pytest.approx(merged_error(model), rel=1e-6, abs=1e-9)


def test_adapters_on_different_layers_are_each_measured_on_their_own_layer():
    """Two active adapters, one on each of two bf16 layers of ones: each layer lists both as active but holds one (a
    KeyError where the other's delta was asked for). The first's 1e-3 a weight is lost, the second's 2**-7 kept."""
    base = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False))
    for linear in base:
        torch.nn.init.ones_(linear.weight)
    model = peft.get_peft_model(base.to(torch.bfloat16), peft.LoraConfig(r=1, lora_alpha=1, target_modules=["0"]),
                                adapter_name="a0")
    model.add_adapter("a1", peft.LoraConfig(r=1, lora_alpha=1, target_modules=["1"]))
    model.base_model.set_adapter(["a0", "a1"])
    for i, (layer, delta) in enumerate(zip(model.base_model.model, (1e-3, 2.0 ** -7))):
        assert layer.active_adapters == ["a0", "a1"] and list(layer.lora_A) == [f"a{i}"]
        torch.nn.init.ones_(layer.lora_A[f"a{i}"].weight)
        torch.nn.init.constant_(layer.lora_B[f"a{i}"].weight, delta)
    assert merge_rounding_error(model) == pytest.approx(math.sqrt(1e-6 / (1e-6 + 2.0 ** -14)), rel=1e-3)


def test_merge_rounding_error_of_a_variant_is_not_measured():
    """DoRA merges a rescaled weight, not W0 + delta: no number rather than a wrong one."""
    base = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False))
    model = peft.get_peft_model(base, peft.LoraConfig(r=1, target_modules=["0"], use_dora=True))
    assert merge_rounding_error(model) is None


def train(tmp_path, precision, lr=1e-5, model=None):
    """A 2-step LoRA run; returns the summary, the trained (unmerged) model's logits on a batch and that batch."""
    tokenizer = byte_bpe_tokenizer()
    config = UnlearnConfig(output_dir=str(tmp_path / "run"), max_steps=2, lr=lr, precision=precision, lora=True,
                           lora_rank=4, progress=False)
    ids = tiny_streams(tokenizer).batch(0).tokens.input_ids
    logits = []

    def keep_logits(record):
        with torch.no_grad(), eval_mode(trainer.model):
            logits.append(trainer.model(ids).logits)

    trainer = UnlearningTrainer(model or tiny_llama(len(tokenizer)), tiny_streams(tokenizer), config,
                                tokenizer=tokenizer, step_callback=keep_logits)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = trainer.train()
    lossy = [str(w.message) for w in caught if "merging the LoRA adapter" in str(w.message)]
    return summary, logits[-1], ids, lossy


def base_model(precision):
    """The model the run started from, in the dtype it trained in."""
    model = tiny_llama(len(byte_bpe_tokenizer()))
    return cast_weights(model, torch.bfloat16) if precision == "bf16" else model


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_lora_run_saves_its_adapter_and_reports_what_the_merge_lost(tmp_path, precision):
    """lr 1e-5 gives deltas of ~1e-5 on weights of std 0.02: bf16 weights round most of them away in model/,
    fp32 ones keep them; the adapter keeps them either way."""
    summary, trained_logits, ids, lossy = train(tmp_path, precision)
    run_dir = tmp_path / "run"
    assert summary.adapter_dir == str(run_dir / "adapter")
    adapter_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (4, 16)   # lora_rank and lora_alpha, as configured
    assert json.loads((run_dir / "run.json").read_text())["merge_rounding_error"] == summary.merge_rounding_error

    # the number is what the merge did to the weights saved in model/, layer by layer
    adapted = peft.PeftModel.from_pretrained(base_model(precision), summary.adapter_dir)
    merged = LlamaForCausalLM.from_pretrained(run_dir / "model", dtype=adapted.dtype)
    lost_sq = update_sq = 0.0
    with torch.no_grad():
        for name, module in adapted.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                delta = module.get_delta_weight("default").float()
                original = module.get_base_layer().weight.float()
                saved = merged.get_submodule(name.removeprefix("base_model.model.")).weight.float()
                lost_sq += float((saved - original - delta).double().norm()) ** 2
                update_sq += float(delta.double().norm()) ** 2
    assert update_sq > 0
    assert summary.merge_rounding_error == pytest.approx(math.sqrt(lost_sq / update_sq), rel=1e-5, abs=1e-7)

    # the adapter on the base model is the model trained
    with torch.no_grad():
        torch.testing.assert_close(adapted.eval()(ids).logits, trained_logits, rtol=0, atol=1e-6)
    if precision == "bf16":
        assert summary.merge_rounding_error > 0.5
        assert len(lossy) == 1 and f"{summary.merge_rounding_error:.4g}" in lossy[0]
        assert summary.adapter_dir in lossy[0] and "keeps the update" in lossy[0]
    else:
        assert summary.merge_rounding_error < 1e-3 and not lossy


def test_a_dora_run_saves_its_adapter_and_reports_no_number(tmp_path):
    model = peft.get_peft_model(base_model("bf16"), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    summary, _, _, lossy = train(tmp_path, "bf16", model=model)
    assert summary.merge_rounding_error is None and not lossy
    assert json.loads((tmp_path / "run" / "run.json").read_text())["merge_rounding_error"] is None
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_a_merge_that_loses_little_is_not_warned_of(tmp_path):
    summary, _, _, lossy = train(tmp_path, "bf16", lr=1e-2)  # updates far above a bf16 step
    assert summary.merge_rounding_error < MERGE_ERROR_WARNING and not lossy
