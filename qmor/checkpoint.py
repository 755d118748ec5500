"""Resumable checkpoints: checkpoints/step-NNNNNN/ with the adapter, optimizer, scheduler, RNG and data position.

Each checkpoint is written into a temporary folder and renamed when complete, so a crash or a second Ctrl-C while
saving leaves the previous checkpoint as the latest. Only the adapter is saved: the frozen 4-bit base is rebuilt
from the model (and, after LoftQ, from its cached Q_T) on resume.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from qmor.attach import AdapterMeta, save_adapter
from qmor.errors import QmorError
from qmor.files import atomic_dir, load_json, save_json

FOLDER = "checkpoints"
NAME = re.compile(r"step-(\d{6,})")


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of an interrupted save are not listed)."""
    root = Path(run_dir) / FOLDER
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and NAME.fullmatch(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(NAME.fullmatch(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path:
    found = checkpoint_dirs(run_dir)
    if not found:
        raise QmorError(f"{run_dir} has no checkpoint to resume from; start a new run without --resume")
    return found[-1]


def rng_state() -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: str | Path, model: torch.nn.Module, meta: AdapterMeta, optimizer, scheduler, rng: list[dict],
    state: dict, keep: int,
) -> Path:
    """Write step-NNNNNN/ atomically (rng: one state per process) and delete all but the `keep` latest."""
    path = Path(run_dir) / FOLDER / f"step-{state['step']:06d}"
    with atomic_dir(path) as tmp:
        save_adapter(model, tmp / "adapter", meta)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng, tmp / "rng.pt")
        save_json(state, tmp / "state.json")
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: str | Path, optimizer, scheduler, rank: int = 0) -> dict:
    """Restore optimizer, scheduler and this process's RNG from a checkpoint; returns its state.json."""
    path = Path(path)
    # weights_only: a checkpoint folder may come from anywhere, and full unpickling would run its code
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    set_rng_state(rng[rank % len(rng)])
    return load_json(path / "state.json")
