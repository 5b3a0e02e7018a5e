"""Every setting of an unlearning run in one flat, validated dataclass, loadable from JSON or YAML.

Defaults follow SPEC §1 (the reference's recipe): lr 2e-6, batch 2, at most 1000 steps, K = 5 mismatch
answers per prompt, weights 0.5 / 1.0 / 1.0, early stop once the forget NLL exceeds 100.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from typing import Literal, get_args

from fastalign.config_files import dataclass_from_dict
from fastalign.data_files import DataError, check_data_file
from fastalign.ops.backend import Backend, check_backend
from fastalign.ops.checks import check_count, check_seed, is_finite_real, is_real
from fastalign.prompt_templates import SPEC_TEMPLATE, chat_option_problem
from fastalign.unlearn.formats import FORMATS, Format
from fastalign.unlearn.objective import LossWeights
from fastalign.unlearn.packing import MODES as PACKING_MODES, Packing
from fastalign.unlearn.reference import CACHE_STORAGES, REFERENCE_MODES, CacheStorage, ReferenceMode
from fastalign.writable import cannot_create_in, not_a_regular_file

Precision = Literal["fp32", "bf16-mixed", "bf16"]
PRECISIONS = get_args(Precision)


def _default(name: str):
    """UnlearnConfig's default for the setting `name`."""
    setting = UnlearnConfig.__dataclass_fields__[name]
    return setting.default_factory() if setting.default is dataclasses.MISSING else setting.default


