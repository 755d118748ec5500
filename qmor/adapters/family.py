"""What a family declares beside its forward, so that the rest of qmor reads it instead of naming families.

A family file holds its `nn.Module`, its options (a dataclass of `option(...)` fields, nested in the adapter config
as `AdapterConfig.options`) and one `Family(...)` declaration; `qmor.adapters.registry.ADAPTERS` maps its name to that
declaration. Building, planning, LoftQ, export and the messages that list families all read these declarations.
A family's module is built from `Hyperparams` alone, not from the whole adapter config: the config checks its family
against the registry of families, so the families cannot know the config without a cycle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qmor.errors import QmorError, check_range

MODULE_METHODS = ("forward", "delta_weight", "fit", "num_params")


@dataclass(frozen=True)
class Hyperparams:
    """What a family's module is built from (`AdapterConfig.hyperparams`): the rest of the adapter config (targets,
    init, dropout) decides where and how adapters go, never their shape."""

    r: int  # rank; for MoRA the LoRA rank whose parameter count it matches; for SiRA per expert
    alpha: float  # scale alpha / r for the families that are `scaled`
    options: Any  # the family's options dataclass


@dataclass(frozen=True)
class Option:
    """What a family option needs beyond its type and default: its CLI flag and app form entry, and its checks."""

    help: str  # one line for the CLI's --help and the app's form (the flag table names the families in front)
    example: Any  # a valid value, quoted by errors ("pass e.g. --top-k 2")
    label: str = ""  # the app's short label ("Top-k"); "" uses the key
    key: str = ""  # its flat name (CLI flag --key-with-dashes, older config files) when not the field name
    low: float | None = None  # smallest allowed value (None: no lower bound)
    high: float | None = None  # largest allowed value (None: no upper bound)
    open_low: bool = False  # low itself is not allowed
    open_high: bool = False  # high itself is not allowed
    choices: tuple[str, ...] = ()  # the allowed strings, when it is a choice
    rule: str = ""  # the allowed values in words, when the bounds alone do not say it
    training_only: bool = False  # changes only training, never what `fit` gives (LoftQ's cache leaves it out)

    def words(self) -> str:
        """The allowed values in words: "auto, rope or sharing", ">= 1", "in [0, 1)"."""
        if self.rule:
            return self.rule
        if self.choices:
            return either(self.choices)
        if self.high is None:
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        return f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"


def option(default, help: str, example, **limits) -> Any:
    """A field of a family's options dataclass; `limits` are `Option`'s (key, low, high, choices, ...)."""
    return field(default=default, metadata={"option": Option(help, example, **limits)})


def option_spec(f: dataclasses.Field) -> Option:
    return f.metadata["option"]


def option_key(f: dataclasses.Field) -> str:
    """The option's flat name: its CLI flag without the dashes, its key in older config files."""
    return option_spec(f).key or f.name


def check_value(key: str, spec: Option, value, integer: bool) -> None:
    """Refuse a value outside an option's declared range or choices, in one line that names its flag."""
    flag = f"--{key.replace('_', '-')} {spec.example}"
    if spec.choices:
        if value not in spec.choices:
            raise QmorError(f"{key} must be {spec.words()}, got {value!r}; pass e.g. {flag}")
    elif spec.low is not None or spec.high is not None:
        check_range(key, value, spec.words(), spec.low, spec.high, flag, integer=integer, open_low=spec.open_low,
                    open_high=spec.open_high)


def check_options(options) -> None:
    """Each field of a family's options against its own declaration; call it from the options' __post_init__."""
    for f in dataclasses.fields(options):
        check_value(option_key(f), option_spec(f), getattr(options, f.name), isinstance(f.default, int))


@dataclass
class NoOptions:
    """The options of a family that has none."""


