"""The adapter's config: the settings common to every family, the family's own options, and a dict round trip that
reads older files and flat CLI keys."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from qmor.adapters.family import Hyperparams, option_spec
from qmor.adapters.registry import check_family, option_fields
from qmor.errors import QmorError, check_range

TRAINING_ONLY = {"training_only": True}  # field metadata: changes only training, never what `fit` gives
INITS = ("default", "loftq", "calibrated")  # how the adapter starts (the field's comment says each)
EXPERT_ADAPTERS = ("per-expert", "shared")  # MoE experts' adapters: one per expert, or one per block and map


@dataclass
class AdapterConfig:
    family: str = "lora"  # a name in qmor.adapters.registry.ADAPTERS: lora, moslora, mora, mor, sira
    r: int = 8  # rank (a family for which it means more says so in its declaration's rank_means: MoRA, SiRA)
    alpha: float = 16.0  # scale s = alpha / r (LoRA, MoSLoRA, MoR, SiRA); MoRA has no scaling
    dropout: float = field(default=0.0, metadata=TRAINING_ONLY)  # dropout on the adapter's input during training
    targets: str | list[str] = "all-linear"  # "all-linear" (every linear but the output head), module-name
    # suffixes such as ["q_proj", "v_proj"], or a regex string matched against the full module name
    expert_adapters: str = "per-expert"  # MoE experts (targets "experts"): "per-expert", an adapter each, or
    # "shared", one per block and map (gate/up, down) whose delta every expert adds (adapters.experts.SharedAdapter)
    init: str = field(default="default", metadata=TRAINING_ONLY)  # "default" (adapter adds zero), "loftq" (fit to
    # the quantisation residual) or "calibrated" (NF4 rounding and fit weighted by calibration inputs)
    loftq_iters: int = 1  # alternations T of rounding and fit, used when init is "loftq" or "calibrated"
    # leaving LoftQ's cache key unchanged: the calibrated init's key holds the digest of the tokens it selects
    calibration_samples: int = field(default=128, metadata=TRAINING_ONLY)  # sequences the calibrated init reads:
    # the first of the training data, or of --calibration FILE
    options: Any = None  # the family's own settings: its options dataclass (e.g. MoRAOptions(kind="rope"), declared
    # in qmor/adapters/<family>.py) or a dict of its fields; None: the family's defaults

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise QmorError(f"rank r must be a positive integer, got {self.r}; pass e.g. --rank 8")
        if not 0.0 <= self.dropout < 1.0:
            raise QmorError(f"dropout must be in [0, 1), got {self.dropout}; pass e.g. --dropout 0.05")
        if self.expert_adapters not in EXPERT_ADAPTERS:
            raise QmorError(f"expert_adapters must be per-expert or shared, got {self.expert_adapters!r}; pass e.g. "
                            "--expert-adapters shared")
        if self.init not in INITS:
            raise QmorError(f"init must be one of {', '.join(INITS)}, got {self.init!r}; pass e.g. --init loftq")
        check_range("calibration_samples", self.calibration_samples, ">= 1", 1, None, "--calibration-samples 128",
                    integer=True)
        # alpha = 0 makes the adapter add nothing (and LoftQ divide by zero)
        check_range("alpha", self.alpha, "> 0", 0.0, None, "--alpha 16", open_low=True)
        check_range("loftq_iters", self.loftq_iters, ">= 1", 1, None, "--loftq-iters 1", integer=True)
        kind = check_family(self.family).options
        if self.options is None:
            self.options = kind()
        elif isinstance(self.options, dict):
            names = sorted(f.name for f in dataclasses.fields(kind))
            unknown = sorted(set(self.options) - set(names))
            if unknown:
                have = f"its options are {names}" if names else f"{self.family} has no options"
                raise QmorError(f"unknown {self.family} option(s) {unknown}; {have}")
            self.options = kind(**self.options)
        elif not isinstance(self.options, kind):
            raise QmorError(f"{self.family} takes {kind.__name__} options, got {type(self.options).__name__}")

    @classmethod
    def from_dict(cls, data: dict) -> AdapterConfig:
        """From its dict: the family's options nested under "options", or flat under their keys ("mora_kind",
        "experts", "top_k", ...) as CLI flags give them and older versions wrote them; a flat key wins over the
        nested one. Older files hold every family's keys: another family's are checked, then dropped."""
        data = dict(data)
        common = {f.name for f in dataclasses.fields(cls)}
        every = {f.key: f for f in option_fields()}
        unknown = sorted(set(data) - common - set(every))
        if unknown:
            raise QmorError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(common | set(every))}")
        name = data.get("family", cls.family)
        own = {f.key: f for f in option_fields() if f.family == name}
        flat = {k: data.pop(k) for k in list(data) if k not in common}
        for key, value in flat.items():
            if key not in own:
                every[key].check(value)  # not this family's: a value out of range is still refused
        given = {own[k].name: v for k, v in flat.items() if k in own}
        if given:
            nested = data.get("options") or {}
            if not isinstance(nested, dict):
                raise QmorError(f"adapter options must be a mapping of {name}'s options, got {nested!r}")
            data["options"] = {**nested, **given}
        return cls(**data)

    def fit_settings(self) -> dict:
        """The settings that decide what the adapter's `fit` gives (LoftQ's cache key): all but training-only."""
        common = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name != "options" and not f.metadata.get("training_only")}
        options = {f.name: getattr(self.options, f.name) for f in dataclasses.fields(self.options)
                   if not option_spec(f).training_only}
        return {**common, "options": options}

    @property
    def hyperparams(self) -> Hyperparams:
        """What the family's module is built from."""
        return Hyperparams(self.r, self.alpha, self.options)

    def check_trainable(self) -> None:
        """Refuse, before anything loads, settings that load but cannot train (the options' own check)."""
        check = getattr(self.options, "check_trainable", None)
        if check is not None:
            check()
