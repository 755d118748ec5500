"""Export a trained adapter in every format: merged into a plain fp16 Hugging Face model (default), as a PEFT LoRA
adapter, or as a GGUF file for llama.cpp and Ollama (with a Modelfile); each is checked before it is kept.

    qmor export runs/NAME --output merged/NAME                 # fp16, merged onto dequant(Q)
    qmor export runs/NAME --output merged/NAME --dtype bf16 --shard-size 5GB
    qmor export runs/NAME --output peft/NAME --format peft     # adapter + its base in base/
    qmor export runs/NAME --output gguf/NAME --format gguf     # GGUF q8_0 + Ollama Modelfile
"""

from __future__ import annotations

import argparse

from qmor.commands import USER_ERRORS, fail
from qmor.errors import QmorError


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a run folder (runs/NAME) or an adapter folder")
    p.add_argument("--output", required=True, help="folder to write; refused if it exists, unless --overwrite")
    p.add_argument("--format", choices=["merged", "peft", "gguf"], default="merged",
                   help="merged model, PEFT adapter, or GGUF file for llama.cpp / Ollama (with a Modelfile)")
    p.add_argument("--peft", action="store_true", help="same as --format peft")
    p.add_argument("--dtype", choices=["fp16", "bf16"], default=None,
                   help="dtype of the written weights (default fp16)")
    p.add_argument("--gguf-type", default="q8_0", help="GGUF only: f16, bf16 or q8_0 (default)")
    p.add_argument("--merge-base", choices=["dequantized", "original"], default="dequantized",
                   help="dequant(Q), what the adapter was trained against, or the original weights W")
    p.add_argument("--shard-size", default="2GB", help="largest safetensors shard, e.g. 2GB, 500MB")
    p.add_argument("--no-base", action="store_true",
                   help="PEFT only: write the adapter alone, naming the original base (not for LoftQ adapters)")
    p.add_argument("--base-model", "--model", dest="base_model", default=None,
                   help="base model folder, hub id or built-in name (default: the base the adapter records; another "
                   "copy must be the same model: its fingerprint is checked)")
    p.add_argument("--allow-other-base", action="store_true",
                   help="merge onto a base whose fingerprint differs from the one the adapter was trained on")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--tolerance", type=float, default=None, help="largest |Δlogit| accepted by the final check")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    try:
        fmt = export_format(args)
        # loaded when the command runs, so --help and bad options answer at once
        from qmor.export.exporter import export
        from qmor.training.run_dir import open_adapter

        adapter = open_adapter(args.source, args.base_model, args.trust_remote_code)
        export(fmt, adapter, args.output, overwrite=args.overwrite, device=args.device,
               allow_other_base=args.allow_other_base)
    except USER_ERRORS as e:
        return fail(e)
    return 0


def export_format(args: argparse.Namespace):
    """The format the flags ask for, its settings checked (for GGUF: its type and the converter) before the adapter
    is looked at."""
    # loaded when the command runs, so --help and bad options answer at once
    from qmor.export.gguf import Gguf
    from qmor.export.merged import Merged
    from qmor.export.peft import Peft

    if args.format == "gguf" and not args.peft:
        if args.dtype or args.no_base:
            raise QmorError(f"{'--dtype' if args.dtype else '--no-base'} does not apply to GGUF exports; the "
                            "GGUF weights are set with --gguf-type (f16, bf16 or q8_0)")
        return Gguf(args.gguf_type, args.merge_base, args.tolerance)
    dtype = args.dtype or "fp16"
    if args.peft or args.format == "peft":
        if args.merge_base != "dequantized":
            raise QmorError("--merge-base applies to merged exports; a PEFT adapter goes over its dequantised "
                            "base (or, with --no-base, the original one)")
        return Peft(not args.no_base, dtype, args.shard_size, args.tolerance)
    if args.no_base:
        raise QmorError("--no-base applies to PEFT exports only; add --format peft or drop --no-base")
    return Merged(dtype, args.merge_base, args.shard_size, args.tolerance)
