"""Writing outputs so that nothing is ever half-written: a temporary name first, a rename when complete."""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from qmor.errors import QmorError


def save_json(data: dict, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def load_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise QmorError(f"{path} does not exist; check the path")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise QmorError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix or regenerate the file") from None


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise QmorError(f"{path} already exists; choose another output folder or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
