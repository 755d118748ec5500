"""Export a trained adapter: merged into a plain fp16/bf16 Hugging Face model, or as a PEFT LoRA adapter.

Every format goes through `export`, the steps they share: the adapter and its base resolved once, the format's own
refusals, the output checked, the base checkpoint found, the 4-bit + adapter model loaded, the files written into a
temporary folder that is renamed into place only once the format has checked them against that model, the model
card, the export recorded in its run and the next steps printed. A format (`Merged`, `Peft` here, `Gguf` in
qmor/export/gguf.py) is the step in the middle: what it refuses, and what it writes and checks.

The merge base is dequant(Q), the 4-bit base the adapter was trained against (Q_T for LoftQ adapters); the original
weights W only on request, and never for LoftQ adapters, which already hold W - Q_T.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file
from torch import nn

from qmor import hints
from qmor.adapters import check_family, merge_refusal
from qmor.adapters.attach import AdapterMeta, adapted_layers
from qmor.errors import NotMergeable, QmorError
from qmor.export.card import Card, base_name
from qmor.export.merge import check_dtype, parse_size, write_merged
from qmor.export.peft import PEFT_WEIGHTS, check_peft_family, write_peft
from qmor.export.verify import Check, compare, logits, prompt_ids, require
from qmor.files import atomic_dir, load_json, save_json
from qmor.model.base import Base, TrainedAdapter, moved_base
from qmor.model.files import INDEX, hub_id
from qmor.model.load import load_trained
from qmor.training.run_dir import RunDir, open_adapter
from qmor.version import __version__

MERGE_BASES = ("dequantized", "original")
# files copied verbatim from the base folder: tokenizer, chat template, generation defaults
SUPPORT = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
           "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "*.tiktoken", "chat_template.jinja",
           "chat_template.json", "generation_config.json"]
TEMPLATE_FILE = "the one training used (chat_template.jinja)"  # where a merged folder carries the chat template


# ---------------------------------------------------------------------------------------------------- the pipeline


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


class Format:
    """One export format, the step in the middle of `export`: what it refuses, and what it writes and checks."""

    name: ClassVar[str]  # what the run's exports.json records: merged, peft, gguf

    def check(self, adapter: TrainedAdapter) -> None:
        """Refusals that need no model: before the output or the base is looked at."""

    def check_checkpoint(self, folder: Path) -> None:
        """Refusals that need the base's files, before minutes of loading."""

    def write(self, job: Job, out: Path) -> Written:
        """Write the export into `out` (renamed to job.output afterwards) and check it; a QmorError keeps nothing."""
        raise NotImplementedError


def export(fmt: Format, source: str | os.PathLike | TrainedAdapter, output: str | os.PathLike,
           overwrite: bool = False, device: str | None = None, base_model: str | Base | None = None,
           trust_remote_code: bool = False, allow_other_base: bool = False) -> dict:
    """Export the adapter in `source` (a run folder, an adapter folder, or one opened already) in `fmt` to
    `output`, atomically: nothing is left behind unless every check passed. Returns the format's summary."""
    adapter = open_adapter(source, base_model, trust_remote_code)
    output = Path(output)
    fmt.check(adapter)
    check_output(output, overwrite)
    folder, names = base_checkpoint(adapter.located_base(), given=adapter.base_given)
    fmt.check_checkpoint(folder)
    # the job alone holds the model, so a format can free its memory before a step that needs it
    job = Job(load_trained(adapter, device, allow_other_base=allow_other_base)[0].eval(), adapter, folder, names,
              output)
    with atomic_dir(output, overwrite) as tmp:
        written = fmt.write(job, tmp)
        (tmp / "README.md").write_text(written.card.text())
    evaluate_hint = remember(adapter, output, fmt.name)
    for line in written.lines + ([evaluate_hint] if evaluate_hint else []):
        print(line, file=sys.stderr)
    return written.summary


def check_merge(meta: AdapterMeta, merge_base: str, source: str | Path) -> None:
    """Refuse what cannot be merged before anything is loaded or written."""
    family = meta.adapter.family
    if not check_family(family).merges:
        raise NotMergeable(merge_refusal(family, f"serve it with {hints.command('chat', '--adapter', source)}"))
    if merge_base not in MERGE_BASES:
        raise QmorError(f"merge base {merge_base!r} is unknown; choose one of {', '.join(MERGE_BASES)}")
    if merge_base == "original" and meta.init == "loftq":
        raise QmorError("this adapter was LoftQ-initialised, so it already holds W - Q_T; merging it onto the "
                        "original weights W would count that residual twice: use --merge-base dequantized")


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an output that exists, or whose folder cannot be written, before minutes of loading and merging."""
    if output.exists() and not overwrite:
        raise QmorError(f"{output} already exists; choose another --output or pass --overwrite")
    parent = output.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise QmorError(f"{parent} is a file, so {output} cannot be written below it; choose another --output")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QmorError(f"cannot write into {parent} (permission denied); choose an --output in a folder you can "
                        "write to")


def base_checkpoint(base: str | Base, given: bool = False) -> tuple[Path, dict[str, Path]]:
    """The base model's local folder and its tensor -> safetensors file map (never .bin: no unpickling)."""
    base = Base.resolve(base)
    if base.missing:
        raise moved_base(base, given)
    if "quantization_config" in load_json(base.folder / "config.json"):
        raise QmorError(f"{base} is stored pre-quantised; export merges from the original 16/32-bit checkpoint, "
                        "so pass that with --base-model")
    return base.folder, base.weight_files


