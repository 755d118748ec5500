"""Background jobs (training, export) as subprocesses, with a registry file so a page or an app restart reattaches.

Each job runs in its own session (process group), so Stop can signal the whole tree and Ctrl+C in the app's
terminal does not hit it before the app has asked it to checkpoint. The registry `jobs.json` in the workspace
holds pid, kind, run folder, log, command and start time; it is the only state shared between page loads.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import qmor
from apps.command import shown
from qmor.files import load_json, save_json

_LOCK = threading.RLock()
_CHILDREN: dict[int, subprocess.Popen] = {}  # started by this app process: reaped with poll(), killed at exit
_REGISTRY: list[Path] = []  # registry files touched by this process, for the exit handler


def registry_path(root: Path) -> Path:
    return Path(root) / "jobs.json"


def load_jobs(root: Path) -> list[dict]:
    path = registry_path(root)
    if not path.is_file():
        return []
    try:
        return list(load_json(path).get("jobs", []))
    except Exception:  # a damaged registry must not take the app down: start afresh
        return []


def _save_jobs(root: Path, jobs: list[dict]) -> None:
    save_json({"jobs": jobs[-50:]}, registry_path(root))


def _update(root: Path, pid: int, **fields) -> None:
    with _LOCK:
        jobs = load_jobs(root)
        for j in jobs:
            if j["pid"] == pid:
                j.update(fields)
        _save_jobs(root, jobs)


def own_tree() -> dict:
    """PYTHONPATH with the folder holding the app's own qmor first, so a job runs the code the app runs: the checkout
    it was started from, or the installed package, whatever the working folder or another installed qmor."""
    tree = str(Path(qmor.__file__).resolve().parents[1])
    return {"PYTHONPATH": os.pathsep.join([tree, *filter(None, [os.environ.get("PYTHONPATH")])])}


def start(root: Path, kind: str, cmd: list[str], log: Path, run_dir: Path, env: dict | None = None,
          log_in_run: bool = False) -> dict:
    """Start `cmd` with stdout and stderr appended to `log`; record it in the registry.

    log_in_run: the log lies inside `run_dir`, which the command itself must create (see runlog.py).
    """
    if log_in_run:
        cmd = [sys.executable, str(Path(__file__).with_name("runlog.py")), str(log), str(run_dir), shown(cmd), "--",
               *cmd]
        out = subprocess.DEVNULL
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        out = open(log, "ab")
        out.write(f"$ {shown(cmd)}\n".encode())
        out.flush()
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, **own_tree(), **(env or {})})
    finally:
        if out is not subprocess.DEVNULL:
            out.close()
    job = {"pid": proc.pid, "kind": kind, "run_dir": str(run_dir), "log": str(log), "command": cmd,
           "started": time.time(), "exit_code": None}
    with _LOCK:
        _CHILDREN[proc.pid] = proc
        if registry_path(root) not in _REGISTRY:
            _REGISTRY.append(registry_path(root))
        _save_jobs(root, [*load_jobs(root), job])
    return job


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(root: Path, job: dict) -> bool:
    """Is the job still running? Reaps our own children and records their exit code."""
    pid = job["pid"]
    proc = _CHILDREN.get(pid)
    if proc is not None:
        code = proc.poll()
        if code is None:
            return True
        with _LOCK:
            _CHILDREN.pop(pid, None)
        job["exit_code"] = code
        _update(root, pid, exit_code=code)
        return False
    if job.get("exit_code") is not None:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # the pid may have been reused since a previous app run: check it still runs our command
    ours = " ".join(job["command"][1:4])  # "-m qmor train": what the process's command line shows
    stat = Path(f"/proc/{pid}/stat")
    zombie = stat.is_file() and ") Z " in stat.read_text(errors="replace")
    return not zombie and (not Path("/proc").is_dir() or ours in _cmdline(pid))


def latest(root: Path, kind: str) -> dict | None:
    jobs = [j for j in load_jobs(root) if j["kind"] == kind]
    return jobs[-1] if jobs else None


def running(root: Path, kind: str) -> dict | None:
    for j in reversed(load_jobs(root)):
        if j["kind"] == kind and alive(root, j):
            return j
    return None


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the job is its own session leader, so its pid is the group id
    except (ProcessLookupError, PermissionError):
        pass


def stop(root: Path, job: dict, wait_s: float = 60.0) -> bool:
    """SIGINT the job's group so it checkpoints and exits; escalate to SIGTERM, then SIGKILL. True if it ended."""
    for sig, budget in ((signal.SIGINT, wait_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        _signal_group(job["pid"], sig)
        end = time.monotonic() + budget
        while time.monotonic() < end:
            if not alive(root, job):
                # stragglers that ignored the signal (an inherited SIG_IGN, say) must not outlive their job
                _signal_group(job["pid"], signal.SIGKILL)
                return sig != signal.SIGKILL
            time.sleep(0.2)
    return not alive(root, job)


def stop_all_children() -> None:
    """At app exit: stop every job this process started, so nothing is left running without a UI."""
    with _LOCK:
        procs = list(_CHILDREN.values())
    for p in procs:
        if p.poll() is None:
            _signal_group(p.pid, signal.SIGINT)
    end = time.monotonic() + 30.0
    for p in procs:
        try:
            p.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(p.pid, signal.SIGKILL)
            p.wait()


def tail(path: str | Path, lines: int = 40, max_bytes: int = 64_000) -> str:
    path = Path(path)
    if not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - max_bytes))
        text = f.read().decode(errors="replace")
    # tqdm redraws with carriage returns: keep only the last state of each line
    rows = [r.rsplit("\r", 1)[-1] for r in text.replace("\r\n", "\n").split("\n")]
    return "\n".join([r for r in rows if r.strip()][-lines:])


def install_exit_handlers() -> None:
    atexit.register(stop_all_children)

    def _on_term(signum, frame):
        raise SystemExit(128 + signum)  # unwinds through atexit, which stops the jobs

    signal.signal(signal.SIGTERM, _on_term)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, _on_term)
