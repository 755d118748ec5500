"""MoSLoRA (arXiv 2406.11909): Δy = s · B M A x with a learnable r x r mixer M between the LoRA factors."""

from __future__ import annotations

import math

import torch
from torch import nn

from qmor.adapters.factor import low_rank
from qmor.adapters.family import Family, Hyperparams, NoOptions, check_rank


class MoSLoRA(nn.Module):
    def __init__(self, d_in: int, d_out: int, hp: Hyperparams):
        super().__init__()
        self.scale = hp.alpha / hp.r
        self.A = nn.Parameter(torch.empty(hp.r, d_in))  # (r, d_in)
        self.M = nn.Parameter(torch.empty(hp.r, hp.r))  # (r, r); a zero mixer would never train
        self.B = nn.Parameter(torch.zeros(d_out, hp.r))  # (d_out, r)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.M, a=math.sqrt(5))

    @staticmethod
    def num_params(d_in: int, d_out: int, hp: Hyperparams) -> int:
        return hp.r * (d_in + d_out) + hp.r**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x @ self.A.T) @ self.M.T) @ self.B.T * self.scale

    @staticmethod
    def saved_per_token(d_in: int, d_out: int, hp: Hyperparams) -> int:
        return 2 * hp.r  # A x and M A x

    def delta_weight(self) -> torch.Tensor:
        return self.B @ self.M @ self.A * self.scale

    @torch.no_grad()
    def peft_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        # the mixer folds into B exactly: s · B M A = s · (B M) A, a plain rank-r LoRA
        return self.A.float().contiguous().cpu(), (self.B.float() @ self.M.float()).contiguous().cpu()

    @torch.no_grad()
    def fit(self, residual: torch.Tensor) -> None:
        # M = I makes B M A the plain truncated SVD; training then moves M away from the identity.
        B, A = low_rank(residual / self.scale, self.A.shape[0])
        self.B.copy_(B)
        self.A.copy_(A)
        self.M.copy_(torch.eye(self.M.shape[0]))


FAMILY = Family(module=MoSLoRA, options=NoOptions, scaled=True, merges=True, peft=MoSLoRA.peft_factors, why_not="",
                keeps_input=True, saved_per_token=MoSLoRA.saved_per_token,
                check_shape=check_rank, fitted=("A", "M", "B"),
                rank_means="", input_factor="A",
                lr=2e-4)  # LoRA's: its mixer starts as the identity, and on SmolLM2 it learnt at LoRA's rates
