"""A base model's fingerprint, recorded with every adapter and compared wherever the adapter meets a base again.

An adapter on another base runs without any error and answers in garbage, so chat, export and resume compare the
base they were given with the one the adapter was trained on. The fingerprint is read from the safetensors files
alone (never the model in memory, whose 4-bit codes depend on the device): the architecture, the name and shape
of every matrix, and a hash of a fixed sample of each matrix's values (a few rows, a few columns: kilobytes, not
gigabytes). A copy of the same files anywhere (moved, re-downloaded) matches; another model does not, even one of
the same architecture and size.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch
from safetensors import safe_open

from qmor.errors import QmorError
from qmor.files import load_json
from qmor.model.files import local_folder, weight_files

ROWS = 4  # rows sampled per matrix, evenly spaced from the first to the last
COLS = 64  # leading columns of each sampled row


def base_fingerprint(model_path: str) -> dict:
    """{"architecture", "matrices", "shapes", "weights"} of a local folder or cached hub model (QmorError if its
    weights cannot be read: not downloaded, or no safetensors)."""
    folder = local_folder(model_path)
    return fingerprint_of(folder, weight_files(folder))


def fingerprint_of(folder: Path, names: dict[str, Path]) -> dict:
    """The fingerprint of the model in `folder`, whose tensors are in the files `names` maps them to."""
    # chat compares on every adapter switch: the same files (same sizes and times) are read once
    stamp = tuple(sorted((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in set(names.values())))
    return dict(_fingerprint(folder, tuple(sorted(names.items())), stamp))


@functools.lru_cache(maxsize=8)
def _fingerprint(folder: Path, names: tuple[tuple[str, Path], ...], stamp: tuple) -> tuple:
    config = load_json(folder / "config.json")
    by_file: dict[Path, list[str]] = {}
    for name, file in names:
        by_file.setdefault(file, []).append(name)
    sampled: dict[str, tuple[bytes, bytes]] = {}  # matrix name -> (its name and shape, its sampled values)
    for file, keys in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for key in keys:
                part = f.get_slice(key)
                shape = part.get_shape()
                if len(shape) != 2:  # norms and biases: the matrices are what adapters attach to
                    continue
                rows = sorted({i * (shape[0] - 1) // (ROWS - 1) for i in range(ROWS)})
                sampled[key] = (f"{key}:{shape};".encode(), b"".join(_bytes(part[r : r + 1, :COLS]) for r in rows))
    if not sampled:
        raise QmorError(f"{folder} holds no weight matrices to fingerprint")
    shapes, weights = hashlib.sha256(), hashlib.sha256()
    for key in sorted(sampled):  # a fixed order, whatever the sharding
        shapes.update(sampled[key][0])
        weights.update(b"".join(sampled[key]))
    arch = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
    return (("architecture", arch), ("matrices", len(sampled)), ("shapes", shapes.hexdigest()[:16]),
            ("weights", weights.hexdigest()[:16]))


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
