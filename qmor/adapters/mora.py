"""MoRA (arXiv 2405.12130): one square high-rank matrix M between parameter-free compress/decompress operators.

    Δy = decompress(M · compress(x)),  M (r_hat, r_hat),  r_hat = floor(sqrt((d_in + d_out) · r) + 0.5)

so the parameter count matches LoRA at rank r. No alpha scaling. x is wrap-padded to P = n · r_hat entries
(n = ceil(d_in / r_hat)); input j' of the padded vector is input j' mod d_in. Two operator kinds:

- "sharing": sum the n groups of r_hat (input j' feeds slot j' mod r_hat), apply M, tile the r_hat outputs over
  d_out (output i reads slot i mod r_hat). ΔW[i, j] = Σ_{j' ≡ j mod d_in} M[i mod r_hat, j' mod r_hat].
- "rope": cut the padded input into n chunks, rotate chunk k by the angles k·θ_j (θ_j = 10000^(-2j / r_hat),
  half-split rotation as in Llama), apply M to every chunk, flatten to P and truncate or tile to d_out.
  Before folding the padding back, ΔW is block diagonal with blocks M R_k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from qmor.adapters.family import Family, Hyperparams, check_options, option
from qmor.errors import QmorError

# "auto": the paper's code uses rope for small ranks (r = 8) and sharing, its default, for large ones (r = 128 in
# pretraining, r = 256 in the memory tasks)
ROPE_BELOW_RANK = 128


@dataclass
class MoRAOptions:
    kind: str = option("auto", "operators (auto: rope below rank 128, sharing from 128)",
                       "auto", label="MoRA operators", key="mora_kind", choices=("auto", "rope", "sharing"))

    def __post_init__(self) -> None:
        check_options(self)


def mora_kind(hp: Hyperparams) -> str:
    """The operators MoRA uses at this config: "auto" resolved by the rank."""
    if hp.options.kind == "auto":
        return "rope" if hp.r < ROPE_BELOW_RANK else "sharing"
    return hp.options.kind


def mora_rank(d_in: int, d_out: int, r: int, kind: str) -> int:
    r_hat = math.floor(math.sqrt((d_in + d_out) * r) + 0.5)
    return r_hat - r_hat % 2 if kind == "rope" else r_hat


def rope_tables(n: int, r_hat: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (n, r_hat) for chunk k at angles k · θ_j, duplicated over both halves."""
    theta = 10000.0 ** (-2.0 * torch.arange(r_hat // 2, dtype=torch.float64) / r_hat)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * theta  # (n, r_hat / 2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class MoRA(nn.Module):
    def __init__(self, d_in: int, d_out: int, hp: Hyperparams):
        super().__init__()
        self.kind = mora_kind(hp)
        self.d_in, self.d_out = d_in, d_out
        self.r_hat = mora_rank(d_in, d_out, hp.r, self.kind)
        self.n = math.ceil(d_in / self.r_hat)
        self.M = nn.Parameter(torch.zeros(self.r_hat, self.r_hat))  # (r_hat, r_hat)
        cos, sin = rope_tables(self.n, self.r_hat)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @staticmethod
    def num_params(d_in: int, d_out: int, hp: Hyperparams) -> int:
        return mora_rank(d_in, d_out, hp.r, mora_kind(hp)) ** 2

    def _pad(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., n * r_hat)
        pad = self.n * self.r_hat - self.d_in
        return torch.cat([x, x[..., :pad]], dim=-1) if pad else x

    def _fill(self, y: torch.Tensor) -> torch.Tensor:  # (..., m) -> (..., d_out) by tiling or truncation
        reps = math.ceil(self.d_out / y.shape[-1])
        return (torch.cat([y] * reps, dim=-1) if reps > 1 else y)[..., : self.d_out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = self._pad(x).unflatten(-1, (self.n, self.r_hat))  # (..., n, r_hat)
        if self.kind == "sharing":
            return self._fill(chunks.sum(-2) @ self.M.T)
        rotated = chunks * self.cos + rotate_half(chunks) * self.sin
        return self._fill((rotated @ self.M.T).flatten(-2))

    @staticmethod
    def saved_per_token(d_in: int, d_out: int, hp: Hyperparams) -> int:
        """Only the compressed input: the summed chunks (sharing) or the rotated, padded input (rope)."""
        kind = mora_kind(hp)
        r_hat = mora_rank(d_in, d_out, hp.r, kind)
        return -(-d_in // r_hat) * r_hat if kind == "rope" else r_hat

    def _rotations(self) -> torch.Tensor:
        """R_k (n, r_hat, r_hat) with R_k v == v * cos_k + rotate_half(v) * sin_k."""
        eye = torch.eye(self.r_hat, device=self.M.device)
        return torch.diag_embed(self.cos) + self.sin[:, :, None] * rotate_half(eye.T).T

    def _expand(self, M: torch.Tensor) -> torch.Tensor:
        """ΔW (d_out, d_in) of the operator with matrix M."""
        P = self.n * self.r_hat
        dev = M.device
        if self.kind == "sharing":
            padded = M[torch.arange(self.d_out, device=dev) % self.r_hat][:, torch.arange(P, device=dev) % self.r_hat]
        else:
            padded = torch.block_diag(*(M @ self._rotations()))[torch.arange(self.d_out, device=dev) % P]
        out = torch.zeros(self.d_out, self.d_in, device=dev, dtype=M.dtype)
        return out.index_add_(1, torch.arange(P, device=dev) % self.d_in, padded)

    def delta_weight(self) -> torch.Tensor:
        return self._expand(self.M)

    def _adjoint(self, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of R's entries that each entry of M feeds, and how many there are (ignoring the wrap padding)."""
        P, h, dev = self.n * self.r_hat, self.r_hat, R.device
        padded = R[:, torch.arange(P, device=dev) % self.d_in]  # (d_out, P)
        rows = torch.arange(self.d_out, device=dev)
        if self.kind == "sharing":
            folded = torch.zeros(h, P, device=dev).index_add_(0, rows % h, padded)
            counts = torch.zeros(h, device=dev).index_add_(0, rows % h, torch.ones(self.d_out, device=dev))
            return folded.view(h, self.n, h).sum(1), (counts[:, None] * self.n).expand(h, h)
        folded = torch.zeros(P, P, device=dev).index_add_(0, rows % P, padded)
        counts = torch.zeros(P, device=dev).index_add_(0, rows % P, torch.ones(self.d_out, device=dev))
        blocks = torch.stack([folded[k * h : (k + 1) * h, k * h : (k + 1) * h] for k in range(self.n)])
        summed = (blocks @ self._rotations().transpose(1, 2)).sum(0)  # undo each chunk's rotation
        return summed, counts.view(self.n, h).sum(0)[:, None].expand(h, h)

    @torch.no_grad()
    def fit(self, residual: torch.Tensor) -> None:
        """Least-squares M: average the residual's entries per M entry, then the error-minimising overall scale
        (the scale step accounts for the wrap padding, so the fit never increases the error)."""
        residual = residual.to(torch.float32)
        total, counts = self._adjoint(residual)
        M = total / counts.clamp(min=1)
        D = self._expand(M)
        norm = (D * D).sum()
        self.M.copy_(M * ((D * residual).sum() / norm) if norm > 0 else M)

    @torch.no_grad()
    def fit_weighted(self, residual: torch.Tensor, root: torch.Tensor, steps: int = 50) -> None:
        """Least-squares M in the activation-weighted norm ||(R - ΔW(M)) L|| (qmor.adapters.weighted): conjugate
        gradients on the normal equations in M's own space, r_hat² unknowns where the dense system would have
        d_out·d_in; each step is one expand, two products with L and one adjoint. Starts from the plain fit."""
        residual = residual.to(torch.float32)
        root = root.to(torch.float32)

        def normal(M: torch.Tensor) -> torch.Tensor:  # M -> adjoint(ΔW(M) L Lᵀ)
            return self._adjoint(self._expand(M) @ root @ root.T)[0]

        self.fit(residual)
        M = self.M.detach().to(torch.float32).clone()
        target = self._adjoint(residual @ root @ root.T)[0]
        r = target - normal(M)
        p, rr = r.clone(), (r * r).sum()
        stop = 1e-10 * (target * target).sum()
        for _ in range(steps):
            if rr <= stop:
                break
            Ap = normal(p)
            step = rr / (p * Ap).sum()
            M += step * p
            r -= step * Ap
            rr, last = (r * r).sum(), rr
            p = r + (rr / last) * p
        self.M.copy_(M)


def check_shape(d_in: int, d_out: int, hp: Hyperparams, name: str) -> None:
    r_hat = mora_rank(d_in, d_out, hp.r, mora_kind(hp))
    if r_hat > min(d_in, d_out):
        raise QmorError(f"MoRA rank r={hp.r} gives a {r_hat}x{r_hat} matrix, larger than {name} ({d_in}->{d_out}); "
                        "use a smaller --rank")


FAMILY = Family(module=MoRA, options=MoRAOptions, scaled=False, merges=True, peft=None,
                why_not="is not a low-rank adapter (its ΔW is a full-rank compress-M-decompress product), so PEFT's "
                "LoRA format cannot hold it exactly",
                keeps_input=False, saved_per_token=MoRA.saved_per_token, check_shape=check_shape,
                fitted=("M",),
                rank_means="the LoRA rank whose parameter count it matches", input_factor="",  # its own fit_weighted
                lr=4e-4)  # twice LoRA's: on SmolLM2 it memorised best at twice LoRA's best rate (docs/experiments.md)
