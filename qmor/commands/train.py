"""Fine-tune an adapter on a 4-bit NF4 base.

With no arguments: the built-in default. A tiny Llama-style model built in code memorises random UUID pairs (the
MoRA paper's task) with a MoRA adapter on a LoftQ-initialised 4-bit base; offline, a couple of minutes on a CPU.
Any other model gets LoRA r16 on every linear at its family's learning rate for 3 epochs, sequences as long as the
longest example and 8 per step in micro-batches that fit; flags left out show as auto, and the run prints what it
decided and why. `qmor train` and `python scripts/finetune_4bit.py` are the same command.

    qmor train
    qmor train --model meta-llama/Llama-2-7b-hf --dataset data.jsonl
    qmor train --model meta-llama/Llama-2-7b-hf --dataset data.jsonl --family mora --epochs 1 --max-len 2048
    qmor train --config run.yaml --lr 1e-4        # flags override the config file
    qmor train --learning_rate 1e-4 --lora_r 16    # transformers' / LLaMA-Factory's names are aliases
    qmor train --resume --output runs/NAME         # continue from the latest checkpoint
    qmor train --resume --output runs/NAME --max-steps 500   # train a finished or stopped run further
    accelerate launch -m qmor train ...            # data parallel on several GPUs
"""

from __future__ import annotations

import argparse
import os
import sys

# steps of different lengths leave blocks of odd sizes in the CUDA cache; growable segments reuse them, so reserved
# memory stays near what is in use (read when CUDA starts, so before anything touches it; a user's value wins)
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from qmor.commands import USER_ERRORS, fail  # noqa: E402
from qmor.commands.options import add_flags, parse  # noqa: E402
from qmor.errors import QmorError  # noqa: E402
from qmor.flags import FLAGS, by_key, nest_config, set_field  # noqa: E402
from qmor.training.config import TrainConfig, adapter_for, from_json, read_config_file  # noqa: E402


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    # no abbreviations: with aliases, a mistyped prefix (--learning-rat) would quietly pick a flag
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--config", help="YAML or JSON file with TrainConfig keys (a run's config.json works too) or flat "
                   "keys named like the flags (learning_rate, lora_r, cutoff_len, ...)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its latest intact "
                   "checkpoint, with its saved config; --max-steps or --epochs give it a new length (a finished run "
                   "too), other flags are ignored, with a warning naming them")
    add_flags(p, FLAGS)
    return p


def build_config(args: argparse.Namespace, under: dict | None = None):
    """Defaults, then `under` (nested TrainConfig keys), then the config file, then the flags given."""
    data = nest_config(read_config_file(args.config), args.config) if args.config else {}
    for key, value in (under or {}).items():
        mine = data.get(key, value)
        data[key] = {**value, **mine} if isinstance(value, dict) and isinstance(mine, dict) else mine
    given = vars(args)
    adapter = data.get("adapter")
    model = given.get("model", data.get("model", TrainConfig.model))
    written_for = adapter.get("family", adapter_for(model).family) if isinstance(adapter, dict) else None
    if written_for and given.get("family", written_for) != written_for:
        adapter.pop("options", None)  # the file's options are its own family's, not the one --family picks
    for flag in FLAGS:
        if flag.key not in given:
            continue
        for field in (flag.field, *flag.also):
            set_field(data, field, flag.to_config(given[flag.key]))
    return from_json(data)


# what --resume takes beside --output: a new length for the run
LENGTH = ("max_steps", "epochs")


def ignored_by_resume(args: argparse.Namespace) -> list[str]:
    """The flags given beside --resume (only flags given on the command line are in args: defaults are suppressed)."""
    flags = by_key()
    named = [f"--no-{flags[key].name[2:]}" if value is False else flags[key].name
             for key, value in vars(args).items() if key in flags and key not in ("output", *LENGTH)]
    return named + (["--config"] if args.config else [])


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    try:
        args = parse(parser(prog), sys.argv[1:] if argv is None else list(argv))
        # loaded when the command runs, so --help and bad options answer at once
        from qmor.training.loop import resume, train

        if args.resume:
            if "output" not in vars(args):
                raise QmorError("--resume needs --output: the run folder to continue")
            ignored = ignored_by_resume(args)
            if ignored:
                print(f"warning: --resume continues {args.output} with its saved config.json, so {', '.join(ignored)} "
                      "will not apply; start a new run (another --output) to change settings", file=sys.stderr)
            result = resume(args.output, **{key: vars(args)[key] for key in LENGTH if key in vars(args)})
        else:
            result = train(build_config(args))
    except USER_ERRORS as e:
        return fail(e)
    if result["stopped"]:
        return 128 + result["signal"]  # the shell's convention for "ended by this signal"
    return 0
