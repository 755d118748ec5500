"""Mixture-of-experts blocks in 4-bit: each expert's matrices in NF4, dequantised only for the experts a batch
routes to.

transformers 5 stores an MoE block's experts as two 3-D parameters, `gate_up_proj` (E, 2I, H) and `down_proj`
(E, H, I), in a module decorated with `use_experts_implementation`, which its bitsandbytes loader leaves in 16/32-bit.
qmor loads such models in three steps:
1. `experts_left_out(config)`: while transformers builds and loads the model, those classes are built without their
   3-D weights, so the checkpoint's expert tensors are never read (the load lists them as unexpected);
2. `quantise_experts(model, ...)`: each block becomes a `QuantExperts`, its experts read from the checkpoint one
   matrix at a time and quantised with `qmor.model.quant.quantize` (the dense layers' quantiser and double
   quantisation), so the whole 16-bit expert set never sits in memory;
3. each expert's gate/up (H -> 2I, gate rows first) and down (I -> H) map is a 4-bit linear named
   `<block>.gate_up_proj.<e>` / `<block>.down_proj.<e>`, so adapters, LoftQ, merge and export treat it as any other
   4-bit linear. `--targets experts` adapts them; `all-linear` leaves them out (one adapter per expert is many).
   How adapters sit on those maps (one per expert, or one `SharedAdapter` per block and map) is
   `qmor.adapters.experts`.

Only the layout most MoE models share is converted (concatenated gate/up, not transposed, no bias, gated); other
expert classes (gpt-oss, Aria) stay as transformers loads them, and `qmor.model.support` warns with their share.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from qmor.adapters.experts import EXPERT_NAME, TARGET
from qmor.adapters.layer import AdaptedLinear
from qmor.config import QuantConfig
from qmor.errors import QmorError
from qmor.model.files import read_tensor
from qmor.model.quant import linear_4bit, quantize

if TYPE_CHECKING:
    from qmor.model.base import Base

MAPS = ("gate_up_proj", "down_proj")
PER_EXPERT = {"gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")), "down_proj": (("down_proj",), ("w2",))}


class QuantExperts(nn.Module):
    """E experts with NF4 weights; forward is transformers' expert loop, one routed expert's weights at a time."""

    def __init__(self, gate_up: list[nn.Module], down: list[nn.Module], act_fn: Callable):
        super().__init__()
        self.gate_up_proj = nn.ModuleList(gate_up)  # E 4-bit linears H -> 2I: gate rows, then up rows
        self.down_proj = nn.ModuleList(down)  # E 4-bit linears I -> H
        self.act_fn = act_fn
        self.num_experts = len(gate_up)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        # hidden_states (T, H); top_k_index, top_k_weights (T, k)
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)  # (E, k, T)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist()
        for e in hit:  # only routed experts run, so only their weights are ever dequantised
            top_k_pos, token_idx = torch.where(mask[e])
            gate, up = self.gate_up_proj[e](hidden_states[token_idx]).chunk(2, dim=-1)  # (t, I) each
            y = self.down_proj[e](self.act_fn(gate) * up)  # (t, H)
            y = y * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


# ---------------------------------------------------------------------------------------------------- loading


def _classes(config) -> tuple[type | None, list[type]]:
    """config's causal-LM class and its expert classes (decorated with `use_experts_implementation`)."""
    from transformers import AutoModelForCausalLM

    try:
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        return None, []
    module = sys.modules[model_class.__module__]
    return model_class, [c for c in vars(module).values()
                         if isinstance(c, type) and issubclass(c, nn.Module) and hasattr(c, "_apply_gate")]


def convertible(module: nn.Module) -> bool:
    """Whether an expert module has the layout QuantExperts computes (concatenated gate/up, plain, gated)."""
    up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (getattr(module, "is_concatenated", False) and not getattr(module, "is_transposed", True)
            and not getattr(module, "has_bias", True) and getattr(module, "has_gate", False)
            and not getattr(module, "has_post_expert_norm", False)
            and isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) and up.dim() == 3 and down.dim() == 3
            and up.shape[0] == down.shape[0] and up.shape[1] == 2 * down.shape[2] and up.shape[2] == down.shape[1])


