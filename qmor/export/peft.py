"""The PEFT export: adapters in PEFT's LoRA format (adapter_config.json + adapter_model.safetensors), with (by
default) the dequantised base they were trained over in base/.

PEFT computes Δy = (lora_alpha / r) · B A x. Each family that can declares `peft`: the layer's A, B at that scale
(LoRA's own factors; MoSLoRA's mixer folded into B).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qmor.adapters import check_family, peft_families
from qmor.adapters.attach import OWN_BASE, AdapterMeta, adapted_layers
from qmor.adapters.experts import is_expert_map
from qmor.adapters.family import either
from qmor.errors import QmorError
from qmor.export.merge import check_dtype, parse_size, write_merged
from qmor.export.steps import Job, Written, copy_support, model_card, verify_folder, write_chat_template
from qmor.export.verify import Check, require
from qmor.model.base import TrainedAdapter
from qmor.model.files import hub_id

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


def peft_base(meta: AdapterMeta, folder: Path) -> str:
    """What a PEFT adapter names as its base: the Hub id when the base came from the Hub, else the base's folder
    (where it is now): neither depends on where the export is, so the export can be moved."""
    return hub_id(meta.base_model) or hub_id(str(folder)) or str(folder)


@dataclass
class Peft:
    """A PEFT LoRA adapter, with (by default) the base it belongs on in base/.

    The adapter was trained over dequant(Q), not W, so the matching base is the dequantised 4-bit base, written as
    a plain fp16 model. Without it (with_base=False) the adapter names the original base: fine for default-init
    adapters up to NF4 rounding, wrong for LoftQ adapters (they hold W - Q_T), which are refused.
    """

    with_base: bool = True
    dtype: str = "fp16"
    shard_size: str | int = "2GB"
    tolerance: float | None = None
    name: ClassVar[str] = "peft"

    def check(self, adapter: TrainedAdapter) -> None:
        check_peft_family(adapter.meta.adapter.family)
        if not self.with_base and adapter.meta.own_base:
            how = "LoftQ" if adapter.meta.init == "loftq" else "calibrated"
            raise QmorError(f"this adapter was {how}-initialised, so it only fits its own base Q_T, not "
                            "the original model; export it with its dequantised base (drop --no-base)")
        check_dtype(self.dtype)
        parse_size(self.shard_size)

    def check_checkpoint(self, folder: Path) -> None:
        """Every checkpoint that loads goes to PEFT: nothing to refuse beyond what loading refuses."""

    def write(self, job: Job, out: Path) -> Written:
        model, meta, dtype = job.model, job.meta, check_dtype(self.dtype)
        if self.with_base:
            base_dir = job.output.resolve() / "base"  # where it will be once renamed into place
            (out / "base").mkdir()
            write_merged(model, job.names, out / "base", dtype, parse_size(self.shard_size), with_adapter=False)
            copy_support(job.folder, out / "base", dtype, job.trust_remote_code)
            write_chat_template(out / "base", meta.chat_template)
            # a LoftQ adapter fits its own base Q_T only, which exists nowhere but base/; a default-init adapter
            # names the original base, like any adapter trained on a 4-bit copy (base/ is exact to NF4 rounding)
            names_base = str(base_dir) if meta.own_base else peft_base(meta, job.folder)
            targets = write_peft(model, meta, out, names_base)
            check = verify_folder(model, out / "base", dtype, self.tolerance, job.trust_remote_code, peft_dir=out,
                                  template=meta.chat_template)
            require(check, "the PEFT export")
        else:
            targets = write_peft(model, meta, out, peft_base(meta, job.folder))
            check = Check(0.0, 0.0, 1.0, 0.0)  # no base to run; the factors are checked exactly below
            check_factors(model, out, meta.adapter.alpha / meta.adapter.r)  # PEFT's scale
        if meta.chat_template:  # beside the adapter too, for servers that take the base's tokenizer elsewhere
            (out / "chat_template.jinja").write_text(meta.chat_template)
        what = f"{job.output.name}: PEFT LoRA adapter ({meta.adapter.family}, {len(targets)} modules)"
        base_note = "dequantized, in base/" if self.with_base else "original (NF4 rounding not included)"
        card = model_card(meta, base_note, dtype, check, what, "peft", [peft_notes(self.with_base, meta.init)])
        return Written(card, [f"wrote {job.output} (PEFT adapter over {len(targets)} modules)"],
                       {"output": str(job.output), "targets": targets, "max_abs": check.max_abs, "top1": check.top1})


def peft_notes(with_base: bool, init: str) -> str:
    if not with_base:
        return "Load with `AutoPeftModelForCausalLM.from_pretrained(this folder)`, or over the base with PeftModel."
    exact = "`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"base\"), \".\")`"
    if init in OWN_BASE:
        how = "LoftQ" if init == "loftq" else "calibrated"
        return (f"This {how} adapter fits the base in `base/` only (its 4-bit initialisation Q_T, dequantized), "
                "which `adapter_config.json` names by its path at export time; after moving this folder, load it as "
                f"{exact}.")
    return (f"`base/` holds the dequantized 4-bit base the adapter was trained over: {exact} reproduces the trained "
            "model's logits. `adapter_config.json` names the original base, so `AutoPeftModelForCausalLM` works "
            "wherever this folder is, up to NF4 rounding.")


def check_factors(model: nn.Module, folder: Path, scale: float) -> None:
    """The written A, B reproduce every layer's ΔW (what PEFT will add), when there is no base to run."""
    state = load_file(str(folder / PEFT_WEIGHTS))
    for name, layer in adapted_layers(model).items():
        A, B = state[f"base_model.model.{name}.lora_A.weight"], state[f"base_model.model.{name}.lora_B.weight"]
        expected = layer.adapter.delta_weight().float().cpu()
        if not torch.allclose(scale * B @ A, expected, rtol=1e-4, atol=1e-6):
            raise QmorError(f"PEFT factors for {name} do not reproduce the adapter's ΔW; the export was not kept")
