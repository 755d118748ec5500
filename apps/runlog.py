"""Run a command and copy its output into RUN/train.log, opened only once the command has created RUN.

The training script refuses an output folder that already holds files, so the app cannot create train.log up
front; and a pipe into the app itself would break (and kill the run) when the app restarts. This forwarder lives
in the job's process group, ignores the stop signals meant for the trainer, and exits with the trainer's code
after copying its last words (the checkpoint line).

    python apps/runlog.py RUN/train.log RUN HEADER -- COMMAND...
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    log, run, header, cmd = Path(argv[0]), Path(argv[1]), argv[2], argv[4:]
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the trainer, in the same group, gets the signal and checkpoints
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in
                                                (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)])
    pending = [f"$ {header}\n".encode()]
    out = None
    while True:
        chunk = os.read(proc.stdout.fileno(), 65536)
        if out is None and (not chunk or (run.is_dir() and any(run.iterdir()))):
            run.mkdir(parents=True, exist_ok=True)
            out = open(log, "ab")
            out.write(b"".join(pending))
        if not chunk:
            break
        if out is None:
            pending.append(chunk)
        else:
            out.write(chunk)
            out.flush()
    out.close()
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
