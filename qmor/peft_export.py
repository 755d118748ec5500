"""Write LoRA and MoSLoRA adapters in PEFT's LoRA format (adapter_config.json + adapter_model.safetensors).

PEFT computes Δy = (lora_alpha / r) · B A x, the same scale as ours. MoSLoRA's mixer folds into B exactly:
s · B M A = s · (B M) A, so it exports as a plain rank-r LoRA.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from qmor.attach import AdapterMeta, adapted_layers
from qmor.errors import QmorError

PEFT_FAMILIES = ("lora", "moslora")
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def check_peft_family(family: str) -> None:
    if family == "mora":
        raise QmorError("MoRA is not a low-rank adapter (its ΔW is a full-rank compress-M-decompress product), so "
                        "PEFT's LoRA format cannot hold it exactly; export a merged model instead (drop --peft)")
    if family not in PEFT_FAMILIES:
        raise QmorError(f"{family} routes each token to its own experts, so it has no fixed LoRA weights for PEFT; "
                        "keep the qmor adapter, or train lora or moslora to export for PEFT")


@torch.no_grad()
def lora_factors(adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, d_in), B (d_out, r)) in fp32 with ΔW = s · B A."""
    B = adapter.B.float()
    if hasattr(adapter, "M"):  # MoSLoRA: B' = B M
        B = B @ adapter.M.float()
    return adapter.A.float().contiguous().cpu(), B.contiguous().cpu()


def peft_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT keys: base_model.model.<module>.lora_{A,B}.weight, kept in fp32 (small, and exact)."""
    state = {}
    for name, layer in adapted_layers(model).items():
        A, B = lora_factors(layer.adapter)
        state[f"base_model.model.{name}.lora_A.weight"] = A
        state[f"base_model.model.{name}.lora_B.weight"] = B
    return state


def write_peft(model: nn.Module, meta: AdapterMeta, out: Path, base_model: str) -> list[str]:
    """Write the PEFT adapter files into `out`; returns the target module names."""
    from peft import LoraConfig

    cfg = meta.adapter
    check_peft_family(cfg.family)
    targets = sorted(adapted_layers(model))
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model)
    config.save_pretrained(str(out))
    save_file(peft_state(model), str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    return targets
