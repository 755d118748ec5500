"""An adapter's fit in the activation-weighted norm: ΔW minimising ||(R - ΔW) L||, with L Lᵀ = H the (dampened)
Gram matrix of the layer's inputs, so the fit spends its rank where the inputs are (CLoQ, arXiv 2501.18475).

For a family whose `fit` is a plain low-rank fit (declared by `input_factor`), the weighted optimum is that same fit
of R L with the input factor then multiplied by L⁻¹: the rank-r ΔW L closest to R L is trunc_r(R L), and L is
invertible. Routed families fit every expert alike, so their output still does not depend on routing. A family
with another kind of fit gives its own `fit_weighted(residual, root)` (MoRA: least squares in its M space).
"""

from __future__ import annotations

import torch
from torch import nn

from qmor.adapters.registry import check_family
from qmor.errors import QmorError


def check_weighted(family: str) -> None:
    """Refuse, before anything loads, a family whose fit the weighted norm does not carry over to."""
    spec = check_family(family)
    if not spec.input_factor and not callable(getattr(spec.module, "fit_weighted", None)):
        raise QmorError(f"--init calibrated cannot fit {family}: its fit is not a low-rank fit of the residual and "
                        "it has no weighted fit of its own, so the activation-weighted norm does not carry over; "
                        "pass --init loftq")


@torch.no_grad()
def fit_weighted(adapter: nn.Module, family: str, residual: torch.Tensor, root: torch.Tensor) -> None:
    """Fit `adapter` to `residual` (d_out, d_in) in the norm ||· L|| with `root` = L (d_in, d_in), lower
    triangular."""
    check_weighted(family)
    own = getattr(adapter, "fit_weighted", None)
    if callable(own):
        own(residual, root)
        return
    adapter.fit(residual.to(torch.float32) @ root)
    factor = getattr(adapter, check_family(family).input_factor)
    # P L⁻¹ as the solution X of X L = P, without forming the inverse
    factor.copy_(torch.linalg.solve_triangular(root, factor.to(torch.float32), upper=False, left=False))
