"""Form values -> the exact `qmor train` command line (run as `python -m qmor train`), so the app trains through the
CLI's code; the flags come from the table in qmor/flags.py."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from apps.paths import Workspace, dataset_arg, model_arg, run_dir
from qmor import hints
from qmor.errors import QmorError
from qmor.flags import FLAGS, by_key

QMOR = [sys.executable, "-m", "qmor"]  # a job's command line up to the subcommand (its tree: jobs.start)

# model and dataset come first, checked against the workspace; the run name becomes --output
HEAD = {"model": model_arg, "dataset": dataset_arg}


def _fmt(v) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1:
        return str(int(v))
    return str(v)


def train_args(ws: Workspace, values: dict) -> list[str]:
    """Arguments after the script name, one flag per form value that applies (validates model, dataset and run
    name: raises QmorError). A value of None or "" is left out (the script's default applies), as is a switch at
    its default and an option the chosen family or init does not use."""
    args = []
    for key, check in HEAD.items():
        args += [by_key()[key].name, check(ws, values.get(key, ""))]
    args += ["--output", short_path(str(run_dir(ws, values.get("run_name", ""))))]
    for flag in FLAGS:
        v = values.get(flag.key)
        if flag.key in HEAD or not flag.in_app or v is None or v == "" or not flag.applies(values):
            continue
        if flag.switch:
            if bool(v) != flag.default:
                args.append(flag.name if v else f"--no-{flag.name[2:]}")
            continue
        value = _whole(flag, v) if flag.kind is int else _number(flag, v) if flag.kind is float else v
        args += [flag.name, _fmt(value)]
    return args


def _number(flag, v) -> float:
    """A form value as a number: an option the run decides is typed in a text box, so it may arrive as text."""
    try:
        return float(v)
    except ValueError:
        raise QmorError(f"{flag.label} must be a number or empty (auto), got {v!r}") from None


def _whole(flag, v) -> int:
    number = _number(flag, v)
    if number != int(number):  # cutting 8.5 to 8 would train something else than asked
        raise QmorError(f"{flag.label} must be a whole number, got {v}")
    return int(number)


def train_command(args: list[str]) -> list[str]:
    return [*QMOR, "train", *args]


def resume_command(run: Path) -> list[str]:
    return [*QMOR, "train", "--resume", "--output", short_path(str(run))]


def export_command(run: Path, out: Path, flags: list[str], overwrite: bool) -> list[str]:
    """The export of a run; `flags` choose the format and its weights (`--format gguf --gguf-type q8_0`)."""
    cmd = [*QMOR, "export", short_path(str(run)), "--output", short_path(str(out)), *flags]
    return cmd + (["--overwrite"] if overwrite else [])


def eval_command() -> list[str]:
    """The evaluation command, to which the runs and options are added."""
    return [*QMOR, "eval"]


def short_path(text: str) -> str:
    """A path below the folder the app runs in, written relative to it (shorter, and what a user would type)."""
    cwd = Path.cwd()
    if text.startswith(str(cwd) + "/"):
        return str(Path(text).relative_to(cwd))
    return text


def shown(cmd: list[str]) -> str:
    """The command as a user would type it in the folder the app runs in: `qmor ...` for qmor's own commands, any
    other script as it is run."""
    if cmd[: len(QMOR)] == QMOR:
        return hints.command(*map(short_path, cmd[len(QMOR):]))
    return shlex.join(["python", *map(short_path, cmd[1:])])
