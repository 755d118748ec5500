"""AdaptedLinear: a frozen base linear (plain or 4-bit) with a trainable adapter beside it, built by its family."""

import torch
from torch import nn

from qmor.adapters.config import AdapterConfig
from qmor.adapters.registry import check_family


def build_adapter(cfg: AdapterConfig, d_in: int, d_out: int, name: str = "layer") -> nn.Module:
    """A fresh adapter for a d_in -> d_out linear, after the family's check that it fits the layer."""
    spec = check_family(cfg.family)
    spec.check_shape(d_in, d_out, cfg.hyperparams, name)
    return spec.module(d_in, d_out, cfg.hyperparams)


class AdaptedLinear(nn.Module):
    def __init__(self, base: nn.Linear, adapter: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.dropout = nn.Dropout(dropout)
        self.enabled = True  # off: the base alone (chat compares against it without reloading)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pretrained = self.base(x)
        if not self.enabled:
            return pretrained
        x = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            # adapters keep fp32 weights; under autocast the matmuls cast for themselves, and an explicit cast here
            # would keep one fp32 copy of the shared input per adapter (q, k and v each) alive for backward
            x = x.to(next(self.adapter.parameters()).dtype)
        return pretrained + self.adapter(x).to(pretrained.dtype)
