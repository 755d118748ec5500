"""MoR, mixture of ranks (arXiv 2410.13408; no official code, our reading of the paper).

One shared pair A (r, d_in), B (d_out, r) and N experts that are only scaling vectors λA_i (r) and λB_i (d_out),
mixed per token by a dense softmax router g = softmax(W_g x):

    Δy = s · Σ_i g_i(x) · λB_i ⊙ (B (λA_i ⊙ (A x)))

With all λ = 1 every expert is the same LoRA and Σ g_i = 1, so routing does not matter at init or after `fit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from qmor.adapters.factor import low_rank
from qmor.adapters.family import Family, Hyperparams, check_options, check_rank, option
from qmor.errors import NotMergeable

WHY_NOT = "routes each token to its own mix of experts, so it has no single dense delta weight"


@dataclass
class MoROptions:
    experts: int = option(4, "number of experts", 4, low=1, label="Experts")

    def __post_init__(self) -> None:
        check_options(self)


class MoR(nn.Module):
    def __init__(self, d_in: int, d_out: int, hp: Hyperparams):
        super().__init__()
        self.scale = hp.alpha / hp.r
        self.A = nn.Parameter(torch.empty(hp.r, d_in))  # (r, d_in), shared
        self.B = nn.Parameter(torch.zeros(d_out, hp.r))  # (d_out, r), shared
        self.lam_A = nn.Parameter(torch.ones(hp.options.experts, hp.r))  # (N, r)
        self.lam_B = nn.Parameter(torch.ones(hp.options.experts, d_out))  # (N, d_out)
        # A random router breaks the symmetry between the identical experts; a zero router would keep them equal.
        self.router = nn.Parameter(torch.empty(hp.options.experts, d_in))  # (N, d_in)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))

    @staticmethod
    def num_params(d_in: int, d_out: int, hp: Hyperparams) -> int:
        return hp.r * (d_in + d_out) + hp.options.experts * (hp.r + d_out + d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = torch.softmax(x @ self.router.T, dim=-1)  # (..., N)
        h = (x @ self.A.T)[..., None, :] * self.lam_A * gates[..., None]  # (..., N, r)
        # Σ_i λB_i ⊙ (B h_i) as one matmul against the stacked, rescaled copies of B: (N r) -> d_out.
        stacked = (self.lam_B[:, :, None] * self.B).permute(1, 0, 2).flatten(1)  # (d_out, N r)
        return h.flatten(-2) @ stacked.T * self.scale

    @staticmethod
    def saved_per_token(d_in: int, d_out: int, hp: Hyperparams) -> int:
        n, r = hp.options.experts, hp.r
        return r + 3 * n * r + 2 * n  # A x, the per-expert projections, gates

    def delta_weight(self) -> torch.Tensor:
        raise NotMergeable(f"MoR {WHY_NOT}; export it as an adapter, or train a family that merges")

    @torch.no_grad()
    def fit(self, residual: torch.Tensor) -> None:
        B, A = low_rank(residual / self.scale, self.A.shape[0])
        self.B.copy_(B)
        self.A.copy_(A)
        self.lam_A.fill_(1.0)
        self.lam_B.fill_(1.0)


FAMILY = Family(module=MoR, options=MoROptions, scaled=True, merges=False, peft=None, why_not=WHY_NOT,
                keeps_input=True, saved_per_token=MoR.saved_per_token,
                check_shape=check_rank, fitted=("A", "B", "lam_A", "lam_B"),
                rank_means="", input_factor="A",
                lr=2e-4)  # LoRA's: on SmolLM2 it memorised at the rates LoRA did (docs/experiments.md)
