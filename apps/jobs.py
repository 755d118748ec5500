"""Background jobs (training, export, evaluation) as subprocesses, with a registry file so a page or an app restart
reattaches.

Each job runs in its own session (process group), so Stop can signal the whole tree and Ctrl+C in the app's
terminal does not hit it before the app has asked it to checkpoint. The registry `jobs.json` in the workspace
holds pid, kind, run folder, log, command and start time; it is the only state shared between page loads. The app
makes one `Jobs` for its workspace and hands it to every tab.
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


def own_tree() -> dict:
    """PYTHONPATH with the folder holding the app's own qmor first, so a job runs the code the app runs: the checkout
    it was started from, or the installed package, whatever the working folder or another installed qmor."""
    tree = str(Path(qmor.__file__).resolve().parents[1])
    return {"PYTHONPATH": os.pathsep.join([tree, *filter(None, [os.environ.get("PYTHONPATH")])])}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the job is its own session leader, so its pid is the group id
    except (ProcessLookupError, PermissionError):
        pass


class Jobs:
    """The jobs of one workspace: its registry file, and the processes this app started (reaped with poll(),
    stopped when the app exits)."""

    def __init__(self, root: Path, env: dict | None = None):
        self.root = Path(root)
        self.env = env or {}  # set for every job, over the app's own environment
        self.registry = self.root / "jobs.json"
        self.lock = threading.RLock()  # the registry's read-modify-write, from the tabs' handler threads
        self.children: dict[int, subprocess.Popen] = {}

    def load(self) -> list[dict]:
        if not self.registry.is_file():
            return []
        try:
            return list(load_json(self.registry).get("jobs", []))
        except Exception:  # a damaged registry must not take the app down: start afresh
            return []

    def _save(self, jobs: list[dict]) -> None:
        save_json({"jobs": jobs[-50:]}, self.registry)

    def _update(self, pid: int, **fields) -> None:
        with self.lock:
            jobs = self.load()
            for j in jobs:
                if j["pid"] == pid:
                    j.update(fields)
            self._save(jobs)

    def start(self, kind: str, cmd: list[str], log: Path, run_dir: Path, log_in_run: bool = False) -> dict:
        """Start `cmd` with stdout and stderr appended to `log`; record it in the registry.

        log_in_run: the log lies inside `run_dir`, which the command itself must create (see runlog.py).
        """
        if log_in_run:
            cmd = [sys.executable, str(Path(__file__).with_name("runlog.py")), str(log), str(run_dir), shown(cmd),
                   "--", *cmd]
            out = subprocess.DEVNULL
        else:
            log.parent.mkdir(parents=True, exist_ok=True)
            out = open(log, "ab")
            out.write(f"$ {shown(cmd)}\n".encode())
            out.flush()
        try:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env={**os.environ, **own_tree(), **self.env})
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        job = {"pid": proc.pid, "kind": kind, "run_dir": str(run_dir), "log": str(log), "command": cmd,
               "started": time.time(), "exit_code": None}
        with self.lock:
            self.children[proc.pid] = proc
            self._save([*self.load(), job])
        return job

    def alive(self, job: dict) -> bool:
        """Is the job still running? Reaps our own children and records their exit code."""
        pid = job["pid"]
        proc = self.children.get(pid)
        if proc is not None:
            code = proc.poll()
            if code is None:
                return True
            with self.lock:
                self.children.pop(pid, None)
            job["exit_code"] = code
            self._update(pid, exit_code=code)
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

    def exit_code(self, job: dict) -> int | None:
        """The job's exit status; a Stop pressed meanwhile reaped it in another request, which recorded it in the
        registry only."""
        if job.get("exit_code") is not None:
            return job["exit_code"]
        return next((j.get("exit_code") for j in self.load() if j["pid"] == job["pid"]), None)

    def latest(self, kind: str) -> dict | None:
        jobs = [j for j in self.load() if j["kind"] == kind]
        return jobs[-1] if jobs else None

    def running(self, kind: str) -> dict | None:
        for j in reversed(self.load()):
            if j["kind"] == kind and self.alive(j):
                return j
        return None

    def stop(self, job: dict, wait_s: float = 60.0) -> bool:
        """SIGINT the job's group so it checkpoints and exits; escalate to SIGTERM, then SIGKILL. True if it
        ended."""
        for sig, budget in ((signal.SIGINT, wait_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            _signal_group(job["pid"], sig)
            end = time.monotonic() + budget
            while time.monotonic() < end:
                if not self.alive(job):
                    # stragglers that ignored the signal (an inherited SIG_IGN, say) must not outlive their job
                    _signal_group(job["pid"], signal.SIGKILL)
                    return sig != signal.SIGKILL
                time.sleep(0.2)
        return not self.alive(job)

    def stop_children(self) -> None:
        """At app exit: stop every job this process started, so nothing is left running without a UI."""
        with self.lock:
            procs = list(self.children.values())
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

    def stop_children_at_exit(self) -> None:
        """Stop this app's jobs when it exits, on Ctrl+C, SIGTERM or SIGHUP alike."""
        atexit.register(self.stop_children)

        def _on_term(signum, frame):
            raise SystemExit(128 + signum)  # unwinds through atexit, which stops the jobs

        signal.signal(signal.SIGTERM, _on_term)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, _on_term)


def stopped(code: int | None) -> bool:
    """Whether a job's exit status says SIGINT (Stop) ended it: the 130 of a command that caught it, or the signal
    itself. CPython may exit by re-raising SIGINT although the command caught the KeyboardInterrupt and returned
    130 (measured: 2 stops in 10 of `python -m qmor eval` ended so), so both count."""
    return code in (128 + signal.SIGINT, -signal.SIGINT)


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
