"""Configuration dataclasses with a JSON round trip. One comment per field says what it means."""

from __future__ import annotations

import dataclasses
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
        if self.r <= 0:
            raise QmorError(f"rank r must be a positive integer, got {self.r}; pass e.g. --rank 8")
        if not 0.0 <= self.dropout < 1.0:
            raise QmorError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init not in ("default", "loftq"):
            raise QmorError(f"init must be 'default' or 'loftq', got {self.init!r}")


@dataclass
class QuantConfig:
    blocksize: int = 64  # NF4 block size: one absmax per this many weights
    double_quant: bool = True  # quantise the absmax values too (about 0.4 bits per weight saved)
    compute_dtype: str = "auto"  # dtype of the dequantised matmul: "auto" (bf16 on CUDA, fp32 on CPU), or a name
    storage: str = "uint8"  # dtype the packed 4-bit codes are stored as; "bfloat16" lets FSDP shard them with the
    # rest of the model (same codes, same values: only the container type changes)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict) -> Any:
    """Build a dataclass from a dict, refusing unknown keys with the list of valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise QmorError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(names)}")
    return cls(**data)
