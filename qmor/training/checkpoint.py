"""One resumable checkpoint folder: the adapter, optimizer, scheduler, RNG and data position of a step.

Each checkpoint is written into a temporary folder and renamed when complete, so a crash or a second Ctrl-C while
saving leaves the previous checkpoint as the latest. Only the adapter is saved: the frozen 4-bit base is rebuilt
from the model (and, after LoftQ, from its cached Q_T) on resume. Where checkpoints live in a run folder, and which
one a run resumes from: qmor/training/run_dir.py.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from qmor.adapters.attach import CONFIG, WEIGHTS, AdapterMeta, BadAdapterFile, read_adapter_state, save_adapter
from qmor.errors import QmorError
from qmor.files import atomic_dir, load_json, save_json

ADAPTER = "adapter"
STATE = "state.json"  # written last of all: a folder holding it is complete


class Damaged(QmorError):
    """A checkpoint file that cannot be read back whole (truncated, corrupted, missing)."""


def foreign(path: Path, what: str) -> QmorError:
    return QmorError(f"{path} is not a checkpoint qmor wrote: it holds {what}, which qmor never loads; if you did not "
                     f"put it there do not trust this run folder, else delete {path.parent} to resume from the "
                     "checkpoint before it")


def read_torch(path: Path):
    """torch.load with weights_only: a pickle that names anything but tensors and plain containers is refused."""
    if not path.is_file():
        raise Damaged(f"{path.name} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # an intact archive (every CRC right) that still asks for other objects was made so on purpose
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                intact = z.testzip() is None
            if intact:
                named = re.search(r"GLOBAL (\S+)", str(e))
                raise foreign(path, "pickled Python objects other than tensors"
                              + (f" ({named.group(1)})" if named else "")) from None
        raise Damaged(f"{path.name} is corrupted") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as e:
        raise Damaged(f"{path.name} cannot be read ({reason(e)})") from None


def reason(e: BaseException) -> str:
    """The first sentence of an error, short enough for a one-line message."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.split(". ")[0][:120]


def check_checkpoint(path: Path) -> None:
    """Read every file of a checkpoint back (raises Damaged, or QmorError for a file qmor did not write)."""
    for name in (STATE, f"{ADAPTER}/{CONFIG}"):
        try:
            load_json(path / name)
        except QmorError:
            raise Damaged(f"{name} is missing or not valid JSON") from None
    try:
        read_adapter_state(path / ADAPTER)
    except BadAdapterFile as e:  # nan or inf included: resuming from it would diverge at once
        raise Damaged(f"{ADAPTER}/{WEIGHTS} {e.problem}") from None
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        read_torch(path / name)


def rng_state() -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, model: torch.nn.Module, meta: AdapterMeta, optimizer, scheduler, rng: list[dict],
                    state: dict, adapter: dict | None = None, optimizer_state: dict | None = None) -> Path:
    """Write the checkpoint folder `path` atomically (rng: one state per process; `adapter`, `optimizer_state`:
    gathered already, from FSDP shards)."""
    with atomic_dir(path) as tmp:
        save_adapter(model, tmp / ADAPTER, meta, adapter)
        torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng, tmp / "rng.pt")
        save_json(state, tmp / STATE)
    return path


def load_checkpoint(path: str | Path, optimizer, scheduler, rank: int = 0) -> dict:
    """Restore optimizer, scheduler and this process's RNG from a checkpoint; returns its state.json."""
    path = Path(path)
    # weights_only: a checkpoint folder may come from anywhere, and full unpickling would run its code
    optimizer.load_state_dict(read_torch(path / "optimizer.pt"))
    scheduler.load_state_dict(read_torch(path / "scheduler.pt"))
    rng = read_torch(path / "rng.pt")
    set_rng_state(rng[rank % len(rng)])
    return load_json(path / STATE)
