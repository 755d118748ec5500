"""Adapters on MoE experts' maps: which linears are expert maps, and the two layouts of their adapters.

qmor.model.moe names each expert's gate/up and down map `<block>.gate_up_proj.<e>` / `<block>.down_proj.<e>`, so
it is a linear like any other. Under `expert_adapters="per-expert"` each holds an adapter of its own; under
"shared" every expert's linear of a block's map holds one `SharedAdapter`: one delta for all experts, saved once as
`<block>.<map>.shared`. Attaching, saving, loading, LoftQ, merge and the planner read the layout from here.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from qmor.adapters.config import AdapterConfig
from qmor.adapters.family import either
from qmor.adapters.registry import check_family, mergeable
from qmor.errors import QmorError

TARGET = "experts"  # the --targets word that selects every expert map
EXPERT_NAME = re.compile(r"(?P<block>.+)\.(?P<map>gate_up_proj|down_proj)\.(?P<e>\d+)$")
SHARED = "shared"  # <block>.<map>.shared: the name a block map's shared adapter is saved under
SHARED_NAME = re.compile(r"(?P<block>.+)\.(?P<map>gate_up_proj|down_proj)\.shared$")
# an adapter tensor's key, or an adapter's name, on an expert map: which layout wrote it
LAYOUT_KEY = re.compile(r"\.(?:gate_up_proj|down_proj)\.(?P<which>shared|\d+)(?:\.|$)")


class SharedAdapter(nn.Module):
    """The one adapter of an MoE block's map (gate/up or down) under `expert_adapters="shared"`. Every expert's
    AdaptedLinear of that map holds this same module, so its delta is added to each expert's 4-bit output, its
    gradient sums over the routed experts, its parameters count and train once, and merging adds its ΔW to every
    expert's weight. It has no `fit`: LoftQ leaves shared adapters at their zero init (qmor.model.loftq says why)."""

    def __init__(self, adapter: nn.Module):
        super().__init__()
        self.adapter = adapter  # the family's module, built for one expert's (d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(x)

    def delta_weight(self) -> torch.Tensor:
        return self.adapter.delta_weight()


def shared_name(name: str) -> str:
    """`<block>.<map>.shared` for expert map `<block>.<map>.<e>`: the name its block's shared adapter goes by."""
    match = EXPERT_NAME.fullmatch(name)
    return f"{match['block']}.{match['map']}.{SHARED}"


def adapter_owner(name: str, layout: str) -> str:
    """The name of the adapter linear `name` adds: its shared one for an expert map under the shared layout, else
    its own (`name`). Attaching and the planner both count adapters by it."""
    return shared_name(name) if layout == SHARED and is_expert_map(name) else name


def expert_layout(names) -> str | None:
    """"shared" or "per-expert" for adapter names or tensor keys that include expert adapters; None without."""
    for name in names:
        match = LAYOUT_KEY.search(name)
        if match:
            return SHARED if match["which"] == SHARED else "per-expert"
    return None


def is_expert_map(name: str) -> bool:
    return EXPERT_NAME.fullmatch(name) is not None


def check_expert_family(cfg: AdapterConfig, targets: list[str]) -> None:
    """Refuse, on expert maps, a family that does not merge: those route each token among experts of their own,
    which on top of the block's routing qmor does not support (nor could such adapters be merged or exported)."""
    if any(is_expert_map(t) for t in targets) and not check_family(cfg.family).merges:
        raise QmorError(f"{cfg.family} cannot adapt MoE experts (it routes tokens itself, on top of the experts' "
                        f"router); train {either(mergeable())} on experts, or leave experts out of --targets")
