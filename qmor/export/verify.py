"""Check an export: logits of the exported model against the 4-bit + adapter model it came from."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qmor.errors import QmorError

PROMPTS = ["The quick brown fox jumps over", "def add(a, b):\n    return", "Q: 12 + 30 = ?\nA:", "Once upon a time"]


@dataclass
class Check:
    max_abs: float  # largest |logit difference| over every position of every prompt
    scale: float  # largest |logit| of the reference, so tolerances can be relative
    top1: float  # fraction of positions whose arg-max token agrees
    tolerance: float  # the max_abs above which the export is refused

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.tolerance

    def line(self) -> str:
        return (f"verify: max |Δlogit| {self.max_abs:.4g} (tolerance {self.tolerance:.3g}, logits up to "
                f"{self.scale:.3g}), top-1 agreement {self.top1:.1%}")


def default_tolerance(verify_dtype: torch.dtype, scale: float) -> float:
    """Relative to the logits' size: fp32 compute leaves only the export's 16-bit weight rounding; half-precision
    compute (on GPU) adds its own rounding on both sides."""
    rel = 0.02 if verify_dtype == torch.float32 else 0.08
    return rel * max(1.0, scale)


def prompt_ids(tokenizer, prompts: list[str] = PROMPTS) -> list[torch.Tensor]:
    return [tokenizer(p, return_tensors="pt").input_ids for p in prompts]  # each (1, T)


@torch.no_grad()
def logits(model: nn.Module, ids: list[torch.Tensor]) -> list[torch.Tensor]:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = [model(input_ids=x.to(device)).logits.float().cpu() for x in ids]  # each (1, T, vocab)
    model.train(was_training)
    return out


def compare(reference: list[torch.Tensor], exported: list[torch.Tensor], verify_dtype: torch.dtype,
            tolerance: float | None = None) -> Check:
    max_abs = max((a - b).abs().max().item() for a, b in zip(reference, exported, strict=True))
    scale = max(a.abs().max().item() for a in reference)
    agree = torch.cat([(a.argmax(-1) == b.argmax(-1)).flatten() for a, b in zip(reference, exported, strict=True)])
    tol = default_tolerance(verify_dtype, scale) if tolerance is None else tolerance
    return Check(max_abs, scale, agree.float().mean().item(), tol)


def require(check: Check, what: str) -> None:
    """Refuse an export whose logits drift beyond tolerance (the caller then discards the output)."""
    if not check.ok:
        raise QmorError(f"{what} failed verification: max |Δlogit| {check.max_abs:.4g} exceeds tolerance "
                        f"{check.tolerance:.3g} (top-1 agreement {check.top1:.1%}); the output was not kept — "
                        "check that the base checkpoint is the one the adapter was trained on")
