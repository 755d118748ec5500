"""AdaptedLinear: a frozen base linear (plain or 4-bit) with a trainable adapter beside it."""

import torch
from torch import nn


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
