"""Fine-tune an adapter on a 4-bit NF4 base.

With no arguments: the built-in default. A tiny Llama-style model built in code memorises random UUID pairs (the
MoRA paper's task) with a MoRA adapter on a LoftQ-initialised 4-bit base; offline, a couple of minutes on a CPU.

    python scripts/finetune_4bit.py
    python scripts/finetune_4bit.py --model meta-llama/Llama-2-7b-hf --dataset data.jsonl --family lora --rank 16
    python scripts/finetune_4bit.py --config run.yaml --lr 1e-4        # flags override the config file
    python scripts/finetune_4bit.py --resume --output runs/NAME         # continue from the latest checkpoint
    accelerate launch scripts/finetune_4bit.py ...                      # data parallel on several GPUs
"""

from __future__ import annotations

import argparse
import os
import sys

# steps of different lengths leave blocks of odd sizes in the CUDA cache; growable segments reuse them, so reserved
# memory stays near what is in use (read when CUDA starts, so before anything touches it; a user's value wins)
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from qmor.errors import QmorError  # noqa: E402

# flag -> (section of TrainConfig or None for top level, field, type); help text comes from the field's default
FLAGS = {
    "--model": (None, "model", str, "tiny or smollm2 (built-in), a local Hugging Face folder, or a hub id"),
    "--dataset": ("data", "source", str, "built-in task (uuid, reverse, sort, add, upper, mix), a .jsonl/.json/"
                  ".parquet/.csv file, a datasets folder or a Hub dataset id"),
    "--format": ("data", "format", str, "auto | alpaca | messages | sharegpt | prompt_completion | text"),
    "--split": ("data", "split", str, "split to train on; slices work for files and Hub ids (train[:1000])"),
    "--subset": ("data", "subset", str, "a Hub dataset's configuration (load_dataset's name)"),
    "--columns": ("data", "columns", str, "map the dataset's columns onto qmor's fields: prompt=question,"
                  "completion=answer"),
    "--output": (None, "output", str, "run folder (default runs/<timestamp>)"),
    "--family": ("adapter", "family", str, "lora | moslora | mora | mor | sira"),
    "--rank": ("adapter", "r", int, "adapter rank (MoRA: the LoRA rank whose parameter count it matches)"),
    "--alpha": ("adapter", "alpha", float, "scale alpha / rank (not used by MoRA)"),
    "--dropout": ("adapter", "dropout", float, "dropout on the adapter input"),
    "--targets": ("adapter", "targets", str, "all-linear | comma list of name suffixes (q_proj,v_proj) | regex"),
    "--mora-kind": ("adapter", "mora_kind", str, "MoRA operators: auto | rope | sharing"),
    "--experts": ("adapter", "experts", int, "MoR / SiRA: number of experts"),
    "--top-k": ("adapter", "top_k", int, "SiRA: experts per token"),
    "--capacity-factor": ("adapter", "capacity_factor", float, "SiRA: expert capacity factor"),
    "--expert-dropout": ("adapter", "expert_dropout", float, "SiRA: dropout on the gate weights"),
    "--aux-loss-weight": ("adapter", "aux_loss_weight", float, "SiRA: weight of the load-balancing loss"),
    "--init": ("adapter", "init", str, "loftq | default"),
    "--loftq-iters": ("adapter", "loftq_iters", int, "LoftQ alternations T"),
    "--lr": (None, "lr", float, "peak learning rate (linear warmup, cosine decay)"),
    "--epochs": (None, "epochs", float, "passes over the data, used when --max-steps is 0"),
    "--max-steps": (None, "max_steps", int, "optimizer steps (0: from --epochs)"),
    "--batch-size": (None, "batch_size", int, "sequences per micro-batch per process"),
    "--grad-accum": (None, "grad_accum", int, "micro-batches per optimizer step"),
    "--max-len": ("data", "max_len", int, "tokens per sequence; longer examples are truncated (and counted), a "
                  "data set with no example that fits is refused"),
    "--warmup-ratio": (None, "warmup_ratio", float, "share of steps with linear warmup"),
    "--weight-decay": (None, "weight_decay", float, "AdamW weight decay"),
    "--max-grad-norm": (None, "max_grad_norm", float, "gradient clipping norm (0: off)"),
    "--val-size": ("data", "val_size", float, "validation split: fraction (<1) or count"),
    "--eval-steps": (None, "eval_steps", int, "eval loss every N steps (0: at the end only)"),
    "--save-steps": (None, "save_steps", int, "checkpoint every N steps (0: only when stopped)"),
    "--keep-checkpoints": (None, "keep_checkpoints", int, "how many checkpoints to keep"),
    "--log-steps": (None, "log_steps", int, "log the averaged loss every N steps"),
    "--eval-generate": (None, "eval_generate", int, "built-in tasks: score greedy answers on N examples at the end"),
    "--num-examples": ("data", "num_examples", int, "built-in tasks: number of records (0: task default)"),
    "--seed": (None, "seed", int, "seed of the tiny model, data order, dropout and built-in records"),
    "--loss-chunk": (None, "loss_chunk", int, "tokens per cross-entropy chunk (full logits never exist)"),
    "--device": (None, "device", str, "auto | cpu | cuda | cuda:N"),
    "--quant-storage": ("quant", "storage", str, "container dtype of the 4-bit codes: uint8, or bfloat16 for FSDP"),
}
# on/off switches: flag -> (section, field, help); --no-X turns each off again
SWITCHES = {
    "--packing": ("data", "packing", "pack several examples into each sequence"),
    "--train-on-prompt": ("data", "train_on_prompt", "also compute the loss on prompt tokens"),
    "--skip-bad": ("data", "skip_bad", "skip malformed records (counted) instead of stopping"),
    "--offload-activations": (None, "offload_activations", "keep checkpointed activations in CPU RAM"),
    "--trust-remote-code": (None, "trust_remote_code", "run model code from the hub (only for trusted models)"),
}


