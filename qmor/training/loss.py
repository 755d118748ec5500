"""Causal LM loss computed in chunks, so the full (tokens, vocab) fp32 logits never exist at once.

The decoder body gives hidden states; the output head and cross-entropy run per chunk of labelled tokens, and each
chunk is differentiated as soon as its loss is known, in the forward pass: only the gradient of its hidden states
(chunk x hidden, small beside chunk x vocab) is kept for the backward pass, and its logits are freed at once. At 32k
tokens and a 32k vocabulary the full fp32 logits alone would be 4 GB, plus as much again for their gradient.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from qmor.training.offload import Offload

IGNORE = -100  # label of tokens that carry no loss (prompt, padding)


def enable_checkpointing(lm: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer of a transformers model.

    transformers 5.23 renamed gradient_checkpointing_enable to activation_checkpointing_enable (the old name warns
    and goes in 6); releases before 5.23 have only the old name, with the same behaviour.
    """
    enable = getattr(lm, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _chunk_ce(head: nn.Module, scale: float, softcap: float | None, hidden: torch.Tensor, labels: torch.Tensor
              ) -> torch.Tensor:
    logits = head(hidden).float()  # (n, V): only this chunk's logits
    if scale != 1.0:  # skipped when 1: a multiply over (n, V) in forward and again in backward
        logits = logits * scale
    if softcap:  # Gemma-2 style final logit soft-capping, which the model's own forward would apply
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, labels, reduction="sum")


class _HeadLoss(torch.autograd.Function):
    """Summed cross-entropy of hidden states (n, d) through the head, differentiated chunk by chunk in forward.

    Recomputing each chunk in backward (checkpointing) would run the head's matmul twice, and in small models it is
    the largest one (576 x 49152 in SmolLM2, a fifth of the forward FLOPs); keeping each chunk's gradient instead
    costs n x d, the size of the gradient that backward makes anyway. The loss is a plain sum of the chunks' losses,
    so backward only scales the kept gradients by the incoming one.
    """

    @staticmethod
    def forward(ctx, hidden, labels, head, scale, softcap, chunk, *params):
        grads = [torch.zeros_like(hidden), *(torch.zeros_like(p) for p in params)]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, labels.numel(), chunk):
            part = hidden.detach()[start : start + chunk].requires_grad_()
            with torch.enable_grad():
                loss = _chunk_ce(head, scale, softcap, part, labels[start : start + chunk])
            found = torch.autograd.grad(loss, [part, *params])
            grads[0][start : start + chunk] = found[0]
            for grad, more in zip(grads[1:], found[1:], strict=True):
                grad += more
            total += loss.detach()
        ctx.save_for_backward(*grads)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, *grad_params = ctx.saved_tensors
        return grad_hidden * grad_total, None, None, None, None, None, *(g * grad_total for g in grad_params)


def chunked_cross_entropy(
    hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunk: int = 1024, softcap: float | None = None,
    scale: float = 1.0,
) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies, number of labelled tokens) for hidden (B, T, d) and labels (B, T).

    Labels are aligned with the inputs (as a data collator writes them); the shift happens here, as in HF models.
    """
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B (T-1), d)
    y = labels[:, 1:].reshape(-1)  # (B (T-1),)
    keep = y != IGNORE
    h, y = h[keep], y[keep]  # (n, d), (n,): unlabelled positions need no logits at all
    total = hidden.sum() * 0.0  # zero that stays in the graph, so a batch with no labels still backpropagates
    trainable = [p for p in head.parameters() if p.requires_grad]
    if torch.is_grad_enabled() and (h.requires_grad or trainable):
        total = total + _HeadLoss.apply(h, y, head, scale, softcap, chunk, *trainable)
    else:  # evaluation: no gradient to keep
        for start in range(0, y.numel(), chunk):
            total = total + _chunk_ce(head, scale, softcap, h[start : start + chunk], y[start : start + chunk])
    return total.float(), int(y.numel())


class ChunkedLoss(nn.Module):
    """Wraps a causal LM so that forward returns (loss sum, labelled tokens) without full logits.

    A module rather than a function so that data parallelism (DDP) can wrap it: its gradient hooks expect the
    wrapped module's forward to be the one that runs.
    """

    def __init__(self, lm: nn.Module, chunk: int = 1024, offload: bool = False):
        super().__init__()
        self.lm = lm
        self.chunk = chunk
        self.offload = offload  # with checkpointing on, the tensors saved outside the layers are the layer inputs

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **inputs) -> tuple[torch.Tensor, int]:
        # the layer inputs a checkpoint keeps go to host memory and come back one layer ahead of the backward
        offload = Offload() if self.offload else contextlib.nullcontext()
        with offload:
            hidden = self.lm.get_decoder()(input_ids=input_ids, **inputs).last_hidden_state  # (B, T, d)
        softcap, scale = head_scaling(self.lm.config)
        return chunked_cross_entropy(hidden, labels, self.lm.get_output_embeddings(), self.chunk, softcap, scale)


def head_scaling(config) -> tuple[float | None, float]:
    """(soft cap, scale) the model's own forward applies to its logits."""
    softcap = getattr(config, "final_logit_softcapping", None)
    return softcap, 1.0 / getattr(config, "logits_scaling", 1.0)  # Granite divides its logits by logits_scaling
