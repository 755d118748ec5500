"""Write a merged checkpoint shard by shard: dequant(Q) (+ ΔW for adapted layers) for every 4-bit linear, the other
tensors copied from the original checkpoint. Peak memory is one output shard plus the loaded 4-bit model.
"""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from qmor.adapters.experts import is_expert_map
from qmor.adapters.layer import AdaptedLinear
from qmor.errors import QmorError
from qmor.files import save_json
from qmor.model.files import INDEX, tensor_key
from qmor.model.moe import expert_keys
from qmor.model.quant import dequantize, is_4bit

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1}
FLOATS = ("F64", "F32", "F16", "BF16")
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """Bytes from "2GB", "500MB", "1GiB" or a plain integer."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(text).upper())
    if not match or float(match[1]) <= 0:
        raise QmorError(f"shard size {text!r} is not a size; write it like 2GB, 500MB or 1GiB")
    return int(float(match[1]) * UNITS[match[2] or ""])


def check_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise QmorError(f"dtype {name!r} is not supported for export; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def quantised_linears(model: nn.Module) -> dict[str, tuple[nn.Module, nn.Module | None]]:
    """module name -> (base linear, adapter or None) for every 4-bit or adapted linear."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            found[name] = (module.base, module.adapter)
        elif is_4bit(module) and name.rpartition(".")[0] not in found:
            found[name] = (module, None)
    return found


def checkpoint_keys(modules: dict, names: dict[str, Path], prefix: str) -> dict[str, str]:
    """checkpoint tensor name -> module name, for each merged linear's weight."""
    keys = {}
    for module in modules:
        if is_expert_map(module):
            continue  # written by expert_keys
        key = tensor_key(module, names, prefix)
        if key is None:
            raise QmorError(f"the base checkpoint has no tensor {module}.weight; export needs a checkpoint whose "
                            "tensor names match the model's modules (re-save the base with save_pretrained)")
        keys[key] = module
    return keys


def plan_shards(names: dict[str, Path], dtype: torch.dtype, limit: int) -> list[list[str]]:
    """Group tensor names into shards of at most `limit` output bytes (a larger single tensor gets its own)."""
    shards, current, size = [], [], 0
    out_item = torch.tensor([], dtype=dtype).element_size()
    by_file: dict[Path, list[str]] = {}
    for key, file in names.items():
        by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for key in keys:
                piece = f.get_slice(key)
                kind = piece.get_dtype()
                numel = 1
                for d in piece.get_shape():
                    numel *= d
                nbytes = numel * (out_item if kind in FLOATS else ITEMSIZE.get(kind, 8))
                if current and size + nbytes > limit:
                    shards.append(current)
                    current, size = [], 0
                current.append(key)
                size += nbytes
    if current:
        shards.append(current)
    return shards


@torch.no_grad()
def merged_weight(base: nn.Module, adapter: nn.Module | None, original: torch.Tensor | None) -> torch.Tensor:
    """fp32 (d_out, d_in) on the layer's device: the merge base (dequant(Q), or W when `original` is given) + ΔW."""
    if original is not None:
        weight = original.to(base.weight.device, torch.float32)
    else:
        weight = dequantize(base.weight) if is_4bit(base) else base.weight.detach().to(torch.float32)
    if adapter is not None:
        weight = weight + adapter.delta_weight().to(torch.float32)
    return weight


def expert_tensor(parts: list, modules: dict, merge_base: str, with_adapter: bool) -> torch.Tensor:
    """One checkpoint tensor of MoE experts, from their merged maps: a per-expert matrix (a row range of one map) or
    a fused 3-D tensor (the maps of every expert, stacked)."""
    if merge_base == "original":
        raise QmorError("MoE experts merge onto their 4-bit weights only; export with merge base 'dequantized'")
    rows = []
    for module, _, cut in parts:
        base, adapter = modules[module]
        rows.append(merged_weight(base, adapter if with_adapter else None, None)[cut])
    return rows[0] if parts[0][1] is None else torch.stack(rows)


def write_merged(
    model: nn.Module,
    names: dict[str, Path],
    out: Path,
    dtype: torch.dtype,
    shard_bytes: int,
    merge_base: str = "dequantized",
    with_adapter: bool = True,
) -> dict:
    """Write model-0000i-of-0000n.safetensors + the index into `out`; returns the index dict.

    `names` maps every tensor of the base checkpoint to its safetensors file. Tensors are read one at a time.
    """
    modules = quantised_linears(model)
    prefix = getattr(model, "base_model_prefix", "model")
    merged = checkpoint_keys(modules, names, prefix)
    experts = expert_keys(model, names, prefix)  # MoE experts: key -> [(module, expert, rows)]
    shards = plan_shards(names, dtype, shard_bytes)
    total = len(shards)
    weight_map, total_size = {}, 0
    with contextlib.ExitStack() as stack:
        # closed on failure too, so an error line starts on a line of its own
        bar = stack.enter_context(tqdm(total=len(names), desc="export", unit="tensor", file=sys.stderr))
        handles = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in set(names.values())}
        for i, keys in enumerate(shards, start=1):
            filename = f"model-{i:05d}-of-{total:05d}.safetensors"
            tensors = {}
            for key in keys:
                if key in experts:
                    tensor = expert_tensor(experts[key], modules, merge_base, with_adapter)
                elif key in merged:
                    base, adapter = modules[merged[key]]
                    original = handles[names[key]].get_tensor(key) if merge_base == "original" else None
                    tensor = merged_weight(base, adapter if with_adapter else None, original)
                else:
                    tensor = handles[names[key]].get_tensor(key)
                if tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                tensors[key] = tensor.cpu().contiguous()
                total_size += tensors[key].numel() * tensors[key].element_size()
                weight_map[key] = filename
                bar.update()
            save_file(tensors, str(out / filename), metadata={"format": "pt"})
            del tensors
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    save_json(index, out / INDEX)
    return index
