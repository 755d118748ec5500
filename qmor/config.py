"""The quantisation config and the JSON round trip of every config dataclass. One comment per field says what it
means. (The adapter's config, which knows the families, is `qmor.adapters.config.AdapterConfig`.)"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from qmor.errors import QmorError


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
    `from_dict`, such as AdapterConfig, reads the dict itself)."""
    if "from_dict" in vars(cls):
        return cls.from_dict(data)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise QmorError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(names)}")
    return cls(**data)
