"""What every export format is made of: the job it writes from, what it returns, and the steps the formats share
(the merge refusals, the base's tokenizer and config copied, the chat template training used, the model card as
data, and the check that loads the export as a user would and compares its logits with the 4-bit + adapter model).

The merge base is dequant(Q), the 4-bit base the adapter was trained against (Q_T for LoftQ adapters); the original
weights W only on request, and never for LoftQ adapters, which already hold W - Q_T.
"""

from __future__ import annotations

import gc
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qmor import hints
from qmor.adapters import check_family, merge_refusal
from qmor.adapters.attach import AdapterMeta
from qmor.errors import NotMergeable, QmorError
from qmor.export.card import Card, base_name
from qmor.export.merge import write_merged
from qmor.export.verify import Check, compare, logits, prompt_ids, require
from qmor.files import load_json, save_json
from qmor.model.base import TrainedAdapter
from qmor.version import __version__

MERGE_BASES = ("dequantized", "original")
# files copied verbatim from the base folder: tokenizer, chat template, generation defaults
SUPPORT = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
           "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "*.tiktoken", "chat_template.jinja",
           "chat_template.json", "generation_config.json"]
TEMPLATE_FILE = "the one training used (chat_template.jinja)"  # where a merged folder carries the chat template



@dataclass
class Job:
    """What a format writes from: the 4-bit + adapter model (a format may drop it, to free its memory), the adapter
    with its base, the base's checkpoint, and the output folder as it will be named once renamed into place."""

    model: nn.Module | None
    adapter: TrainedAdapter
    folder: Path  # the base's local folder
    names: dict[str, Path]  # its tensor -> safetensors file map
    output: Path

    @property
    def meta(self) -> AdapterMeta:
        return self.adapter.meta

    @property
    def trust_remote_code(self) -> bool:
        return self.adapter.base.trust_remote_code


@dataclass
class Written:
    """What a format wrote and checked: its model card, the lines printed once it is in place, the summary returned."""

    card: Card
    lines: list[str]
    summary: dict


def check_merge(meta: AdapterMeta, merge_base: str, source: str | Path) -> None:
    """Refuse what cannot be merged before anything is loaded or written."""
    family = meta.adapter.family
    if not check_family(family).merges:
        raise NotMergeable(merge_refusal(family, f"serve it with {hints.command('chat', '--adapter', source)}"))
    if merge_base not in MERGE_BASES:
        raise QmorError(f"merge base {merge_base!r} is unknown; choose one of {', '.join(MERGE_BASES)}")
    if merge_base == "original" and meta.own_base:
        how = "LoftQ" if meta.init == "loftq" else "calibrated"
        raise QmorError(f"this adapter was {how}-initialised, so it already holds W - Q_T; merging it onto the "
                        "original weights W would count that residual twice: use --merge-base dequantized")


def copy_support(folder: Path, out: Path, dtype: torch.dtype, trust_remote_code: bool) -> None:
    config = load_json(folder / "config.json")
    config.pop("quantization_config", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    save_json(config, out / "config.json")
    patterns = SUPPORT + (["*.py"] if trust_remote_code else [])  # remote code travels with the weights
    for pattern in patterns:
        for file in folder.glob(pattern):
            shutil.copy2(file, out / file.name)
    if not any((out / name).exists() for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")):
        print(f"warning: {folder} has no tokenizer files, so the export has none either", file=sys.stderr)


def write_chat_template(out: Path, template: str | None) -> None:
    """The template the adapter was trained with, where each tool looks for it: chat_template.jinja (transformers,
    vLLM) and tokenizer_config.json's chat_template (older readers, llama.cpp's converter). Without one recorded
    (an adapter trained on plain text, or saved by an older version) the base's tokenizer files stay as they are."""
    if not template:
        return
    (out / "chat_template.jinja").write_text(template)
    config_file = out / "tokenizer_config.json"
    if config_file.is_file():
        save_json({**load_json(config_file), "chat_template": template}, config_file)
    (out / "chat_template.json").unlink(missing_ok=True)  # a processor's template, which some tools would read first


def model_card(meta: AdapterMeta, merge_base: str, dtype: torch.dtype, check: Check, what: str,
               library: str = "transformers", sections: list[str] | None = None,
               template: str = TEMPLATE_FILE) -> Card:
    """The card's fields: base_model (a Hub id when the base came from one), library, tags, and what was exported;
    `template` says where the export carries the chat template training used."""
    cfg, quant = meta.adapter, meta.quant
    rows = {"base model": base_name(meta.base_model), "adapter family": cfg.family,
            "rank": f"{cfg.r} (alpha {cfg.alpha})", "targets": f"`{cfg.targets}`", "init": meta.init,
            "merge base": merge_base, "chat template": template if meta.chat_template else "none recorded",
            "quantisation": f"NF4, block size {quant.blocksize}, double quant {quant.double_quant}",
            "dtype": str(dtype).removeprefix("torch."),
            "verification": f"max abs logit difference {check.max_abs:.4g}, top-1 agreement {check.top1:.1%}",
            "exported with": f"qmor {__version__}"}
    tags = [cfg.family, "nf4"] + (["lora"] if library == "peft" else ["merged"])
    return Card(what, meta.base_model, library, tags, rows, sections or [])


def verify_folder(reference: nn.Module, folder: Path, dtype: torch.dtype, tolerance: float | None,
                  trust_remote_code: bool, peft_dir: Path | None = None, template: str | None = None) -> Check:
    """Load the export like a user would and compare its logits with the 4-bit + adapter model's (and its chat
    template with the one training used, when one was recorded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = next(reference.parameters()).device
    verify_dtype = torch.float32 if device.type == "cpu" else dtype  # fp32 on CPU: only weight rounding remains
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    if template and tokenizer.chat_template != template:
        raise QmorError(f"the exported tokenizer in {folder.name} does not load the chat template training used; "
                        "the export was not kept")
    ids = prompt_ids(tokenizer)
    expected = logits(reference, ids)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=verify_dtype, device_map={"": str(device)},
                                                 trust_remote_code=trust_remote_code)
    if peft_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(peft_dir))
    check = compare(expected, logits(model, ids), verify_dtype, tolerance)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(check.line(), file=sys.stderr)
    return check


def write_checked_merge(job: Job, out: Path, dtype: torch.dtype, shard_bytes: int, merge_base: str,
                        tolerance: float | None) -> tuple[dict, Check]:
    """The merged model, its tokenizer and chat template written into `out`, and checked against the 4-bit +
    adapter model (a QmorError when it drifts); returns the shard index and the check."""
    template = job.meta.chat_template
    index = write_merged(job.model, job.names, out, dtype, shard_bytes, merge_base)
    copy_support(job.folder, out, dtype, job.trust_remote_code)
    write_chat_template(out, template)
    check = verify_folder(job.model, out, dtype, tolerance, job.trust_remote_code, template=template)
    require(check, "the merged export")
    return index, check
