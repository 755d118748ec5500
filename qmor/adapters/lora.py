"""LoRA: Δy = s · B A x, with s = alpha / r."""

import math

import torch
from torch import nn

from qmor.adapters.factor import low_rank
from qmor.config import AdapterConfig


class LoRA(nn.Module):
    def __init__(self, d_in: int, d_out: int, cfg: AdapterConfig):
        super().__init__()
        self.scale = cfg.alpha / cfg.r
        self.A = nn.Parameter(torch.empty(cfg.r, d_in))  # (r, d_in)
        self.B = nn.Parameter(torch.zeros(d_out, cfg.r))  # (d_out, r); zero so the adapter starts as a no-op
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    @staticmethod
    def num_params(d_in: int, d_out: int, cfg: AdapterConfig) -> int:
        return cfg.r * (d_in + d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_out)
        return (x @ self.A.T) @ self.B.T * self.scale

    def delta_weight(self) -> torch.Tensor:
        return self.B @ self.A * self.scale

    @torch.no_grad()
    def fit(self, residual: torch.Tensor) -> None:
        B, A = low_rank(residual / self.scale, self.A.shape[0])
        self.B.copy_(B)
        self.A.copy_(A)
