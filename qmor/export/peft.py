"""Write adapters in PEFT's LoRA format (adapter_config.json + adapter_model.safetensors).

PEFT computes Δy = (lora_alpha / r) · B A x. Each family that can declares `peft`: the layer's A, B at that scale
(LoRA's own factors; MoSLoRA's mixer folded into B).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from qmor.adapters import check_family, peft_families
from qmor.adapters.attach import AdapterMeta, adapted_layers
from qmor.adapters.experts import is_expert_map
from qmor.adapters.family import either
from qmor.errors import QmorError

PEFT_WEIGHTS = "adapter_model.safetensors"


def check_peft_family(family: str, merged_instead: str = "export a merged model instead (drop --peft)") -> None:
    """Refuse a family PEFT's LoRA format cannot hold; `merged_instead` is the fix offered when it merges."""
    spec = check_family(family)
    if spec.peft is None:
        instead = (merged_instead if spec.merges else
                   f"keep the qmor adapter, or train {either(peft_families())} to export for PEFT")
        raise QmorError(f"{family} {spec.why_not}; {instead}")


def peft_state(model: nn.Module, family: str) -> dict[str, torch.Tensor]:
    """PEFT keys: base_model.model.<module>.lora_{A,B}.weight, kept in fp32 (small, and exact)."""
    factors = check_family(family).peft
    state = {}
    for name, layer in adapted_layers(model).items():
        A, B = factors(layer.adapter)
        state[f"base_model.model.{name}.lora_A.weight"] = A
        state[f"base_model.model.{name}.lora_B.weight"] = B
    return state


def write_peft(model: nn.Module, meta: AdapterMeta, out: Path, base_model: str) -> list[str]:
    """Write the PEFT adapter files into `out`; returns the target module names."""
    from peft import LoraConfig

    cfg = meta.adapter
    check_peft_family(cfg.family)
    targets = sorted(adapted_layers(model))
    if any(is_expert_map(t) for t in targets):
        raise QmorError("PEFT's LoRA has no layout for adapters on MoE experts; export a merged model instead "
                        "(drop --peft)")
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model)
    config.save_pretrained(str(out))
    save_file(peft_state(model, cfg.family), str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    return targets
