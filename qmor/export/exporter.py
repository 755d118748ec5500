"""Export a trained adapter: merged into a plain fp16/bf16 Hugging Face model, as a PEFT LoRA adapter, or as a GGUF
file for llama.cpp and Ollama.

Every format goes through `export`, the steps they share: the adapter and its base resolved once, the format's own
refusals, the output checked, the base checkpoint found, the 4-bit + adapter model loaded, the files written into a
temporary folder that is renamed into place only once the format has checked them against that model, the model
card, the export recorded in its run and the next steps printed. A format (`Merged` in merged.py, `Peft` in
peft.py, `Gguf` in gguf.py) is the step in the middle: its `name`, what it refuses (`check` before anything is read,
`check_checkpoint` before the model loads), and what it writes and checks (`write`, from the `Job` in steps.py).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from qmor import hints
from qmor.errors import QmorError
from qmor.export.gguf import Gguf
from qmor.export.merged import Merged
from qmor.export.peft import Peft
from qmor.export.steps import Job
from qmor.files import atomic_dir, load_json
from qmor.model.base import Base, TrainedAdapter, moved_base
from qmor.model.load import load_trained
from qmor.training.run_dir import RunDir, open_adapter

Format = Merged | Peft | Gguf


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


# ---------------------------------------------------------------------------------------------------- the API


def export_merged(source: str | Path | TrainedAdapter, output: str | Path, **options) -> dict:
    """Merge a run's adapter into its base and write a plain Hugging Face model folder; returns a summary.
    `options`: Merged's (dtype, merge_base, shard_size, tolerance) and export's (overwrite, device, base_model, ...)."""
    return _export_as(Merged, source, output, options)


def export_peft(source: str | Path | TrainedAdapter, output: str | Path, **options) -> dict:
    """PEFT LoRA adapter in `output`, plus (by default) the base it belongs on in `output/base` (see `Peft`).
    `options`: Peft's (with_base, dtype, shard_size, tolerance) and export's."""
    return _export_as(Peft, source, output, options)


def export_gguf(source: str | Path | TrainedAdapter, output: str | Path, **options) -> dict:
    """Merge a run's adapter, convert it to one GGUF file with an Ollama Modelfile beside it, check both steps.
    `options`: Gguf's (gguf_type, merge_base, tolerance) and export's."""
    return _export_as(Gguf, source, output, options)


def _export_as(kind: type, source, output, options: dict) -> dict:
    """`export` in format `kind`, built from the options that are its fields; the others are export's."""
    own = {f.name for f in dataclasses.fields(kind)}
    fmt = kind(**{k: v for k, v in options.items() if k in own})
    return export(fmt, source, output, **{k: v for k, v in options.items() if k not in own})


__all__ = ["Format", "export", "export_gguf", "export_merged", "export_peft"]
