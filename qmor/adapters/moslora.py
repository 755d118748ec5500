"""MoSLoRA (arXiv 2406.11909): Δy = s · B M A x with a learnable r x r mixer M between the LoRA factors."""

import math

import torch
from torch import nn

from qmor.adapters.factor import low_rank
from qmor.config import AdapterConfig


class MoSLoRA(nn.Module):
    def __init__(self, d_in: int, d_out: int, cfg: AdapterConfig):
        super().__init__()
        self.scale = cfg.alpha / cfg.r
        self.A = nn.Parameter(torch.empty(cfg.r, d_in))  # (r, d_in)
        self.M = nn.Parameter(torch.empty(cfg.r, cfg.r))  # (r, r); a zero mixer would never train
        self.B = nn.Parameter(torch.zeros(d_out, cfg.r))  # (d_out, r)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.M, a=math.sqrt(5))

    @staticmethod
    def num_params(d_in: int, d_out: int, cfg: AdapterConfig) -> int:
        return cfg.r * (d_in + d_out) + cfg.r**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x @ self.A.T) @ self.M.T) @ self.B.T * self.scale

    def delta_weight(self) -> torch.Tensor:
        return self.B @ self.M @ self.A * self.scale

    @torch.no_grad()
    def fit(self, residual: torch.Tensor) -> None:
        # M = I makes B M A the plain truncated SVD; training then moves M away from the identity.
        B, A = low_rank(residual / self.scale, self.A.shape[0])
        self.B.copy_(B)
        self.A.copy_(A)
        self.M.copy_(torch.eye(self.M.shape[0]))
