"""The run's metrics.jsonl (one JSON object per line, polled by the app) and its loss plot."""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path

from qmor.training.run_dir import RunDir


class MetricsLog:
    """Appends events to metrics.jsonl and redraws loss.png at most every `plot_every_s` seconds."""

    def __init__(self, run: str | os.PathLike, plot_every_s: float = 10.0):
        self.run = RunDir(run)
        self.plot_every_s = plot_every_s
        self.last_plot = 0.0
        self.train: list[tuple[int, float]] = []  # (step, loss) of this run so far, including before a resume
        self.eval: list[tuple[int, float]] = []  # (step, eval loss)
        for event in self.run.read_events():
            self._remember(event)

    def _remember(self, event: dict) -> None:
        if event.get("event") == "train" and isinstance(event.get("loss"), int | float):
            self.train.append((event["step"], event["loss"]))
        elif event.get("event") == "eval" and isinstance(event.get("eval_loss"), int | float):
            self.eval.append((event["step"], event["eval_loss"]))

    def forget_after(self, step: int) -> None:
        """On resume: steps after the checkpoint are trained again, so their old points leave the plot."""
        self.train = [p for p in self.train if p[0] <= step]
        self.eval = [p for p in self.eval if p[0] <= step]

    def log(self, event: str, **fields) -> dict:
        record = {"time": time.time(), "event": event, **{k: finite(v) for k, v in fields.items()}}
        with open(self.run.metrics, "a") as f:  # one write per line, flushed: a reader never sees half an object
            f.write(json.dumps(record, allow_nan=False) + "\n")
        self._remember(record)
        if event in ("eval", "done", "stopped") or time.time() - self.last_plot > self.plot_every_s:
            self.plot()
        return record

    def plot(self) -> None:
        if not self.train and not self.eval:
            return
        plot_loss(self.train, self.eval, self.run.plot)
        self.last_plot = time.time()


def finite(value):
    """nan and infinity become null: JSON has no such numbers, and readers other than Python's refuse them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def plot_loss(train: list[tuple[int, float]], evals: list[tuple[int, float]], path: str | Path) -> None:
    """Training (and eval) loss against step, written under a temporary name and renamed."""
    import matplotlib

    matplotlib.use("Agg")  # no display: runs in scripts, on servers and in the app's subprocess
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
