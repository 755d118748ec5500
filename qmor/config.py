"""Configuration dataclasses with a JSON round trip. One comment per field says what it means."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from qmor.errors import QmorError


@dataclass
class AdapterConfig:
    family: str = "lora"  # one of qmor.adapters.ADAPTERS: lora, moslora, mora, mor, sira
    r: int = 8  # rank; for MoRA the LoRA rank whose parameter count r_hat is matched; for SiRA per expert
    alpha: float = 16.0  # scale s = alpha / r (LoRA, MoSLoRA, MoR, SiRA); MoRA has no scaling
    dropout: float = 0.0  # dropout on the adapter's input during training
    targets: str | list[str] = "all-linear"  # "all-linear" (every linear but the output head), module-name
    # suffixes such as ["q_proj", "v_proj"], or a regex string matched against the full module name
    mora_kind: str = "auto"  # MoRA operators: "sharing", "rope", or "auto" (rope for r < 32, else sharing)
    experts: int = 4  # MoR: number of experts (rank scalings); SiRA: number of LoRA experts
    top_k: int = 2  # SiRA: experts kept per token
    capacity_factor: float = 1.25  # SiRA: each expert takes at most ceil(cf * k * T / E) of a batch's T tokens
    expert_dropout: float = 0.1  # SiRA: dropout on the kept gate weights during training
    aux_loss_weight: float = 0.01  # SiRA: weight of the load-balancing loss added to the training loss
    init: str = "default"  # "default" (adapter adds zero) or "loftq" (fit to the quantisation residual)
    loftq_iters: int = 1  # LoftQ alternations T, used when init == "loftq"

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise QmorError(f"rank r must be a positive integer, got {self.r}; pass e.g. --rank 8")
        if not 0.0 <= self.dropout < 1.0:
            raise QmorError(f"dropout must be in [0, 1), got {self.dropout}; pass e.g. --dropout 0.05")
        if self.init not in ("default", "loftq"):
            raise QmorError(f"init must be 'default' or 'loftq', got {self.init!r}")
        # alpha = 0 makes the adapter add nothing (and LoftQ divide by zero)
        check_range("alpha", self.alpha, "> 0", 0.0, None, "--alpha 16", open_low=True)
        if self.mora_kind not in ("auto", "rope", "sharing"):
            raise QmorError(f"mora_kind must be auto, rope or sharing, got {self.mora_kind!r}; pass e.g. "
                            "--mora-kind auto")
        check_range("experts", self.experts, ">= 1", 1, None, "--experts 4", integer=True)
        if self.family == "sira":  # top_k 0 routes every token to no expert: the loss goes to nan
            check_range("top_k", self.top_k, f"between 1 and experts ({self.experts})", 1, self.experts,
                        "--top-k 2", integer=True)
        check_range("capacity_factor", self.capacity_factor, "> 0", 0.0, None, "--capacity-factor 1.25",
                    open_low=True)
        if not 0.0 <= self.expert_dropout < 1.0:
            raise QmorError(f"expert_dropout must be in [0, 1), got {self.expert_dropout}; pass e.g. "
                            "--expert-dropout 0.1")
        check_range("aux_loss_weight", self.aux_loss_weight, ">= 0", 0.0, None, "--aux-loss-weight 0.01")
        check_range("loftq_iters", self.loftq_iters, ">= 1", 1, None, "--loftq-iters 1", integer=True)


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


def check_range(name: str, value, rule: str, low, high, example: str, integer: bool = False,
                open_low: bool = False) -> None:
    """Refuse a setting outside [low, high] (or (low, high] with open_low), nan and infinity included."""
    ok = isinstance(value, int) if integer else isinstance(value, int | float) and math.isfinite(value)
    ok = ok and not isinstance(value, bool) and (value > low if open_low else value >= low)
    ok = ok and (high is None or value <= high)
    if not ok:
        raise QmorError(f"{name} must be {rule}, got {value!r}; pass e.g. {example}")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict) -> Any:
    """Build a dataclass from a dict, refusing unknown keys with the list of valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise QmorError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(names)}")
    return cls(**data)