@contextmanager
def experts_left_out(config):
    """While active, the architecture's convertible expert modules are built without their 3-D weights (recorded as
    `expert_shape` (E, H, I)), so loading the model reads no expert tensor."""
    model_class, classes = _classes(config)
    if not classes:
        yield
        return
    originals = {c: c.__init__ for c in classes}
    ignored = model_class.__dict__.get("_keys_to_ignore_on_load_unexpected")
    # the checkpoint's expert tensors are skipped on purpose: not worth a load warning
    model_class._keys_to_ignore_on_load_unexpected = [*(ignored or []), r"\.experts\.(gate_up_proj|down_proj)$"]

    def strip(original):
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            if convertible(self):
                self.expert_shape = tuple(self.down_proj.shape)  # (E, H, I)
                for name in MAPS:  # zero-size, outside the state dict: nothing to load, nothing to initialise
                    delattr(self, name)
                    self.register_buffer(name, torch.empty(0), persistent=False)
        return __init__

    for c in classes:
        c.__init__ = strip(originals[c])
    try:
        yield
    finally:
        for c, original in originals.items():
            c.__init__ = original
        if ignored is None:
            del model_class._keys_to_ignore_on_load_unexpected
        else:
            model_class._keys_to_ignore_on_load_unexpected = ignored


def _candidates(block: str, prefix: str) -> list[str]:
    names = [block, block.removeprefix(prefix + ".")]
    return names + [n.replace(".mlp.", ".block_sparse_moe.") for n in names]  # Mixtral's checkpoint names


Parts = list[tuple[str, int | None]]  # checkpoint key, and the expert's index into it when it is a fused 3-D tensor


def checkpoint_parts(block: str, which: str, e: int, names: dict[str, Path], prefix: str) -> Parts:
    """The checkpoint tensors whose rows, concatenated, are expert e's `which` map of `block`: (key, None) for one
    2-D tensor per expert (gate_proj + up_proj, w1 + w3, ...), (key, e) for a fused 3-D tensor's slice e."""
    for base in _candidates(block, prefix):
        for parts in PER_EXPERT[which]:
            keys = [f"{base}.{e}.{p}.weight" for p in parts]
            if all(k in names for k in keys):
                return [(k, None) for k in keys]
        if f"{base}.{which}" in names:
            return [(f"{base}.{which}", e)]
    raise QmorError(f"the checkpoint has no weights for expert {e} of {block} (looked for {block}.{e}.gate_proj, "
                    f".w1 and {block}.{which}); re-save the model with save_pretrained")


def read_parts(parts: Parts, names: dict[str, Path]) -> torch.Tensor:
    return torch.cat([read_tensor(names, key, index) for key, index in parts], dim=0)


def expert_weight(name: str, names: dict[str, Path], prefix: str) -> torch.Tensor | None:
    """The checkpoint's (d_out, d_in) weight of expert linear `name` (None when `name` is not an expert map)."""
    match = EXPERT_NAME.fullmatch(name)
    if match is None:
        return None
    return read_parts(checkpoint_parts(match["block"], match["map"], int(match["e"]), names, prefix), names)


def stripped_blocks(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "expert_shape") and not isinstance(m, QuantExperts)}


