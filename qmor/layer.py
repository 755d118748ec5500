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
        dtype = next(self.adapter.parameters()).dtype  # adapters train in fp32 whatever the compute dtype
        return pretrained + self.adapter(self.dropout(x).to(dtype)).to(pretrained.dtype)
