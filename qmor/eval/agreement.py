"""An export against the adapter on the same tokens: each prompt followed by the adapter's own reply, fed to both
(teacher forcing), compared at every position that predicts a reply token. Same tokens in, so the chat template
plays no part here; it is checked on its own (stops.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Sequence:
    ids: list[int]  # prompt + reply
    start: int  # the first position whose next-token prediction is a reply token (len(prompt) - 1)


@torch.no_grad()
def log_probs(model: nn.Module, sequences: list[Sequence]) -> list[torch.Tensor]:
    """Each sequence's next-token log-probabilities at its reply positions, (T_reply, vocab) in fp32 on the CPU."""
    device = next(model.parameters()).device
    out = []
    for s in sequences:
        logits = model(input_ids=torch.tensor([s.ids], device=device)).logits[0]  # (T, vocab)
        out.append(torch.log_softmax(logits[s.start:len(s.ids) - 1].float(), -1).cpu())
    return out


def compare(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict:
    """top-1 agreement (share of positions whose most likely token is the same), KL(reference || other) in nats
    per position (mean and max), over every reply position."""
    ref, got = torch.cat(reference), torch.cat(other)  # (N, vocab)
    vocab = min(ref.shape[-1], got.shape[-1])  # a GGUF vocabulary may be padded differently: compare the shared part
    ref, got = ref[:, :vocab], got[:, :vocab]
    kl = (ref.exp() * (ref - got)).sum(-1)  # (N,)
    return {"positions": int(ref.shape[0]), "top1": (ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
            "kl_mean": kl.mean().item(), "kl_max": kl.max().item()}
