"""The public API as a type checker sees it (fastalign ships py.typed, PEP 561): the names that fastalign exports
lazily resolve to their annotated definitions, through the decorators around them, and an argument outside an op's
choices is a type error in the caller's code, before anything runs."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# (a test extra: the GPU machine's image has no mypy, and a module-level ImportError there failed the GPU session's
# whole test step at collection, whatever its GPU tests did)
MYPY_VERSION = pytest.importorskip("mypy.version").__version__

ROOT = Path(__file__).resolve().parents[1]
USER_CODE = """\
import torch
import fastalign
from fastalign import KahanAdamW, TreeRunner, linear_cross_entropy

h, w, y = torch.randn(3, 4, requires_grad=True), torch.randn(5, 4), torch.tensor([0, 1, 2])
reveal_type(linear_cross_entropy(h, w, y, reduction="sum"))
reveal_type(fastalign.linear_kl_div(h, w, h.detach(), w, backend="torch"))
reveal_type(fastalign.rms_norm(h, torch.ones(4), rule="one plus"))
reveal_type(fastalign.gated_linear(h, h, w, activation="gelu_tanh"))
reveal_type(fastalign.unlearning_token_weights(None, torch.ones(1, 2, dtype=torch.bool)))
reveal_type(KahanAdamW([w], lr=1e-5, betas=(0.9, 0.95)))
runner = TreeRunner(torch.nn.Linear(2, 2), max_tokens=64)
reveal_type(runner.prefill([1, 2, 3]))
reveal_type(runner.prefill([1, 2, 3]).parent)
reveal_type(runner.prefill([1, 2, 3]).tokens)
def unlearn(config: fastalign.UnlearnConfig) -> None:
    reveal_type(fastalign.run_unlearning(config))
reveal_type(fastalign.fuse_causal_lm_loss(torch.nn.Linear(2, 2)))
runner.extend([None], [[4]], logits="all")
linear_cross_entropy(h, w, y, reduction="avg")
fastalign.linear_kl_div(h, w, h, w, backend="cuda")
fastalign.gated_activation(h, h, activation="relu")
runner.extend([None], [[4]], hidden="first")
KahanAdamW([w], betas=0.9)
fastalign.UnlearnConfig(model="dir", precision="fp16")
fastalign.rain_generate(torch.nn.Linear(2, 2), None, ["Hi"], engine="fast")
fastalign.CausalLMLoss(torch.nn.Linear(2, 2), backend="gpu")
fastalign.CausalLMKLDiv(torch.nn.Linear(2, 2), reference="copy")
from fastalign import linear_cross_entorpy
from fastalign.unlearn import UnlearnConfg
fastalign.rms_nrom
"""
REVEALED = ["torch._tensor.Tensor"] * 5 + ["fastalign.optim.kahan_adamw.KahanAdamW", "fastalign.runtime.span.Span",
                                           "fastalign.runtime.span.Span | None", "list[int]",
                                           "fastalign.unlearn.trainer.RunSummary", "torch.nn.modules.linear.Linear"]
# the lines after `runner.extend(..., logits="all")`, each refused for its argument (the overloaded
# TreeRunner.extend's, hidden=, as a call no overload matches): (text in the error, its code)
REFUSED = dict(zip(range(USER_CODE.splitlines().index('runner.extend([None], [[4]], logits="all")') + 2,
                         len(USER_CODE.splitlines()) + 1),
                   [(f'Argument "{argument}"', "[arg-type]") if argument else
                    ('No overload variant of "extend"', "[call-overload]")
                    for argument in ["reduction", "backend", "activation", None, "betas", "precision", "engine",
                                     "backend", "reference"]]))
# the last lines' misspelled names, each an error (the lazy exports' __getattr__ made any name an Any)
MISSPELLED = {len(USER_CODE.splitlines()) - k: name for k, name in enumerate(["rms_nrom", "UnlearnConfg",
                                                                           "linear_cross_entorpy"])}


# A user's typed training code (README's usage), checked with `mypy --strict`. Each line's trailing comment
# says what mypy reports there, and only there: `# reveal: TYPE` or `# error: [code] TEXT` (TEXT in the message).
TYPED_USER_CODE = """\
from typing import Callable

import torch
import fastalign
from fastalign.unlearn import (CachedReference, RowPacker, UnlearningBatch, UnlearningObjective, fused_layers,
                               load_pairs)


def train_step(opt: fastalign.KahanAdamW, closure: Callable[[], float]) -> float:
    opt.step()
    opt.load_state_dict(opt.state_dict())
    opt.add_param_group({"params": [torch.zeros(2)]})
    reveal_type(opt.step(closure))  # reveal: float
    return opt.step(closure)


def search(runner: fastalign.TreeRunner, root: fastalign.Span, candidates: list[list[int]]) -> torch.Tensor:
    kids, logits = runner.extend([root] * 10, candidates)
    reveal_type(kids)  # reveal: list[fastalign.runtime.span.Span]
    kids.append(3)  # error: [arg-type] Argument 1 to "append"
    _, per_token = runner.extend([root], [[1, 2]], logits="all")
    reveal_type(per_token)  # reveal: list[torch._tensor.Tensor]
    reveal_type(runner.vocab_size)  # reveal: int | None
    reveal_type(runner.last_restored)  # reveal: dict[int, int]
    return logits