def either(names) -> str:
    """'lora, moslora or mora' for messages."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def check_rank(d_in: int, d_out: int, hp: Hyperparams, name: str) -> None:
    """The shape check of a family whose factors have rank r: r may not exceed the layer's smaller side."""
    limit = min(d_in, d_out)
    if hp.r > limit:
        raise QmorError(f"rank r={hp.r} is larger than {name} allows ({d_in}->{d_out}, so at most {limit}); "
                        "use a smaller --rank")


Factors = Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True, kw_only=True)
class Family:
    """One adapter family, declared in its own file. Every field is required, so a family cannot forget one."""

    module: type[nn.Module]  # built as module(d_in, d_out, hyperparams); forward, delta_weight, fit, static num_params
    options: type  # its own settings, a dataclass of `option(...)` fields (NoOptions: none)
    scaled: bool  # reads alpha: its output is scaled by alpha / r
    merges: bool  # delta_weight() is exact, so it folds into the base weights (merged export)
    peft: Factors | None  # the layer's PEFT LoRA factors (A (r, d_in), B (d_out, r)) with ΔW = alpha / r · B A,
    # in fp32 on the CPU; None: PEFT's LoRA format cannot hold it
    why_not: str  # why it cannot merge or go to PEFT, as words after its name ("" when it can do both)
    keeps_input: bool  # its backward keeps the layer's input (counted once per tensor that several linears read)
    saved_per_token: Callable[[int, int, Hyperparams], int]  # elements per token its backward keeps besides the
    # input, for the planner
    check_shape: Callable[[int, int, Hyperparams, str], None]  # refuse (QmorError) a d_in -> d_out layer it cannot
    # adapt, in one line naming the layer
    fitted: tuple[str, ...]  # the parameters `fit` sets: LoftQ caches these, so the others (a router) keep the
    # run's own seeded init whether the LoftQ init was computed or loaded
    lr: float  # the peak learning rate of a run that leaves it unset (any model but the built-in tiny demo)
    rank_means: str  # what the rank r is for it when not its factors' rank, in words (--rank's help); "" when it is
    input_factor: str  # the parameter the input meets first (x @ P.T) when `fit` is a plain low-rank fit of the
    # residual: the calibrated init then fits in the activation-weighted norm by fitting R L and multiplying P by
    # L⁻¹ (qmor.adapters.weighted); "" when not, and the module has no `fit_weighted` of its own: the calibrated init
    # is refused for it

    def __post_init__(self) -> None:
        name = getattr(self.module, "__name__", repr(self.module))
        if not (isinstance(self.module, type) and issubclass(self.module, nn.Module)):
            raise TypeError(f"Family.module must be an nn.Module class, got {name}")
        missing = [m for m in MODULE_METHODS if not callable(getattr(self.module, m, None))
                   or getattr(self.module, m) is getattr(nn.Module, m, None)]  # nn.Module's forward only raises
        if missing:
            raise TypeError(f"family {name} lacks {', '.join(missing)}; every family module has {MODULE_METHODS}")
        if not dataclasses.is_dataclass(self.options):
            raise TypeError(f"family {name}: options must be a dataclass (NoOptions when it has none)")
        for f in dataclasses.fields(self.options):
            if "option" not in f.metadata or f.default is dataclasses.MISSING:
                raise TypeError(f"family {name}: option {f.name} must be declared with option(default, help, "
                                "example, ...)")
        if (not self.merges or self.peft is None) and not self.why_not:
            raise TypeError(f"family {name} cannot merge or go to PEFT, so it must say why_not")
        for part in ("saved_per_token", "check_shape"):
            if not callable(getattr(self, part)):
                raise TypeError(f"family {name}: {part} must be a function")
        if not (isinstance(self.lr, float) and self.lr > 0):
            raise TypeError(f"family {name}: lr must be a positive float, the default learning rate, e.g. 2e-4")
        if not isinstance(self.rank_means, str):
            raise TypeError(f"family {name}: rank_means must say what r means for it, or be \"\"")
        if not self.fitted or not all(isinstance(k, str) for k in self.fitted):
            raise TypeError(f"family {name}: fitted must name the parameters its fit sets, e.g. ('A', 'B')")