@torch.no_grad()
def quantise_experts(model: nn.Module, base: Base, cfg: QuantConfig, device, dtype: torch.dtype) -> int:
    """Put a QuantExperts, read expert by expert from the checkpoint of `base`, in place of every block that
    `experts_left_out` built empty; returns the number of blocks converted."""
    blocks = stripped_blocks(model)
    if not blocks:
        return 0
    names = base.weight_files
    prefix = getattr(model, "base_model_prefix", "model")
    for name, block in blocks.items():
        n_experts, hidden, inter = block.expert_shape
        maps = {which: [] for which in MAPS}
        for e in range(n_experts):
            for which, shape in (("gate_up_proj", (2 * inter, hidden)), ("down_proj", (hidden, inter))):
                W = read_parts(checkpoint_parts(name, which, e, names, prefix), names)
                if tuple(W.shape) != shape:
                    raise QmorError(f"the checkpoint's expert {e} {which} of {name} has shape {tuple(W.shape)}, the "
                                    f"model expects {shape}; the checkpoint does not match its config.json")
                maps[which].append(linear_4bit(quantize(W.to(device), cfg), dtype))
                del W
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, QuantExperts(maps["gate_up_proj"], maps["down_proj"],
                                                                 block.act_fn))
    return len(blocks)


def expert_maps(model: nn.Module) -> list[str]:
    """Names of every expert's gate/up and down linear."""
    return [f"{n}.{which}.{e}" for n, m in model.named_modules() if isinstance(m, QuantExperts)
            for which in MAPS for e in range(m.num_experts)]


def expert_keys(model: nn.Module, names: dict[str, Path], prefix: str) -> dict[str, list]:
    """checkpoint key -> the expert maps it is written from, as (map name, index into a fused tensor or None, rows
    of the map): gate_proj is the first half of an expert's gate/up rows, up_proj the second."""
    keys: dict[str, list] = {}
    for name in expert_maps(model):
        match = EXPERT_NAME.fullmatch(name)
        parts = checkpoint_parts(match["block"], match["map"], int(match["e"]), names, prefix)
        half = len(parts)  # 2: gate and up rows in separate tensors
        for i, (key, index) in enumerate(parts):
            d_out = model.get_submodule(name).out_features
            cut = slice(i * d_out // half, (i + 1) * d_out // half)
            keys.setdefault(key, []).append((name, index, cut))
    return keys


def unadapted_experts(model: nn.Module, targets: str | list[str], base_params: int) -> str | None:
    """One line for an attached MoE model whose targets leave every expert without an adapter (all-linear does, by
    design): the experts' share of the base model's parameters, and the --targets that adapts them as well.
    Without it a run on an MoE model trains attention alone, and nothing says so."""
    maps = [linear for m in model.modules() if isinstance(m, QuantExperts) for which in MAPS for linear in
            getattr(m, which)]
    if not maps or any(isinstance(linear, AdaptedLinear) for linear in maps):
        return None
    share = sum(linear.in_features * linear.out_features for linear in maps) / base_params
    adapted = [n.rpartition(".")[2] for n, m in model.named_modules()
               if isinstance(getattr(m, "stands_for", m), AdaptedLinear)]  # tiled ones too (qmor.model.tile)
    given = targets if isinstance(targets, str) else ",".join(targets)
    return (f"the MoE experts of {type(model).__name__}, {share:.0%} of its parameters, get no adapter with --targets "
            f"{given}; to adapt them too, pass --targets {','.join([TARGET, *dict.fromkeys(adapted)])}")


def meta_experts(model: nn.Module, top_k: int) -> int | None:
    """On a model built on the meta device (the planner's): replace each convertible expert block by a
    QuantExperts of plain meta linears, so its expert maps count as 4-bit linears (and targets); returns the MLP
    width one token's routed experts compute with (top_k x expert width), or None for a dense model."""
    width = None
    for name, block in [(n, m) for n, m in model.named_modules() if convertible(m)]:
        n_experts, hidden, inter = block.down_proj.shape
        gate_up = [nn.Linear(hidden, 2 * inter, bias=False, device="meta") for _ in range(n_experts)]
        down = [nn.Linear(inter, hidden, bias=False, device="meta") for _ in range(n_experts)]
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, QuantExperts(gate_up, down, block.act_fn))
        width = top_k * inter
    return width
