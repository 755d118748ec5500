"""SiRA (arXiv 2311.09179): a sparse mixture of E LoRA experts, top-k per token, with capacity.

The paper's hyperparameters and several details are not public; these are our choices:
- the k kept gate probabilities are renormalised to sum to 1, so identical experts give exactly one LoRA's output
  (this is what makes `fit`, and with it LoftQ, exact). For k = 1 that gate is always 1 and the task loss gives
  the router no gradient, so training refuses k = 1 (`check_trainable`) rather than keep the raw probability as
  the Switch Transformer does, which would make the output after `fit` depend on routing;
- the capacity limit (at most ceil(cf · k · T / E) of a batch's T tokens per expert, first come first served in
  token order, overflow tokens skip that expert) applies in training only: at inference a token's output must not
  depend on the other tokens in the batch, or generation with a KV cache would disagree with a full forward;
- expert dropout is ordinary dropout on the kept gate weights, in training only;
- the load-balancing loss is the Switch Transformer one, E · Σ_e f_e · p_e (f_e: share of routed token slots,
  p_e: mean gate probability), times aux_loss_weight, stored in `aux_loss` by each forward for the loop to add:
  a training forward's, None after an eval forward (an eval loss never carries it).
The experts are computed densely as one rank E·r LoRA with per-token masked gates: the output is the sparse
mixture's, and at matched parameters the cost is a LoRA's.

Capacity and the balance loss depend on the whole batch, so a layer run tile by tile (qmor.model.tile) hands each
SiRA a `Span` (`open_span`): the tiles' routing carried across them, so that tiled and untiled training agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from qmor.adapters.factor import low_rank
from qmor.adapters.family import Family, Hyperparams, check_options, check_rank, option
from qmor.errors import NotMergeable, QmorError, check_range

WHY_NOT = "routes each token to its own top-k experts, so it has no single dense delta weight"


@dataclass
class SiRAOptions:
    experts: int = option(4, "number of LoRA experts", 4, low=1, label="Experts")
    # top_k is left out of LoftQ's key: `fit` makes every expert the same, so its result does not depend on k
    top_k: int = option(2, "experts per token (2 or more to train)", 2, low=1, label="Top-k",
                        rule="between 1 and experts", training_only=True)
    capacity_factor: float = option(1.25, "expert capacity factor (each expert takes at most ceil(cf * k * T / E) "
                                    "of a batch's T tokens)", 1.25, label="Capacity factor", low=0.0,
                                    open_low=True, training_only=True)
    expert_dropout: float = option(0.1, "dropout on the gate weights", 0.1, label="Expert dropout", low=0.0,
                                   high=1.0, open_high=True, training_only=True)
    aux_loss_weight: float = option(0.01, "weight of the load-balancing loss", 0.01, label="Aux loss weight",
                                    low=0.0, training_only=True)

    def __post_init__(self) -> None:
        check_options(self)
        # top_k 0 routes every token to no expert (the loss goes to nan); above experts it asks for experts that
        # do not exist
        check_range("top_k", self.top_k, f"between 1 and experts ({self.experts})", 1, self.experts, "--top-k 2",
                    integer=True)

    def check_trainable(self) -> None:
        """Refuse top_k 1 for training; an adapter saved with it still loads and serves as it was trained."""
        # one kept gate renormalises to 1, so the task loss gives the router no gradient; the Switch Transformer's
        # raw gate probability would instead make the output after `fit` depend on routing (LoftQ's init inexact)
        if self.top_k == 1:
            hint = "--top-k 2" if self.experts > 1 else "--experts 4 --top-k 2"
            raise QmorError("top_k 1 cannot train SiRA: its one kept gate is renormalised to 1, so the router would "
                            f"learn from the load-balancing loss alone; pass e.g. {hint}")


@dataclass
class Span:
    """The routing of one batch computed a tile at a time: tiles first run in order (recording), then each is
    recomputed in backward (`tile` set) with the counts it started from and the batch's routed shares."""

    sira: SiRA
    total: int  # tokens in the whole batch
    starts: list[torch.Tensor] = field(default_factory=list)  # (E,) tokens each expert took before each tile
    routed: torch.Tensor | None = None  # (E,) token slots routed to each expert over the batch
    probs: torch.Tensor | None = None  # (E,) summed gate probabilities over the batch
    tile: int | None = None  # the tile being recomputed; None while recording

    def before(self, mask: torch.Tensor) -> torch.Tensor:
        """(E,) tokens each expert took before this tile."""
        if self.tile is not None:
            return self.starts[self.tile]
        start = self.routed if self.routed is not None else torch.zeros_like(mask[0])
        self.starts.append(start)
        self.routed = start + mask.sum(0)
        return start

    def loss(self, probs: torch.Tensor) -> torch.Tensor | None:
        """While recording, nothing (the batch is not complete); in a recompute, this tile's share of the balance
        loss: its gradient is the batch loss's gradient on these tokens (the routed shares are constants)."""
        s = self.sira
        if self.tile is None:
            more = probs.detach().sum(0)
            self.probs = more if self.probs is None else self.probs + more
            return None
        share = self.routed / (self.total * s.top_k)
        return s.aux_loss_weight * s.experts * (share * probs.sum(0)).sum() / self.total

    def finish(self) -> torch.Tensor:
        """The batch's balance loss, as the untiled forward computes it (zero outside training)."""
        s = self.sira
        if self.probs is None:
            return torch.zeros((), device=s.router.device)
        return s.aux_loss_weight * s.experts * (self.routed / (self.total * s.top_k) * self.probs / self.total).sum()


