"""The adapter contract and the registry of families.

Every family is a plain `nn.Module` built as `Family(d_in, d_out, cfg)` that provides:
- `forward(x)`: the contribution Δy (..., d_out) for x (..., d_in), without building the dense ΔW;
- `delta_weight()`: the exact dense ΔW (d_out, d_in) with forward(x) == x @ ΔW.T, or `NotMergeable`;
- `fit(residual)`: set the parameters to the family's best approximation of a dense (d_out, d_in) residual
  (what LoftQ calls); routed families fit so that the output does not depend on routing;
- `num_params(d_in, d_out, cfg)` (static): the trainable parameter count.
A family's default init adds zero.
"""

from typing import Protocol

import torch
from torch import nn

from qmor.adapters.lora import LoRA
from qmor.adapters.mor import MoR
from qmor.adapters.mora import MoRA, mora_kind, mora_rank
from qmor.adapters.moslora import MoSLoRA
from qmor.adapters.sira import SiRA
from qmor.config import AdapterConfig
from qmor.errors import NotMergeable, QmorError

__all__ = ["ADAPTERS", "Adapter", "NotMergeable", "build_adapter", "MERGEABLE"]


class Adapter(Protocol):
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...
    def delta_weight(self) -> torch.Tensor: ...
    def fit(self, residual: torch.Tensor) -> None: ...
    def parameters(self): ...


ADAPTERS: dict[str, type[nn.Module]] = {"lora": LoRA, "moslora": MoSLoRA, "mora": MoRA, "mor": MoR, "sira": SiRA}
MERGEABLE = ("lora", "moslora", "mora")


def check_family(family: str) -> type[nn.Module]:
    if family not in ADAPTERS:
        raise QmorError(f"unknown adapter family {family!r}; choose one of {', '.join(ADAPTERS)}")
    return ADAPTERS[family]


def build_adapter(cfg: AdapterConfig, d_in: int, d_out: int, name: str = "layer") -> nn.Module:
    """A fresh adapter for a d_in -> d_out linear, after checking the rank fits the layer."""
    cls = check_family(cfg.family)
    limit = min(d_in, d_out)
    if cfg.family == "mora":
        r_hat = mora_rank(d_in, d_out, cfg.r, mora_kind(cfg))
        if r_hat > limit:
            raise QmorError(f"MoRA rank r={cfg.r} gives a {r_hat}x{r_hat} matrix, larger than {name} "
                            f"({d_in}->{d_out}); use a smaller --rank")
    elif cfg.r > limit:
        raise QmorError(f"rank r={cfg.r} is larger than {name} allows ({d_in}->{d_out}, so at most {limit}); "
                        "use a smaller --rank")
    if cfg.family in ("mor", "sira") and cfg.experts < 1:
        raise QmorError(f"{cfg.family} needs at least one expert, got experts={cfg.experts}")
    return cls(d_in, d_out, cfg)
