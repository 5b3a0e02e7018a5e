"""eval_mode: dropout off inside the block, every module's own mode back afterwards, nothing switched for a model
already in eval mode throughout (the runtime enters it before every forward), also when threads overlap."""
import importlib
import random
import threading
import types

import pytest
import torch

from fastalign.eval_mode import _any_training, eval_mode
from tests.interrupts import interrupted_at

eval_mode_module = importlib.import_module("fastalign.eval_mode")   # the package's name eval_mode is the function


class _CountsTrain(torch.nn.Module):
    """A module that counts the calls of train() (eval() is train(False)) on it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.train_calls = 0

    def train(self, mode=True):
        self.train_calls += 1
        return super().train(mode)


def _nested():
    """Modules four levels deep, with a submodule registered as None and a module reachable twice."""
    shared = torch.nn.Linear(3, 3)
    deep = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5))
    branch = torch.nn.Sequential(deep, shared)
    branch.register_module("absent", None)     # skipped by Sequential's forward and by modules()
    model = _CountsTrain(torch.nn.Sequential(shared, branch)).eval()
    model.train_calls = 0
    return model


def _modes(model):
    return [m.training for m in model.modules()]


def test_a_model_in_eval_mode_throughout_is_left_as_it_is():
    model = _nested()
    with eval_mode(model) as inside:
        assert inside is model and model.train_calls == 0
    assert model.train_calls == 0 and not any(_modes(model))


@pytest.mark.parametrize("which", range(7))
def test_one_module_in_train_mode_anywhere_turns_all_off_and_each_mode_comes_back(which):
    """Whichever module trains (the deepest dropout, the shared one, the root), everything is in eval mode inside
    the block, dropout is off, and every module has its own mode back afterwards."""
    model = _nested()
    modules = list(model.modules())
    modules[which].train(True) if which == 0 else setattr(modules[which], "training", True)
    before = _modes(model)
    x = torch.ones(4, 3)
    train_calls = model.train_calls
    with eval_mode(model):
        assert not any(_modes(model)) and model.train_calls == train_calls   # flags switched, no train() run
        dropout = next(m for m in modules if isinstance(m, torch.nn.Dropout))
        assert torch.equal(dropout(x), x)                  # the dropout is off
    assert _modes(model) == before


def test_any_training_agrees_with_every_module_of_a_llama():
    """The walk answers as `any(m.training for m in model.modules())` does, whichever few modules train."""
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    modules = list(model.modules())
    rng = random.Random(0)
    for trial in range(200):
        for m in modules:
            m.training = rng.random() < (0.02 if trial % 2 else 0.0)
        assert _any_training(model) == any(m.training for m in modules)
    for m in modules:                    # each module alone
        model.eval()
        m.training = True
        assert _any_training(model)


def test_a_policy_with_hub_kernels_trains_on_with_the_kernels_of_training(tmp_path, monkeypatch):
    """transformers >= 5.25 loads with Hub kernels on by default and kernelizes again at each train()/eval() mode
    change: a block that called eval() left a training policy in the kernels' inference mode."""
    from transformers import LlamaForCausalLM
    from transformers.utils import is_kernels_available
    if not is_kernels_available():
        pytest.skip("transformers' Hub kernels need the kernels package")
    from kernels import Mode
    from tests.rain.tiny import tiny_llama
    tiny_llama().save_pretrained(tmp_path)
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    model = LlamaForCausalLM.from_pretrained(tmp_path).train()   # kernelized (on the CPU: nothing to swap)
    assert model.use_kernels and model.kernels_mode == Mode.TRAINING
    with eval_mode(model):
        model(torch.tensor([[1, 2, 3]]))
    assert model.training and model.kernels_mode == Mode.TRAINING


@pytest.mark.parametrize("second_on", ["model", "submodule"])
@pytest.mark.parametrize("first_out", ["A", "B"])
def test_blocks_overlapping_in_two_threads_keep_eval_mode_until_the_last_one_ends(second_on, first_out):
    """Thread A enters on a training model, thread B enters on it (or on a submodule) while A is inside, then they
    leave in either order: whoever is still inside runs with its modules in eval mode (dropout off), and every mode
    comes back once both are out. B found the model in eval mode and switched nothing, so that A, leaving first,
    put the model back in training mode under B's forward."""
    model = _nested()
    model.train()
    dropout = next(m for m in model.modules() if isinstance(m, torch.nn.Dropout))
    targets = {"A": model, "B": {"model": model, "submodule": list(model.modules())[3]}[second_on]}
    entered, go, seen = {n: threading.Event() for n in "AB"}, {n: threading.Event() for n in "AB"}, {}

    def inside(name):
        with eval_mode(targets[name]):
            entered[name].set()
            assert go[name].wait(timeout=60)    # a guard against a hung test, not a synchronisation
            x = torch.ones(8, 3)
            seen[name] = (not any(_modes(targets[name])), torch.equal(dropout(x), x))

    threads = {n: threading.Thread(target=inside, args=(n,), daemon=True) for n in "AB"}
    for name in "AB":
        threads[name].start()
        assert entered[name].wait(timeout=60)
    for name in (first_out, "B" if first_out == "A" else "A"):
        go[name].set()
        threads[name].join(timeout=60)
    assert seen == {"A": (True, True), "B": (True, True)}
    assert all(_modes(model))


def _with_nested(code):
    """`code` and the code objects nested in it (a comprehension's, before Python 3.12)."""
    return [code] + [c for const in code.co_consts if isinstance(const, types.CodeType) for c in _with_nested(const)]


@pytest.mark.parametrize("walk", ["start", "end"])
def test_a_ctrl_c_anywhere_in_a_walk_leaves_every_module_its_own_mode(walk):
    """A Ctrl-C (KeyboardInterrupt raised at each line of the walk in turn) as a block starts or ends, while another
    block runs on another model: the modules switched so far stayed counted, and every later block left them in eval
    mode for good (dropout off in training: an unlearning run interrupted and resumed differed from an uninterrupted
    one by 0.0315); at the end, one as the block left the running ones or as the modules the others hold were
    gathered left them in eval mode. Each module has its own mode back right after, and after a later block."""
    model = _nested().train()
    list(model.modules())[5].training = False    # a module in eval mode inside a model that trains
    before = _modes(model)
    codes = ([eval_mode.__wrapped__.__code__, _any_training.__code__] if walk == "start"
             else _with_nested(eval_mode_module._end.__code__))
    with eval_mode(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout()).train()):
        with interrupted_at(codes, 0) as seen, eval_mode(model):
            started = seen[0]
        lines = started if walk == "start" else seen[0]
        assert lines >= 2 * len(before)
        for line in range(1, lines + 1):
            with pytest.raises(KeyboardInterrupt), interrupted_at(codes, line), eval_mode(model):
                pass
            assert _modes(model) == before, line
            with eval_mode(model):
                assert not any(_modes(model)), line
            assert _modes(model) == before, line
    assert not eval_mode_module._own and not eval_mode_module._blocks
