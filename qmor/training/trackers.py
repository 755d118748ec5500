"""Experiment trackers (`--report-to tensorboard,wandb,trackio,mlflow`) through accelerate's: each gets the run's
config as hyperparameters and every number metrics.jsonl gets, as `event/name` at the event's step (train/loss,
eval/eval_loss, done/peak_memory_bytes, ...). metrics.jsonl stays the record; a tracker is a view of it."""

from __future__ import annotations

import importlib.util
import os
import sys

from qmor.errors import QmorError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}


def chosen(report_to: str) -> list[str]:
    return [n.strip() for n in report_to.split(",") if n.strip() not in ("", "none")]


def check_installed(report_to: str) -> None:
    """Before anything loads: a tracker whose package is missing is one line naming the install."""
    for name in chosen(report_to):
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise QmorError(f"--report-to {name} needs the {PACKAGES[name]} package: pip install {PACKAGES[name]} "
                            f"(or leave {name} out of --report-to)")


def start(accelerator, report_to: str, run_dir, config: dict) -> bool:
    """Start the chosen trackers on the main process; False when there are none."""
    names = chosen(report_to)
    if not names:
        return False
    # the Accelerator is made before the run folder is named (its processes agree on the name through it), so the
    # trackers come here, made with their folder, rather than through Accelerator(log_with=...)
    accelerator.log_with = [_make(name, run_dir) for name in names]
    accelerator.init_trackers("qmor", config=flat(config))
    return True


def _make(name: str, run_dir):
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    tracker = LOGGER_TYPE_TO_CLASS[name]
    if name == "tensorboard":
        return tracker(run_dir.TENSORBOARD, run_dir.path)  # event files in runs/NAME/tensorboard/
    if name == "wandb":
        return tracker(os.environ.get("WANDB_PROJECT", "qmor"), name=run_dir.name)
    if name == "mlflow":
        return tracker("qmor", run_name=run_dir.name)  # MLFLOW_EXPERIMENT_NAME, when set, names the experiment
    return tracker("qmor")


def log(accelerator, record: dict) -> bool:
    """One metrics.jsonl record to the trackers; False (after one warning) when a tracker fails, which ends the
    tracking but not the run: metrics.jsonl has every figure."""
    values = {f"{record['event']}/{k}": v for k, v in record.items()
              if k not in ("time", "event", "step") and isinstance(v, int | float) and not isinstance(v, bool)}
    if not values:
        return True
    try:
        accelerator.log(values, step=record.get("step"))
    except Exception as e:  # a tracker's service or disk failing must not end hours of training
        print(f"warning: experiment tracking stopped ({type(e).__name__}: {e}); metrics.jsonl keeps every figure",
              file=sys.stderr)
        return False
    return True


def finish(accelerator) -> None:
    for tracker in accelerator.trackers:  # accelerator.end_training would also end the process group
        tracker.finish()


def flat(config: dict, prefix: str = "") -> dict:
    """A nested config as flat `section.key` hyperparameters of the types trackers take (lists and None as text)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value if isinstance(value, bool | int | float | str) else str(value)
    return out
