"""Where the app may read and write: user-entered paths are resolved, then checked against the workspace.

The restriction is on whenever the app is reachable from other machines (a host other than loopback, or a share
link), because then a form field is a way for a stranger to read or overwrite files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from qmor.adapters.attach import meta_file
from qmor.data import tasks
from qmor.data.sources import is_hub_id as is_hub_dataset
from qmor.errors import QmorError
from qmor.model.files import is_builtin, is_hub_id
from qmor.training.run_dir import RunDir

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class Workspace:
    root: Path  # resolved; runs/, data/ and exports/ live below it
    restrict: bool  # refuse every user-entered path outside root

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def cache(self) -> Path | None:
        """qmor's cache (built-in models, LoftQ bases, tokenised data) when paths are confined, since every run refers
        to its files; None: the user's own (~/.cache/qmor or $QMOR_CACHE)."""
        return self.root / "qmor-cache" if self.restrict else None

    @property
    def exports(self) -> Path:
        return self.root / "exports"


def make_workspace(root: str | Path, restrict: bool) -> Workspace:
    ws = Workspace(Path(root).expanduser().resolve(), restrict)
    for d in (ws.root, ws.runs, ws.data, ws.exports):
        d.mkdir(parents=True, exist_ok=True)
    return ws


def inside(ws: Workspace, path: Path) -> bool:
    return path == ws.root or ws.root in path.parents


def user_path(ws: Workspace, text: str, what: str = "path") -> Path:
    """Resolve a path typed by the user; relative paths are relative to the workspace."""
    text = (text or "").strip()
    if not text:
        raise QmorError(f"the {what} is empty; enter a path")
    p = Path(text).expanduser()
    p = (p if p.is_absolute() else ws.root / p).resolve()  # resolve() follows symlinks, so a link out is caught
    if ws.restrict and not inside(ws, p):
        raise QmorError(f"the {what} {text!r} is outside the workspace {ws.root}; put the file below it")
    return p


def check_name(text: str, what: str = "name") -> str:
    """A run or export name: one folder name, no separators, so it can never climb out of its parent."""
    text = (text or "").strip()
    if not NAME_RE.match(text):
        raise QmorError(f"the {what} {text!r} is not valid; use letters, digits, '.', '_' or '-' (no slashes)")
    return text


def confined(ws: Workspace, path: Path, what: str) -> Path:
    """`path` itself, after checking that it (links followed) stays in the workspace when paths are restricted."""
    if ws.restrict and not inside(ws, path.resolve()):
        raise QmorError(f"the {what} {path} leads outside the workspace {ws.root} (through a link); only runs, models "
                        "and data below the workspace can be used here")
    return path


def run_dir(ws: Workspace, name: str) -> Path:
    return confined(ws, ws.runs / check_name(name, "run name"), "run")


def run_meta_file(run: Path) -> Path | None:
    try:
        return meta_file(RunDir(run).adapter)
    except QmorError:
        return None


def adapter_config(run: Path) -> dict:
    try:
        file = run_meta_file(run)
        return json.loads(file.read_text()) if file else {}
    except (OSError, json.JSONDecodeError):
        return {}


def check_run_sources(ws: Workspace, run: Path) -> None:
    """Every path a run's adapter refers to (its base model folder, its LoftQ base weights) stays in the workspace
    when paths are restricted; a hub id is no path and passes."""
    meta = adapter_config(run)
    base = meta.get("base_model") or ""
    if base and (base.startswith(("/", ".", "~")) or Path(base).exists()):
        confined(ws, Path(base).expanduser(), f"base model of run {run.name}")
    if meta.get("base_weights"):
        confined(ws, Path(meta["base_weights"]).expanduser(), f"LoftQ base weights of run {run.name}")


BUILTIN_DATASETS = tasks.NAMES


def model_arg(ws: Workspace, text: str) -> str:
    """The --model value: a built-in name (tiny, smollm2), a hub id, or a local folder (checked against the
    workspace)."""
    text = (text or "").strip()
    if is_builtin(text):
        return text
    local = Path(text).expanduser()
    local = local if local.is_absolute() else ws.root / local
    if is_hub_id(text) and not local.exists():
        return text
    path = user_path(ws, text, "model folder")
    if not (path / "config.json").is_file():
        raise QmorError(f"{text!r} is neither a hub id (org/name) nor a model folder with a config.json")
    return str(path)


def dataset_arg(ws: Workspace, text: str) -> str:
    """The --dataset value: a built-in name, a Hub dataset id (org/name, read from the Hugging Face cache as the
    CLI reads it), or an existing file/folder (checked against the workspace)."""
    text = (text or "").strip()
    if text in BUILTIN_DATASETS:
        return text
    parts = text.split("/")
    if is_hub_id(text) and is_hub_dataset(text) and "." not in parts and ".." not in parts \
            and not (ws.root / text).exists():
        return text  # a name with a file type (data/x.jsonl) is a mistyped path, not an id
    path = user_path(ws, text, "dataset path")
    if not path.exists():
        raise QmorError(f"dataset {text!r} does not exist; upload a file, enter a path or a Hub dataset id "
                        f"(org/name), or pick a built-in ({', '.join(BUILTIN_DATASETS)})")
    return str(path)


def check_launch(host: str, share: bool, password: str | None) -> None:
    """Refuse to expose the app without a password (one line, says the fix)."""
    if (host not in LOCAL_HOSTS or share) and not password:
        where = "a share link" if share else f"host {host}"
        raise QmorError(f"listening on {where} needs a password: pass --password or set QMOR_APP_PASSWORD")
