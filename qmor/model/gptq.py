"""NF4 rounding with error feedback through the layer's input statistics (GPTQ, arXiv 2210.17323, on NF4's grid).

Columns are rounded one at a time; each column's rounding error is pushed onto the columns not yet rounded through
the Cholesky factor of H⁻¹ (H = XᵀX of the layer's calibration inputs, dampened), so the error that remains is the
one the inputs see least. The grid is bitsandbytes' own: the 16 NF4 levels times each 64-weight block's absmax
after double quantisation, taken from `quantize` of the matrix before rounding. Those scales are fixed first (GPTQ's
static groups) because double quantisation ties every block's stored absmax to its neighbours'; the codes are then
written under that very quant_state, so the stored weight is ordinary NF4 and dequantises to what was rounded to.
"""

from __future__ import annotations

import torch

from qmor.config import QuantConfig
from qmor.model.quant import Packed, block_scales, levels, quantize, with_codes

DAMP = 0.01  # added to H's diagonal, as a share of its mean: GPTQ's default, keeps the inverse well conditioned
COLUMNS = 128  # columns rounded between the deferred updates of the rest (GPTQ's lazy batch)


def dampened(H: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """H with `damp` times its mean diagonal added, and inputs never seen (zero rows) made independent."""
    H = H.to(torch.float32).clone()
    diag = H.diagonal()
    diag[diag == 0] = 1.0
    diag += damp * diag.mean()
    return H


def inverse_factor(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ (H already dampened): row i holds the feedback of column i's error."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


@torch.no_grad()
def round_nf4(W: torch.Tensor, H: torch.Tensor, quant: QuantConfig) -> Packed:
    """NF4 storage of W (d_out, d_in) rounded with error feedback through the dampened Gram matrix H (d_in, d_in)."""
    W = W.to(torch.float32)
    packed = quantize(W, quant)
    scales = block_scales(packed).to(W.device)
    grid = levels(packed).to(W.device)
    bounds = (grid[1:] + grid[:-1]) / 2  # a value rounds to the level whose interval holds it
    d_out, d_in = W.shape
    block = packed.quant_state.blocksize
    starts = torch.arange(d_out, device=W.device) * d_in  # flat index of each row's first weight
    U = inverse_factor(H.to(W.device))
    W = W.clone()
    codes = torch.empty(d_out, d_in, dtype=torch.uint8, device=W.device)
    for i1 in range(0, d_in, COLUMNS):
        i2 = min(i1 + COLUMNS, d_in)
        part, errors, Up = W[:, i1:i2], torch.empty(d_out, i2 - i1, device=W.device), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = part[:, i]
            scale = scales[(starts + i1 + i) // block]
            code = torch.bucketize(w / scale.clamp(min=1e-30), bounds)
            codes[:, i1 + i] = code
            err = (w - grid[code] * scale) / Up[i, i]
            part[:, i:] -= err[:, None] * Up[i, i:][None, :]
            errors[:, i] = err
        W[:, i2:] -= errors @ U[i1:i2, i2:]
    return with_codes(packed, codes)