def default_of(defaults, section: str | None, name: str):
    return getattr(getattr(defaults, section) if section else defaults, name)


def parser() -> argparse.ArgumentParser:
    from qmor.train_config import TrainConfig

    defaults = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML or JSON file with TrainConfig keys (a run's config.json works too)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its latest intact "
                   "checkpoint, with its saved config (other flags are ignored, with a warning naming them)")
    for flag, (section, name, kind, text) in FLAGS.items():
        p.add_argument(flag, type=kind, default=argparse.SUPPRESS,
                       help=f"{text} (default: {default_of(defaults, section, name)})")
    for flag, (section, name, text) in SWITCHES.items():
        p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                       help=f"{text} (default: {default_of(defaults, section, name)})")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                   default=argparse.SUPPRESS, help="keep every activation (faster, much more memory)")
    return p


def parse_targets(text: str) -> str | list[str]:
    """all-linear, a comma list of name suffixes, a single plain name, or else a regex."""
    if text == "all-linear":
        return text
    if "," in text:
        return [t.strip() for t in text.split(",") if t.strip()]
    return [text] if text.replace("_", "").replace(".", "").isalnum() else text


def build_config(args: argparse.Namespace):
    """Defaults, then the config file, then the flags given on the command line."""
    from qmor.train_config import from_json, read_config_file

    data = read_config_file(args.config) if args.config else {}
    given = vars(args)
    table = {**{f: v[:2] for f, v in FLAGS.items()}, **{f: v[:2] for f, v in SWITCHES.items()},
             "--no-gradient-checkpointing": (None, "gradient_checkpointing")}
    for flag, (section, name) in table.items():
        dest = "gradient_checkpointing" if flag == "--no-gradient-checkpointing" else flag[2:].replace("-", "_")
        if dest not in given:
            continue
        value = parse_targets(given[dest]) if name == "targets" else given[dest]
        if section:
            data.setdefault(section, {})[name] = value
        else:
            data[name] = value
    if "seed" in given:  # one seed for everything, the built-in task's records included
        data.setdefault("data", {})["seed"] = given["seed"]
    return from_json(data)


def ignored_by_resume(args: argparse.Namespace) -> list[str]:
    """The flags given beside --resume (only flags given on the command line are in args: defaults are suppressed)."""
    flags = {flag[2:].replace("-", "_"): flag for flag in [*FLAGS, *SWITCHES]}
    flags["gradient_checkpointing"] = "--no-gradient-checkpointing"
    given = [flags[k] if flag_on is not False or k == "gradient_checkpointing" else f"--no-{flags[k][2:]}"
             for k, flag_on in vars(args).items() if k in flags and k != "output"]
    return given + (["--config"] if args.config else [])


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        from qmor.train import train
        from qmor.train_config import TrainConfig

        if args.resume:
            if "output" not in vars(args):
                raise QmorError("--resume needs --output: the run folder to continue")
            ignored = ignored_by_resume(args)
            if ignored:
                print(f"warning: --resume continues {args.output} with its saved config.json, so {', '.join(ignored)} "
                      "will not apply; start a new run (another --output) to change settings", file=sys.stderr)
            cfg = TrainConfig(output=args.output)
        else:
            cfg = build_config(args)
        result = train(cfg, resume=args.resume)
    except QmorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a folder that cannot be written: the system's reason, in one line
        from qmor.files import describe_os_error

        print(f"error: {describe_os_error(e) or e}", file=sys.stderr)
        return 2
    if result["stopped"]:
        return 128 + result["signal"]  # the shell's convention for "ended by this signal"
    return 0


if __name__ == "__main__":
    sys.exit(main())
