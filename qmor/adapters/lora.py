"""LoRA: Δy = s · B A x, with s = alpha / r."""

from __future__ import annotations

import math

import torch
from torch import nn

from qmor.adapters.factor import low_rank
from qmor.adapters.family import Family, Hyperparams, NoOptions, check_rank


class LoRA(nn.Module):
    def __init__(self, d_in: int, d_out: int, hp: Hyperparams):
        super().__init__()
        self.scale = hp.alpha / hp.r
        self.A = nn.Parameter(torch.empty(hp.r, d_in))  # (r, d_in)
        self.B = nn.Parameter(torch.zeros(d_out, hp.r))  # (d_out, r); zero so the adapter starts as a no-op
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    @staticmethod
    def num_params(d_in: int, d_out: int, hp: Hyperparams) -> int:
        return hp.r * (d_in + d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_out)
        return (x @ self.A.T) @ self.B.T * self.scale

    @staticmethod
    def saved_per_token(d_in: int, d_out: int, hp: Hyperparams) -> int:
        return hp.r  # A x, for B's gradient (x itself is the layer input)

    def delta_weight(self) -> torch.Tensor:
        return self.B @ self.A * self.scale

    @torch.no_grad()
    def peft_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.A.float().contiguous().cpu(), self.B.float().contiguous().cpu()  # PEFT's scale is ours

    @torch.no_grad()
    def fit(self, residual: torch.Tensor) -> None:
        B, A = low_rank(residual / self.scale, self.A.shape[0])
        self.B.copy_(B)
        self.A.copy_(A)


FAMILY = Family(module=LoRA, options=NoOptions, scaled=True, merges=True, peft=LoRA.peft_factors, why_not="",
                keeps_input=True, saved_per_token=LoRA.saved_per_token,
                check_shape=check_rank, fitted=("A", "B"),
                rank_means="", input_factor="A",
                lr=2e-4)  # QLoRA's rate for 7-13B bases, unsloth's and TRL's LoRA recipes