def choices(model: torch.nn.Module, x: torch.Tensor, w: torch.Tensor) -> None:
    with fused_layers(model, backend="cuda"):  # error: [arg-type] Argument "backend"
        pass
    with fused_layers(model) as replaced:
        reveal_type(replaced)  # reveal: int
    UnlearningObjective(model, backend="gpu")  # error: [arg-type] Argument "backend"
    UnlearningObjective(model, packing="padded")  # error: [arg-type] Argument "packing"
    RowPacker(model, mode="always")  # error: [arg-type] Argument "mode"
    CachedReference(model, [], storage="cpu")  # error: [arg-type] Argument "storage"
    fastalign.rms_norm(x, w, rule="one_plus")  # error: [arg-type] Argument "rule"
    load_pairs("a.jsonl", fmt="pku-saferlhf")  # error: [arg-type] Argument "fmt"


def losses(loss_fn: fastalign.CausalLMLoss, kl_fn: fastalign.CausalLMKLDiv, objective: UnlearningObjective,
           batch: UnlearningBatch, ids: torch.Tensor) -> torch.Tensor:
    reveal_type(kl_fn(input_ids=ids, labels=ids))  # reveal: torch._tensor.Tensor
    reveal_type(objective(batch).total)  # reveal: torch._tensor.Tensor
    loss_fn(input_ids=ids, labels=ids, reduction="avg")  # error: [arg-type] Argument "reduction"
    return loss_fn(input_ids=ids, labels=ids)


class PoolFull(fastalign.PoolExhaustedError):
    pass


def exhausted(runner: fastalign.TreeRunner) -> int:
    try:
        runner.prefill([1] * 100_000)
    except fastalign.PoolExhaustedError as err:
        reveal_type(err)  # reveal: fastalign._C.PoolExhaustedError
    return runner.tree.num_free_blocks


def run(config: fastalign.UnlearnConfig) -> None:
    fastalign.run_unlearning(config, step_callbak=print)  # error: [call-arg] "step_callbak"
"""


def mypy_messages(tmp_path, name, code, *options):
    """{line: [message]} of mypy's errors and revealed types on the user file `name` holding `code`, with the
    checkout's sources read as a type checker reads an installed fastalign; errors inside fastalign are not the
    caller's (silent), as for any installed package."""
    (tmp_path / name).write_text(code)
    done = subprocess.run([sys.executable, "-m", "mypy", str(tmp_path / name), "--cache-dir",
                           str(tmp_path / "cache"), "--follow-imports", "silent", "--no-error-summary", *options],
                          env={**os.environ, "MYPYPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert done.returncode in (0, 1) and not done.stderr, (f"mypy {MYPY_VERSION}", done.stdout, done.stderr)
    messages = {}
    for line, kind, message in re.findall(rf"{re.escape(name)}:(\d+): (error|note): (.*)", done.stdout):
        if kind == "error" or message.startswith("Revealed type"):
            # (mypy before 2.0 spelled builtins out: "builtins.list[builtins.int]")
            messages.setdefault(int(line), []).append(message.replace("builtins.", ""))
    return messages


def test_the_public_api_is_typed_for_the_callers_type_checker(tmp_path):
    messages = mypy_messages(tmp_path, "user.py", USER_CODE)
    notes = [m.removeprefix("Revealed type is ") for ms in messages.values() for m in ms if m.startswith("Revealed")]
    assert notes == [f'"{t}"' for t in REVEALED], messages
    errors = {line: ms[0] for line, ms in messages.items() if not ms[0].startswith("Revealed")}
    assert set(errors) == set(REFUSED) | set(MISSPELLED), messages
    for line, (text, code) in REFUSED.items():
        assert text in errors[line] and errors[line].endswith(code), errors[line]
    for line, name in MISSPELLED.items():
        assert f'"{name}"' in errors[line] and "[attr-defined]" in errors[line], errors[line]


def test_typed_training_code_sees_precise_types_and_its_misspelled_choices(tmp_path):
    """Under --strict: KahanAdamW's step is typed as torch's (its closure's float), TreeRunner.extend's results as
    each `logits` mode documents them, the loss modules' calls as their forwards (not Module.__call__'s Any), the C++
    extension's PoolExhaustedError as a class (a stub) that can be subclassed; a choice outside its Literal and an
    option run_unlearning does not take are errors in the caller's code."""
    messages = mypy_messages(tmp_path, "typed_user.py", TYPED_USER_CODE, "--strict")
    expected = {number: comment for number, line in enumerate(TYPED_USER_CODE.splitlines(), 1)
                if (comment := re.search(r"  # (reveal|error): (.*)", line))}
    assert set(messages) == set(expected), messages
    for line, comment in expected.items():
        (message,) = messages[line]
        if comment[1] == "reveal":
            assert message == f'Revealed type is "{comment[2]}"', (line, message)
        else:
            code, text = comment[2].split(" ", 1)
            assert message.endswith(code) and text in message, (line, message)


def test_fastalign_ships_its_py_typed_marker_and_the_c_extensions_stub():
    """An installed fastalign without _C.pyi gave its users the C++ extension's names (PoolExhaustedError) as Any."""
    tomllib = pytest.importorskip("tomllib")   # Python 3.11+; requires-python allows 3.10
    assert (ROOT / "fastalign" / "py.typed").is_file() and (ROOT / "fastalign" / "_C.pyi").is_file()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert {"py.typed", "_C.pyi"} <= set(package_data["fastalign"])
    assert os.path.getsize(ROOT / "fastalign" / "py.typed") == 0
