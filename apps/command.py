"""Form values -> the exact `scripts/finetune_4bit.py` command line, so the app trains through the CLI's code."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from apps.paths import Workspace, dataset_arg, model_arg, run_dir
from qmor.adapters import ADAPTERS, option_fields

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "scripts" / "finetune_4bit.py"
EXPORT_SCRIPT = ROOT / "scripts" / "export_fp16.py"

FAMILIES = tuple(ADAPTERS)
# which family-specific fields each family shows and passes (alpha where it scales, then its options, as each
# family declares them); everything else is common
FAMILY_FIELDS = {name: ("alpha",) * spec.scaled + tuple(f.key for f in option_fields() if f.family == name)
                 for name, spec in ADAPTERS.items()}
SPECIFIC = sorted({f for fs in FAMILY_FIELDS.values() for f in fs})

# (form key, flag); a value of None or "" is left out (the script's default applies)
VALUE_FLAGS = [
    ("format", "--format"), ("family", "--family"), ("rank", "--rank"), ("alpha", "--alpha"),
    ("dropout", "--dropout"), ("targets", "--targets"), ("mora_kind", "--mora-kind"), ("experts", "--experts"),
    ("top_k", "--top-k"), ("capacity_factor", "--capacity-factor"), ("expert_dropout", "--expert-dropout"),
    ("aux_loss_weight", "--aux-loss-weight"), ("init", "--init"), ("loftq_iters", "--loftq-iters"), ("lr", "--lr"),
    ("epochs", "--epochs"), ("max_steps", "--max-steps"), ("batch_size", "--batch-size"),
    ("grad_accum", "--grad-accum"), ("max_len", "--max-len"), ("warmup_ratio", "--warmup-ratio"),
    ("weight_decay", "--weight-decay"), ("max_grad_norm", "--max-grad-norm"), ("val_size", "--val-size"),
    ("eval_steps", "--eval-steps"), ("save_steps", "--save-steps"), ("log_steps", "--log-steps"),
    ("num_examples", "--num-examples"), ("seed", "--seed"), ("loss_chunk", "--loss-chunk"), ("device", "--device"),
    ("eval_generate", "--eval-generate"), ("keep_checkpoints", "--keep-checkpoints"),
]
INTS = {"rank", "experts", "top_k", "max_steps", "batch_size", "grad_accum", "max_len", "eval_steps", "save_steps",
        "log_steps", "num_examples", "seed", "loss_chunk", "loftq_iters", "eval_generate", "keep_checkpoints"}
SWITCHES = [("packing", "--packing"), ("train_on_prompt", "--train-on-prompt"),
            ("offload_activations", "--offload-activations"), ("trust_remote_code", "--trust-remote-code")]


def _fmt(v) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1:
        return str(int(v))
    return str(v)


def train_args(ws: Workspace, values: dict) -> list[str]:
    """Arguments after the script name; validates model, dataset and run name (raises QmorError)."""
    family = values.get("family") or "lora"
    out = run_dir(ws, values.get("run_name", ""))
    args = ["--model", model_arg(ws, values.get("model", "")), "--dataset", dataset_arg(ws, values.get("dataset", "")),
            "--output", short_path(str(out))]
    own = FAMILY_FIELDS.get(family, ())
    for key, flag in VALUE_FLAGS:
        v = values.get(key)
        if key in SPECIFIC and key not in own:
            continue
        if key == "loftq_iters" and values.get("init") != "loftq":
            continue
        if v is None or v == "":
            continue
        if isinstance(v, float) and key in INTS:
            v = int(v)
        args += [flag, _fmt(v)]
    if values.get("gradient_checkpointing") is False:
        args.append("--no-gradient-checkpointing")
    args += [flag for key, flag in SWITCHES if values.get(key)]
    return args


def train_command(args: list[str]) -> list[str]:
    return [sys.executable, str(TRAIN_SCRIPT), *args]


def resume_command(run: Path) -> list[str]:
    return [sys.executable, str(TRAIN_SCRIPT), "--resume", "--output", short_path(str(run))]


def export_command(run: Path, out: Path, dtype: str, overwrite: bool) -> list[str]:
    cmd = [sys.executable, str(EXPORT_SCRIPT), short_path(str(run)), "--output", short_path(str(out)), "--dtype", dtype]
    return cmd + (["--overwrite"] if overwrite else [])


def short_path(text: str) -> str:
    """A path below the folder the app runs in, written relative to it (shorter, and what a user would type)."""
    cwd = Path.cwd()
    if text.startswith(str(cwd) + "/"):
        return str(Path(text).relative_to(cwd))
    return text


def shown(cmd: list[str]) -> str:
    """The command as a user would type it from the project folder."""
    rest = [str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT) + "/") and c.endswith(".py") else short_path(c)
            for c in cmd[1:]]
    return shlex.join(["python", *rest])