@dataclass
class UnlearnConfig:
    """Settings of `fastalign unlearn`; see `fastalign unlearn --help` for what each one means."""

    # model and data
    model: str = ""
    forget: list[str] = field(default_factory=list)
    forget_format: Literal["auto"] | Format = "auto"
    normal: str | None = None
    mismatch_pool: str | None = None
    output_dir: str = ""
    template: str = SPEC_TEMPLATE
    chat_template: bool = False
    system: str | None = None
    chat_template_kwargs: dict | None = None
    answer_eos: bool = False
    max_length: int = 512
    skip_long_prompts: bool = False
    truthfulqa_test_fraction: float = 0.2
    truthfulqa_pool_fraction: float = 0.3
    # objective
    batch_size: int = 2
    normal_batch_size: int | None = None
    mismatch_per_prompt: int = 5
    forget_weight: float = 0.5
    mismatch_weight: float = 1.0
    normal_weight: float = 1.0
    reference: Literal["auto"] | ReferenceMode = "auto"
    reference_cache: CacheStorage = "device"
    packing: Packing = "auto"
    grads_in_forward: bool = False
    fused_layers: bool = True
    # optimisation
    lr: float = 2e-6
    weight_decay: float = 0.01  # torch's AdamW default, which the reference's recipe runs with
    max_steps: int = 1000
    grad_accum: int = 1
    max_forget_nll: float | None = 100.0
    precision: Precision = "fp32"
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    optimizer_in_backward: bool | None = None   # None: on where it can be (one process, no FSDP, grad_accum=1)
    lora: bool = False
    lora_rank: int = 32
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # bookkeeping
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 0
    log_every: int = 1
    progress: bool = True
    backend: Backend = "auto"

    def __post_init__(self):
        for name in ("model", "output_dir", "normal", "mismatch_pool"):
            setattr(self, name, _path(name, getattr(self, name)))
        self.forget = [_path("forget", f) for f in _items("forget", self.forget, "a file path or a list of file paths")]
        self.lora_targets = _items("lora_targets", self.lora_targets, "a module name or a list of module names", str)
        if not self.lora_targets:
            raise ValueError(f"lora_targets must be a module name or a list of module names, got {self.lora_targets}")
        if not isinstance(self.template, str):
            raise ValueError(f"template must be a text, got {self.template!r}")
        if self.forget_format not in ("auto",) + FORMATS:
            raise ValueError(f"forget_format must be 'auto' or one of {FORMATS}, got {self.forget_format!r}")
        self.loss_weights  # validates the three weights
        least = dict.fromkeys(("max_length", "batch_size", "max_steps", "grad_accum", "log_every", "lora_rank"), 1)
        least |= dict.fromkeys(("mismatch_per_prompt", "save_every", "keep_checkpoints"), 0)
        if self.normal_batch_size is not None:
            least["normal_batch_size"] = 1
        for name, smallest in least.items():
            check_count(name, getattr(self, name), smallest)
            setattr(self, name, int(getattr(self, name)))  # a NumPy integer becomes a plain int, as JSON needs
        self.seed = check_seed("seed (--seed)", self.seed)
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if not is_finite_real(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not is_finite_real(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha (--lora-alpha) must be a finite number > 0 (it scales the adapter's update: "
                             f"0 trains nothing), got {self.lora_alpha!r}")
        for name in ("lora_dropout", "truthfulqa_test_fraction", "truthfulqa_pool_fraction"):
            value = getattr(self, name)
            if not is_real(value) or not 0 <= value < 1:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        # (load_truthfulqa's own rule, checked here so that a run is refused before its model loads)
        test, pool = self.truthfulqa_test_fraction, self.truthfulqa_pool_fraction
        if not (0 < pool and test + pool < 1):
            raise ValueError(f"truthfulqa_pool_fraction must be > 0 and truthfulqa_test_fraction + "
                             f"truthfulqa_pool_fraction < 1 (some TruthfulQA rows are left for the normal pairs), got "
                             f"{pool!r} and {test!r}")
        if self.max_forget_nll is not None and not is_finite_real(self.max_forget_nll):
            raise ValueError(f"max_forget_nll must be a finite number, or null in a config file (none on the "
                             f"command line) for no early stop, got {self.max_forget_nll!r}")
        reals = ("lr", "weight_decay", "lora_alpha", "lora_dropout", "truthfulqa_test_fraction",
                 "truthfulqa_pool_fraction", "forget_weight", "mismatch_weight", "normal_weight", "max_forget_nll")
        for name in reals:   # a NumPy float becomes a plain float, as the saved JSON needs (checked above)
            if getattr(self, name) is not None:
                setattr(self, name, float(getattr(self, name)))
        for name in ("chat_template", "answer_eos", "skip_long_prompts", "lora", "gradient_checkpointing", "resume",
                     "progress", "grads_in_forward", "fused_layers"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.optimizer_in_backward is not None and not isinstance(self.optimizer_in_backward, bool):
            raise ValueError(f"optimizer_in_backward must be true, false, or null in a config file (on where it can "
                             f"be: one process, no FSDP, grad_accum=1), got {self.optimizer_in_backward!r}")
        if self.attn_implementation is not None and not (isinstance(self.attn_implementation, str)
                                                         and self.attn_implementation):
            raise ValueError(f"attn_implementation must be the name of a Hugging Face attention implementation "
                             f"(sdpa, eager, flash_attention_2, ...) or null, got {self.attn_implementation!r}")
        if self.system is not None and not isinstance(self.system, str):
            raise ValueError(f"system must be a text (the system turn of the chat template), got {self.system!r}")
        kwargs = self.chat_template_kwargs
        if kwargs is not None and not (isinstance(kwargs, dict) and all(isinstance(k, str) for k in kwargs)):
            raise ValueError(f"chat_template_kwargs must be a mapping of template variable names (texts) to values, "
                             f"or null, got {kwargs!r}")
        names = ("system (--system)", "chat_template_kwargs (--chat-template-kwargs)", None)
        problem = chat_option_problem(self.chat_template, self.system, kwargs, names=names,
                                      needs="chat_template=true (--chat-template)")
        if problem:
            raise ValueError(problem)
        check_backend(self.backend)
        if self.optimizer_in_backward is True and self.grad_accum != 1:
            raise ValueError(f"optimizer_in_backward (--optimizer-in-backward) steps each weight as the backward "
                             f"completes its gradient: it needs grad_accum=1, got {self.grad_accum}")
        if self.packing not in PACKING_MODES:
            raise ValueError(f"packing must be one of {PACKING_MODES}, got {self.packing!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.reference not in ("auto",) + REFERENCE_MODES:
            raise ValueError(f"reference must be 'auto' or one of {REFERENCE_MODES}, got {self.reference!r}")
        if self.reference_cache not in CACHE_STORAGES:
            raise ValueError(f"reference_cache must be one of {CACHE_STORAGES}, got {self.reference_cache!r}")
        if self.reference == "adapter" and not self.lora:
            raise ValueError("reference='adapter' needs lora=True (on the command line: --lora): the reference is "
                             "the model with its adapter off")
        for message in self._settings_without_effect():
            warnings.warn(message, stacklevel=3)

    def _settings_without_effect(self) -> list[str]:
        """What is said of settings given a value that this configuration never reads (a likely mistake);
        mismatch_per_prompt=0 with mismatch_weight=0 says what the weight says, and is not. The settings of a term of
        weight 0 are said by run.load_streams, which leaves its rows out: streams of one's own are drawn from and
        referenced whatever the weight."""
        said = []
        if not self.lora:
            said += self.without_effect(("lora_rank", "lora_alpha", "lora_dropout", "lora_targets"),
                                        "without lora=true (--lora)")
        if self.chat_template:   # (the command line sets template only where --template is given)
            said += self.without_effect(("template",), "with chat_template=true (--chat-template): the tokenizer's "
                                        "chat template renders every example")
        if self.reference_cache != _default("reference_cache") and self.reference_mode != "cached":
            said.append(f"reference_cache={self.reference_cache!r} has no effect without reference='cached' "
                        f"(--reference cached)")
        if self.mismatch_weight != 0 and self.mismatch_per_prompt == 0:
            said.append(f"mismatch_per_prompt=0 draws no mismatch answers: the mismatch term is off whatever "
                        f"mismatch_weight ({self.mismatch_weight}) says")
        return said

    def without_effect(self, names, reason: str) -> list[str]:
        """"<names> has / have no effect <reason>" for those of names given a value other than their default and 0,
        or nothing."""
        idle = [n for n in names if getattr(self, n) not in (_default(n), 0)]
        return [f"{', '.join(idle)} {'has' if len(idle) == 1 else 'have'} no effect {reason}"] if idle else []

    @property
    def loss_weights(self) -> LossWeights:
        return LossWeights(self.forget_weight, self.mismatch_weight, self.normal_weight)

    @property
    def reference_mode(self) -> str:
        """The reference actually used: 'auto' means the adapter-disabled model under LoRA, else a frozen copy."""
        if self.reference != "auto":
            return self.reference
        return "adapter" if self.lora else "copy"

    def check_paths(self) -> None:
        """Raises unless the model, data files and output directory are given, each data file given is a regular
        file (a DataError naming its setting, before the model loads) and the output directory can be written
        (check_output_dir)."""
        missing = [name for name in ("model", "forget", "output_dir") if not getattr(self, name)]
        if missing:
            raise ValueError(f"missing setting(s): {', '.join(missing)}")
        data_files = {"forget": self.forget, "normal": [self.normal], "mismatch_pool": [self.mismatch_pool]}
        for name, paths in data_files.items():
            for path in filter(None, paths):
                try:
                    check_data_file(path)
                except DataError as exc:
                    raise DataError(f"{name} (--{name.replace('_', '-')}): {exc}") from None
        check_output_dir(self.output_dir)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, origin: str = "config") -> "UnlearnConfig":
        return dataclass_from_dict(cls, values, origin)


def _path(name: str, value) -> str | None:
    """`value` (a text or an os.PathLike) as text, the form config.json stores, None as None; ValueError naming
    `name` otherwise."""
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"{name} must be a path, got {value!r}")
    return None if value is None else os.fspath(value)


# The files a run writes in its output_dir. One that is a pipe hung the run at its first logged step (log.jsonl,
# opened to append, blocks until a reader comes); a directory failed it once the model had loaded, or at its end.
RUN_FILES = ("config.json", "log.jsonl", "run.json")


def check_output_dir(path: str) -> None:
    """ValueError naming output_dir (--output-dir) unless `path` is a directory this process can create files in,
    or can be made in one, and holds none of RUN_FILES that is no regular file (a pipe, a directory): a file at
    `path` or among its parents, or a read-only directory, failed only once the model had loaded, with a bare "File
    exists" or a traceback. Creates and removes a file in `path` or in its nearest existing parent, and makes no
    directory, so that a refused run leaves nothing behind."""
    name = "output_dir (--output-dir)"
    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    made_in = "" if folder == os.path.abspath(path) else f" (to be made in {folder!r})"
    if not os.path.isdir(folder):
        raise ValueError(f"{name}: {path!r} is a file, not a directory" if not made_in else
                         f"{name}: {path!r} cannot be made: {folder!r} is a file, not a directory")
    problem = cannot_create_in(folder)
    if problem:
        raise ValueError(f"{name}: cannot write in {path!r}{made_in}: {problem}")
    for file in () if made_in else RUN_FILES:
        what = not_a_regular_file(os.path.join(folder, file))
        if what:
            raise ValueError(f"{name}: {os.path.join(path, file)!r} {what}: the run writes its {file} there")


def _items(name: str, value, expected: str, kinds=(str, os.PathLike)) -> list:
    """`value` as a list (a text or a path alone is one item, not a sequence of characters); ValueError naming
    `name` and what was `expected` unless every item is of `kinds`."""
    items = [value] if isinstance(value, (str, os.PathLike)) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, kinds) for item in items):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return list(items)
