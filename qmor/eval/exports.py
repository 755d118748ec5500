"""A run's exports (recorded in its exports.json by `qmor export`, or given), loaded the way a user loads them:
a merged folder with transformers, a PEFT adapter with peft over its base, a GGUF file with transformers'
`gguf_file=`. Each comes with the chat template and the stop tokens a user gets with it."""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qmor.errors import QmorError
from qmor.eval.generate import stop_ids_of
from qmor.eval.stops import modelfile_stops
from qmor.training.run_dir import RunDir

KINDS = ("merged", "peft", "gguf")


@dataclass
class Export:
    path: Path
    kind: str  # merged | peft | gguf
    name: str = ""  # how the report names it: the folder's name, with its parent's when two share one

    def __post_init__(self) -> None:
        self.name = self.name or self.path.name


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: object
    template: str | None  # the chat template a user's tokenizer applies
    stop_ids: list[int]  # what its generate() stops on
    modelfile_stops: list[str] | None  # an Ollama Modelfile's PARAMETER stop strings (GGUF exports)


def kind_of(path: Path) -> str:
    """What an export folder holds; a QmorError naming what was expected otherwise."""
    if not path.is_dir():
        raise QmorError(f"export {path} does not exist; pass the folder `qmor export` wrote")
    if list(path.glob("*.gguf")):
        return "gguf"
    if (path / "adapter_config.json").is_file():
        return "peft"
    if (path / "config.json").is_file():
        return "merged"
    raise QmorError(f"{path} is not an export: it holds no config.json (merged), adapter_config.json (PEFT) or .gguf "
                    "file")


def find(run: RunDir, given: list[Path]) -> tuple[list[Export], list[str]]:
    """The exports recorded in the run (those still on disk) and those given, each once; and a note per recorded
    export that is gone."""
    notes, paths = [], []
    for record in run.recorded_exports():
        path = Path(record["path"])
        if path.is_dir():
            paths.append(path)
        else:
            notes.append(f"export {path} (recorded in {run.exports.name}) is gone; left out")
    paths += [Path(p) for p in given]
    seen, found = set(), []
    for path in paths:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            found.append(Export(path, kind_of(path)))
    names = [e.name for e in found]
    for e in found:
        if names.count(e.name) > 1:  # merged/NAME and gguf/NAME
            e.name = f"{e.path.parent.name}/{e.path.name}"
    return found, notes


def load(export: Export, device: str) -> Loaded:
    """The export in fp32 (so only its own rounding differs from the adapter), with its tokenizer and stop tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"dtype": torch.float32, "device_map": {"": device}}
    path, stops_file = export.path, None
    if export.kind == "gguf":
        name = sorted(path.glob("*.gguf"))[0].name
        tokenizer = AutoTokenizer.from_pretrained(str(path), gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(str(path), gguf_file=name, **kw)
        stops_file = path / "Modelfile"
    elif export.kind == "peft":
        from peft import PeftModel

        base = path / "base" if (path / "base" / "config.json").is_file() else peft_base(path)
        tokenizer = AutoTokenizer.from_pretrained(str(base))
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), **kw), str(path))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), **kw)
    listed = modelfile_stops(stops_file.read_text()) if stops_file and stops_file.is_file() else None
    return Loaded(model.eval(), tokenizer, template_of(tokenizer), stop_ids_of(model), listed)


def peft_base(path: Path) -> str:
    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise QmorError(f"PEFT export {path} names no base model and has no base/ folder; it cannot be loaded")
    return base


def template_of(tokenizer) -> str | None:
    own = getattr(tokenizer, "chat_template", None)
    return own.get("default") if isinstance(own, dict) else own


def free(loaded: Loaded) -> None:
    del loaded.model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
