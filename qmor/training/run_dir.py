"""A run folder: the name of every file and folder a training run writes, and what can be read back from them.

    runs/NAME/
      config.json            the resolved TrainConfig
      adapter/               the final adapter, written last
      checkpoints/step-NNNNNN/   resumable checkpoints (their inside: qmor/training/checkpoint.py)
      metrics.jsonl          one event a line (docs/architecture.md)
      loss.png               the loss plot
      loftq_report.json      per-layer quantisation errors (LoftQ init)
      train.log              the console output, when the app started the run
      exports.json           where the run was exported to (qmor export records each export here)
      eval.json, eval.md, eval.png   the report of `qmor eval`

Training, resume, checkpoints, the metrics log, export, chat and the app all find these files here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from qmor.adapters.attach import CONFIG as ADAPTER_META
from qmor.adapters.attach import meta_file
from qmor.errors import QmorError
from qmor.files import load_json, save_json
from qmor.model.base import Base, TrainedAdapter
from qmor.training.checkpoint import STATE, Damaged, check_checkpoint
from qmor.training.config import TrainConfig, from_json

STEP_NAME = re.compile(r"step-(\d{6,})")


class RunDir:
    CONFIG = "config.json"
    ADAPTER = "adapter"
    CHECKPOINTS = "checkpoints"
    METRICS = "metrics.jsonl"
    PLOT = "loss.png"
    LOFTQ_REPORT = "loftq_report.json"
    LOG = "train.log"
    TENSORBOARD = "tensorboard"  # event files, with --report-to tensorboard
    EXPORTS = "exports.json"  # {"exports": [{"path", "format", "time"}]}: what `qmor eval` compares with the adapter
    # what a run that failed before its first checkpoint leaves behind: such a folder is started afresh, not refused
    LEFTOVERS = frozenset({CONFIG, METRICS, PLOT, LOFTQ_REPORT, LOG, CHECKPOINTS, TENSORBOARD})

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    # ------------------------------------------------------------------------------------------------ the layout

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def adapter(self) -> Path:
        return self.path / self.ADAPTER

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def plot(self) -> Path:
        return self.path / self.PLOT

    @property
    def loftq_report(self) -> Path:
        return self.path / self.LOFTQ_REPORT

    @property
    def log(self) -> Path:
        return self.path / self.LOG

    @property
    def exports(self) -> Path:
        return self.path / self.EXPORTS

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:06d}"

    @staticmethod
    def step_of(checkpoint: Path) -> int:
        return int(STEP_NAME.fullmatch(checkpoint.name).group(1))

    # ------------------------------------------------------------------------------------------------ reading back

    def read_config(self) -> TrainConfig:
        return from_json(load_json(self.config))

    def read_events(self) -> list[dict]:
        """Every complete event of metrics.jsonl, in order (a line being written, or a damaged one, is skipped)."""
        if not self.metrics.is_file():
            return []
        events = []
        for line in self.metrics.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:  # the writer may be mid-line; the next read sees it whole
                continue
            if isinstance(event, dict):
                events.append(event)
        return events

    def final_adapter(self) -> Path | None:
        """adapter/ once training has written it (a folder holding a qmor adapter's metadata), else None."""
        return self.adapter if self.adapter.is_dir() and meta_file(self.adapter) is not None else None

    def finished_step(self) -> int | None:
        """The step a finished run ended at: adapter/ is written and its last `done` event is the last word (a run
        given more steps that was stopped, or failed, is not finished); else None."""
        if self.final_adapter() is None:
            return None
        ends = [e for e in self.read_events() if e.get("event") in ("start", "done", "stopped", "error")]
        return ends[-1].get("step") if ends and ends[-1]["event"] == "done" else None

    def recorded_exports(self) -> list[dict]:
        """The exports recorded in exports.json, newest last (an unreadable file counts as none)."""
        try:
            found = json.loads(self.exports.read_text()).get("exports", []) if self.exports.is_file() else []
        except (OSError, json.JSONDecodeError, AttributeError):
            return []
        return [e for e in found if isinstance(e, dict) and isinstance(e.get("path"), str)]

    def record_export(self, output: str | os.PathLike, fmt: str) -> None:
        """Remember an export of this run (its absolute path), replacing an earlier record of the same folder."""
        path = str(Path(output).resolve())
        kept = [e for e in self.recorded_exports() if e["path"] != path]
        save_json({"exports": [*kept, {"path": path, "format": fmt, "time": time.time()}]}, self.exports)

    # ------------------------------------------------------------------------------------------------ checkpoints

    def checkpoint_dirs(self) -> list[Path]:
        """Complete checkpoints, oldest first (the temporary folder of an interrupted save is not listed)."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.iterdir()
                 if p.is_dir() and STEP_NAME.fullmatch(p.name) and (p / STATE).is_file()]
        return sorted(found, key=self.step_of)

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoint_dirs()
        return found[-1] if found else None

    def resumable_checkpoint(self, say=lambda line: print(line, file=sys.stderr)) -> Path:
        """The newest checkpoint that reads back whole; damaged newer ones are named (through `say`) and passed over."""
        found = self.checkpoint_dirs()
        if not found and self.adapter.is_dir():
            raise QmorError(f"{self} has finished (adapter/ is written) and keeps no checkpoint to train further from; "
                            "start a new run with another --output (a run keeps its last step when --save-steps is "
                            "above 0)")
        if not found:
            raise QmorError(f"{self} has no checkpoint to resume from (it stopped before its first one); run the same "
                            "command again without --resume, which starts it afresh in the same folder")
        problems = []
        for path in reversed(found):
            try:
                check_checkpoint(path)
            except Damaged as e:
                problems.append(f"{path.name}: {e}")
                say(f"warning: checkpoint {path} is damaged ({e}); trying the one before it")
                continue
            if problems:
                say(f"resuming from {path.name}, the newest intact checkpoint")
            return path
        raise QmorError(f"every checkpoint of {self} is damaged ({'; '.join(problems)}); it cannot be resumed: start "
                        "a new run with another --output")

    def prune_checkpoints(self, step: int, keep: int) -> None:
        """After saving step `step`: keep the `keep` latest up to it, and none after it (those came after a damaged
        checkpoint that resume passed over, and have just been trained again)."""
        found = self.checkpoint_dirs()
        later = [p for p in found if self.step_of(p) > step]
        current = [p for p in found if self.step_of(p) <= step]
        for old in later + current[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------ a new run

    def check_fresh(self) -> bool:
        """Refuse a folder that holds a run or anything else; True when it holds only what a run that failed before
        its first checkpoint leaves behind (that run is started afresh, so no one has to delete files by hand)."""
        if not self.path.exists():
            return False
        if not self.path.is_dir():
            raise QmorError(f"output {self} is a file; choose a folder for --output")
        names = {p.name for p in self.path.iterdir()}
        if not names:
            return False
        if names - self.LEFTOVERS or self.checkpoint_dirs():
            raise QmorError(f"output folder {self} already holds a run; pass --resume to continue it or choose "
                            "another --output")
        return True

    def clear_failed(self) -> None:
        """Remove what a run that failed before its first checkpoint left, but train.log: the app's record of every
        attempt grows."""
        for name in self.LEFTOVERS - {self.LOG}:
            path = self.path / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def find_adapter(path: str | os.PathLike) -> Path:
    """The adapter in a run folder (runs/NAME, holding adapter/) or an adapter folder itself."""
    path = Path(path)
    found = RunDir(path).final_adapter() or (path if path.is_dir() and meta_file(path) is not None else None)
    if found is None:
        raise QmorError(f"{path} holds neither {ADAPTER_META} nor {RunDir.ADAPTER}/{ADAPTER_META}; pass a run folder "
                        "(runs/NAME) or its adapter folder")
    return found


def open_adapter(path: str | os.PathLike | TrainedAdapter, base: str | Base | None = None,
                 trust_remote_code: bool = False) -> TrainedAdapter:
    """A run folder's adapter, or an adapter folder, with its metadata and its base (`base` when given, else the one
    it records): what export, chat and eval resolve once where the user names them."""
    if isinstance(path, TrainedAdapter):
        return TrainedAdapter.of(path, base, trust_remote_code)
    return TrainedAdapter.open(find_adapter(path), base, trust_remote_code, source=path)
