"""FSDP2 under `accelerate launch --config_file examples/accelerate/fsdp.yaml`: each decoder layer and the loss
module are sharded with torch's `fully_shard`, the 4-bit codes included when they sit in a float container
(`--quant-storage bfloat16`).

qmor shards the model itself, right after loading and before the optimizer is built, so one code path serves GPUs
and CPUs alike (accelerate applies its FSDP plugin to GPUs only, and leaves a model that is already sharded as it
is). Saving gathers the shards: every process takes part, the main process writes the full adapter.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from qmor.adapters.attach import saved_adapters
from qmor.errors import QmorError

FLOATS = {"float16", "bfloat16", "float32"}


def requested() -> bool:
    """The accelerate config asks for FSDP (accelerate launch exports its settings to every process)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check(storage: str, world: int) -> None:
    """One line for each FSDP launch that cannot work, before the model is loaded."""
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise QmorError(f"qmor runs FSDP2 only, and the accelerate config asks for FSDP version {version}; set "
                        "fsdp_version: 2 in it (see examples/accelerate/fsdp.yaml)")
    if storage not in FLOATS:
        raise QmorError(f"FSDP shards float tensors only, and the 4-bit codes are stored as {storage}; add "
                        "--quant-storage bfloat16 (the same codes in a bf16 container)")
    if world < 2:
        raise QmorError("the accelerate config asks for FSDP but only one process runs; launch with "
                        "accelerate launch --num_processes N (N > 1), or drop the FSDP config")


def layer_classes(lm: nn.Module) -> set[str]:
    """The decoder layer classes to shard one by one: the config's list, else the model's own _no_split_modules."""
    named = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    names = {n.strip() for n in named.split(",") if n.strip()} or set(getattr(lm, "_no_split_modules", None) or [])
    found = {type(m).__name__ for m in lm.modules()} & names
    if not found:
        raise QmorError(f"no decoder layer class of {type(lm).__name__} to shard (looked for {sorted(names)}); name "
                        "it in the accelerate config: fsdp_transformer_layer_cls_to_wrap: CLASS")
    return found


def shard(root: nn.Module, lm: nn.Module) -> int:
    """fully_shard every decoder layer of `lm`, then `root` (the module whose forward runs: the loss module);
    returns the number of layers sharded."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    classes = layer_classes(lm)
    for p in lm.parameters():  # every shard from rank 0's adapter initialisation, as DDP would broadcast it
        if p.requires_grad:
            dist.broadcast(p.data, src=0)
    layers = [m for m in lm.modules() if type(m).__name__ in classes]
    for module in layers:
        fully_shard(module)
    fully_shard(root)
    return len(layers)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors from sharded ones; collective: every process must call it, in the same order."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().contiguous() for k, v in state.items()}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return full({f"{name}.{k}": v for name, adapter in saved_adapters(model).items()
                 for k, v in adapter.state_dict().items()})


def optimizer_state(optimizer) -> dict:
    """The optimizer's state dict with whole tensors: the same file a single process writes. Collective."""
    state = optimizer.state_dict()
    return {**state, "state": {i: full(s) for i, s in state["state"].items()}}


def shard_optimizer_state(optimizer) -> None:
    """After loading a whole-tensor state dict: each state tensor sharded like its parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    for group in inner.param_groups:
        for p in group["params"]:
            for key, value in inner.state.get(p, {}).items():
                if isinstance(p, DTensor) and not isinstance(value, DTensor) and value.shape == p.shape:
                    inner.state[p][key] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
