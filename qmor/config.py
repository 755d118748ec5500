"""Configuration dataclasses with a JSON round trip. One comment per field says what it means."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from qmor.adapters import check_family, option_fields
from qmor.adapters.family import option_spec
from qmor.errors import QmorError, check_range

TRAINING_ONLY = {"training_only": True}  # field metadata: changes only training, never what `fit` gives
EXPERT_ADAPTERS = ("per-expert", "shared")  # MoE experts' adapters: one per expert, or one per block and map


@dataclass
class AdapterConfig:
    family: str = "lora"  # a name in qmor.adapters.ADAPTERS: lora, moslora, mora, mor, sira
    r: int = 8  # rank; for MoRA the LoRA rank whose parameter count r_hat is matched; for SiRA per expert
    alpha: float = 16.0  # scale s = alpha / r (LoRA, MoSLoRA, MoR, SiRA); MoRA has no scaling
    dropout: float = field(default=0.0, metadata=TRAINING_ONLY)  # dropout on the adapter's input during training
    targets: str | list[str] = "all-linear"  # "all-linear" (every linear but the output head), module-name
    # suffixes such as ["q_proj", "v_proj"], or a regex string matched against the full module name
    expert_adapters: str = "per-expert"  # MoE experts (targets "experts"): "per-expert", an adapter each, or
    # "shared", one per block and map (gate/up, down) whose delta every expert adds (qmor.model.moe.SharedAdapter)
    init: str = field(default="default", metadata=TRAINING_ONLY)  # "default" (adapter adds zero) or "loftq" (fit to
    # the quantisation residual)
    loftq_iters: int = 1  # LoftQ alternations T, used when init == "loftq"
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
        if self.init not in ("default", "loftq"):
            raise QmorError(f"init must be 'default' or 'loftq', got {self.init!r}")
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


@dataclass
class QuantConfig:
    blocksize: int = 64  # NF4 block size: one absmax per this many weights
    double_quant: bool = True  # quantise the absmax values too (about 0.4 bits per weight saved)
    compute_dtype: str = "auto"  # dtype of the dequantised matmul: "auto" (bf16 on CUDA, fp32 on CPU), or a name
    storage: str = "uint8"  # dtype the packed 4-bit codes are stored as; "bfloat16" lets FSDP shard them with the
    # rest of the model (same codes, same values: only the container type changes)

    def __post_init__(self) -> None:
        if self.storage not in ("uint8", "bfloat16", "float16", "float32"):
            raise QmorError(f"quant storage must be uint8, bfloat16, float16 or float32, got {self.storage!r}; "
                            "pass e.g. --quant-storage uint8")
        if self.compute_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise QmorError(f"compute_dtype must be auto, float32, bfloat16 or float16, got {self.compute_dtype!r}")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict) -> Any:
    """Build a dataclass from a dict, refusing unknown keys with the list of valid ones (a class with its own
    `from_dict`, AdapterConfig, reads the dict itself)."""
    if "from_dict" in vars(cls):
        return cls.from_dict(data)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise QmorError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(names)}")
    return cls(**data)