class SiRA(nn.Module):
    def __init__(self, d_in: int, d_out: int, hp: Hyperparams):
        super().__init__()
        self.scale = hp.alpha / hp.r
        o = hp.options
        self.experts, self.r, self.top_k = o.experts, hp.r, o.top_k
        self.capacity_factor, self.aux_loss_weight = o.capacity_factor, o.aux_loss_weight
        self.gate_dropout = nn.Dropout(o.expert_dropout)
        self.A = nn.Parameter(torch.empty(o.experts * hp.r, d_in))  # (E r, d_in): expert e owns rows e r..
        self.B = nn.Parameter(torch.zeros(d_out, o.experts * hp.r))  # (d_out, E r)
        self.router = nn.Parameter(torch.empty(o.experts, d_in))  # (E, d_in)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))
        self.aux_loss: torch.Tensor | None = None
        self.span: Span | None = None  # set while a tiled layer runs this adapter (qmor.model.tile)

    @staticmethod
    def num_params(d_in: int, d_out: int, hp: Hyperparams) -> int:
        return hp.options.experts * (hp.r * (d_in + d_out) + d_in)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Dense (T, E) gate weights: renormalised top-k, zero elsewhere; capacity and dropout when training."""
        probs = torch.softmax(x @ self.router.T, dim=-1)  # (T, E)
        top, idx = probs.topk(self.top_k, dim=-1)  # (T, k)
        mask = torch.zeros_like(probs).scatter_(-1, idx, 1.0)
        gates = probs * mask / top.sum(-1, keepdim=True)
        # every forward replaces the loss: one left by the last training step would be added to a Trainer's eval loss
        self.aux_loss = None
        if self.training:
            span = self.span
            total = x.shape[0] if span is None else span.total
            capacity = math.ceil(self.capacity_factor * self.top_k * total / self.experts)
            before = 0 if span is None else span.before(mask)
            keep = (before + mask.cumsum(0) <= capacity).to(mask.dtype)  # first come, first served per expert
            gates = self.gate_dropout(gates * keep)
            if span is None:
                balance = self.experts * (mask.mean(0) / self.top_k * probs.mean(0)).sum()
                self.aux_loss = self.aux_loss_weight * balance
            else:
                self.aux_loss = span.loss(probs)
        return gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])  # (T, d_in)
        h = (tokens @ self.A.T).view(-1, self.experts, self.r)  # (T, E, r)
        h = h * self.gates(tokens)[..., None]
        return (h.flatten(1) @ self.B.T * self.scale).view(*x.shape[:-1], -1)

    def open_span(self, total: int) -> Span:
        """Routing state for a batch of `total` tokens run tile by tile (qmor.model.tile)."""
        return Span(self, total)

    @staticmethod
    def saved_per_token(d_in: int, d_out: int, hp: Hyperparams) -> int:
        n = hp.options.experts
        return 3 * n * hp.r + 4 * n  # expert projections, gates, capacity masks

    def delta_weight(self) -> torch.Tensor:
        raise NotMergeable(f"SiRA {WHY_NOT}; export it as an adapter, or train a family that merges")

    @torch.no_grad()
    def fit(self, residual: torch.Tensor) -> None:
        B, A = low_rank(residual / self.scale, self.r)
        self.A.copy_(A.repeat(self.experts, 1))
        self.B.copy_(B.repeat(1, self.experts))


FAMILY = Family(module=SiRA, options=SiRAOptions, scaled=True, merges=False, peft=None, why_not=WHY_NOT,
                keeps_input=True, saved_per_token=SiRA.saved_per_token,
                check_shape=check_rank, fitted=("A", "B"),
                rank_means="per expert", input_factor="A",
                lr=2e-4)  # not above LoRA's: on SmolLM2 it did worse at the higher rate (docs/experiments.md)
