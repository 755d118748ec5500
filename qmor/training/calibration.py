"""The calibration text of `--init calibrated`: token id sequences the init runs through the model.

By default the first `calibration_samples` training sequences (after the validation split, so the held-out
examples stay unseen); with `--calibration FILE`, the first ones of that file, read by the same pipeline as the
training data (its format, template and max_len).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from qmor.data.pipeline import read_examples
from qmor.errors import QmorError
from qmor.training.config import TrainConfig


def calibration_ids(cfg: TrainConfig, train_set: list[dict], tokenizer) -> list[torch.Tensor]:
    n = cfg.adapter.calibration_samples
    if cfg.calibration:
        examples = read_examples(tokenizer, replace(cfg.data, source=cfg.calibration, split="train")).examples
        rows = [e["input_ids"][: cfg.data.max_len or None] for e in examples[:n]]
    else:
        rows = [e["input_ids"] for e in train_set[:n]]
    rows = [torch.as_tensor(r, dtype=torch.long) for r in rows if len(r)]
    if not rows:
        raise QmorError(f"no calibration text in {cfg.calibration or cfg.data.source}; pass --calibration FILE with "
                        "some records, or --init loftq")
    return rows
