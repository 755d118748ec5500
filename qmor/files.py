"""Writing outputs so that nothing is ever half-written: a temporary name first, a rename when complete."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
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


def save_text(text: str, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def load_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise QmorError(f"{path} does not exist; check the path")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise QmorError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix or regenerate the file") from None


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NO_ACCESS = (errno.EACCES, errno.EPERM, errno.EROFS)


def error_number(e: BaseException, folder: Path | None = None) -> int | None:
    """The system error behind a failed write: OSError's errno, the "(os error N)" of safetensors' errors, or, for
    torch.save's bare "unexpected pos" on a full disk, no free space left in `folder`."""
    if isinstance(e, OSError) and e.errno:
        return e.errno
    found = re.search(r"os error (\d+)", str(e))
    if found:
        return int(found.group(1))
    if folder is not None:
        with contextlib.suppress(OSError):
            if shutil.disk_usage(folder).free < 1 << 20:
                return errno.ENOSPC
    return None


def describe_os_error(e: BaseException, target: str | Path | None = None, folder: Path | None = None) -> str | None:
    """One line naming what could not be written and how to fix it; None if `e` is no system error."""
    number = error_number(e, folder)
    if number is None:
        return None
    where = getattr(e, "filename", None) or target or "the output"
    if number in NO_SPACE:
        return f"no space left on the device to write {where}; free some space or write to another disk"
    if number in NO_ACCESS:
        return f"{os.strerror(number).lower()}: {where}; choose a folder you can write to, or fix its permissions"
    return f"{where}: {os.strerror(number)}; check the path and the disk"


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces `path`, on failure it is removed (and a
    full disk or a folder that cannot be written becomes one QmorError line)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise QmorError(f"{path} already exists; choose another output folder or pass --overwrite")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise QmorError(describe_os_error(e, path) or str(e)) from None
    try:
        yield tmp
    except BaseException as e:
        # Ctrl-C and the user errors pass through as they are
        line = describe_os_error(e, path, tmp) if isinstance(e, Exception) and not isinstance(e, QmorError) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if line is not None:
            raise QmorError(line) from None
        raise
    old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
    try:
        if path.exists():
            path.rename(old)
        tmp.rename(path)
    except OSError as e:
        if old.exists() and not path.exists():
            old.rename(path)  # the previous output stays as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise QmorError(describe_os_error(e, path) or str(e)) from None
    shutil.rmtree(old, ignore_errors=True)