def remember(adapter: TrainedAdapter, output: Path, fmt: str) -> str | None:
    """A run folder records its exports, so `qmor eval RUN` finds them; a run folder that cannot be written loses
    only that record, not the export. Returns the hint to print last, when it was recorded."""
    run = RunDir(adapter.source)
    if run.final_adapter() is None:
        return None  # an adapter folder given directly: no run to record in
    try:
        run.record_export(output, fmt)
    except OSError as e:
        print(f"warning: could not record the export in {run.exports} ({e.strerror or e})", file=sys.stderr)
        return None
    return hints.evaluate(adapter.source)


# ---------------------------------------------------------------------------------------------------- the steps


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


def peft_base(meta: AdapterMeta, folder: Path) -> str:
    """What a PEFT adapter names as its base: the Hub id when the base came from the Hub, else the base's folder
    (where it is now): neither depends on where the export is, so the export can be moved."""
    return hub_id(meta.base_model) or hub_id(str(folder)) or str(folder)


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


@dataclass
class Merged(Format):
    """A plain Hugging Face model folder: the adapter merged into its base, in shards."""

    dtype: str = "fp16"
    merge_base: str = "dequantized"
    shard_size: str | int = "2GB"
    tolerance: float | None = None
    name: ClassVar[str] = "merged"

    def check(self, adapter: TrainedAdapter) -> None:
        check_merge(adapter.meta, self.merge_base, adapter.source)
        check_dtype(self.dtype)
        parse_size(self.shard_size)

    def write(self, job: Job, out: Path) -> Written:
        dtype = check_dtype(self.dtype)
        index, check = write_checked_merge(job, out, dtype, parse_size(self.shard_size), self.merge_base,
                                           self.tolerance)
        card = model_card(job.meta, self.merge_base, dtype, check,
                          f"{job.output.name}: merged {job.meta.adapter.family} model")
        shards = sorted(set(index["weight_map"].values()))
        lines = [f"wrote {job.output} ({len(shards)} shard(s), {index['metadata']['total_size'] / 1e6:.1f} MB)",
                 hints.chat_model(job.output)]
        return Written(card, lines, {"output": str(job.output), "shards": shards, "max_abs": check.max_abs,
                                     "top1": check.top1, "tolerance": check.tolerance})


@dataclass
class Peft(Format):
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
        if not self.with_base and adapter.meta.init == "loftq":
            raise QmorError("this adapter was LoftQ-initialised, so it only fits the LoftQ base Q_T, not the original "
                            "model; export it with its dequantised base (drop --no-base)")
        check_dtype(self.dtype)
        parse_size(self.shard_size)

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
            names_base = str(base_dir) if meta.init == "loftq" else peft_base(meta, job.folder)
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


# ---------------------------------------------------------------------------------------------------- the API


def export_merged(
    source: str | Path | TrainedAdapter,
    output: str | Path,
    dtype: str = "fp16",
    merge_base: str = "dequantized",
    shard_size: str | int = "2GB",
    overwrite: bool = False,
    device: str | None = None,
    base_model: str | Base | None = None,
    trust_remote_code: bool = False,
    tolerance: float | None = None,
    allow_other_base: bool = False,
) -> dict:
    """Merge a run's adapter into its base and write a plain Hugging Face model folder; returns a summary."""
    return export(Merged(dtype, merge_base, shard_size, tolerance), source, output, overwrite, device, base_model,
                  trust_remote_code, allow_other_base)


def export_peft(
    source: str | Path | TrainedAdapter,
    output: str | Path,
    with_base: bool = True,
    dtype: str = "fp16",
    shard_size: str | int = "2GB",
    overwrite: bool = False,
    device: str | None = None,
    base_model: str | Base | None = None,
    trust_remote_code: bool = False,
    tolerance: float | None = None,
    allow_other_base: bool = False,
) -> dict:
    """PEFT LoRA adapter in `output`, plus (by default) the base it belongs on in `output/base` (see `Peft`)."""
    return export(Peft(with_base, dtype, shard_size, tolerance), source, output, overwrite, device, base_model,
                  trust_remote_code, allow_other_base)


def peft_notes(with_base: bool, init: str) -> str:
    if not with_base:
        return "Load with `AutoPeftModelForCausalLM.from_pretrained(this folder)`, or over the base with PeftModel."
    exact = "`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"base\"), \".\")`"
    if init == "loftq":
        return (f"This LoftQ adapter fits the base in `base/` only (its 4-bit initialisation Q_T, dequantized), "
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


__all__ = ["INDEX", "Merged", "Peft", "export", "export_merged", "export_peft"]
