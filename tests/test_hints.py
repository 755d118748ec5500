"""Every follow-up command that the default run, an export and a chat print is a `qmor ...` command that runs as
printed: each is run through the shell in the folder the first command ran in, a folder with a space in its name so
that the quoting counts, and each must exit 0. The hints those commands print are run in turn."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HINT = re.compile(r": (qmor .+)$")  # a hint ends its line, after a colon
# the default run (tiny model, uuid, MoRA + LoftQ) made quick
TINY = ["--max-steps", "2", "--batch-size", "4", "--num-examples", "8", "--eval-generate", "0"]


def hints_in(text: str) -> list[str]:
    return [m.group(1) for line in text.splitlines() if (m := HINT.search(line.strip()))]


def test_every_printed_hint_runs_as_printed(tmp_path):
    work = tmp_path / "my work"
    (work / "bin").mkdir(parents=True)
    # `qmor` is this checkout's, whatever qmor is installed: the console command's main, run by this interpreter
    shim = work / "bin" / "qmor"
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m qmor "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{work / 'bin'}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "QMOR_CACHE": str(tmp_path / "cache")}

    def run(line: str) -> str:
        proc = subprocess.run(line, shell=True, cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, (line, proc.stderr[-2000:])
        return proc.stdout + proc.stderr

    printed = hints_in(run(shlex.join(["qmor", "train", "--output", "my run", *TINY])))
    assert printed == ["qmor plan --config 'my run/config.json' --optimizer paged-adamw-8bit",
                       "qmor chat --adapter 'my run'", "qmor export 'my run' --output 'my run-fp16'"]
    ran, todo = [], list(printed)
    while todo:
        line = todo.pop(0)
        if line not in ran:
            ran.append(line)
            todo += hints_in(run(line))
    # the export says how to chat with the merged model and how to compare it with the adapter; the chat (on the base
    # the adapter records) how to export
    assert ran == [*printed, "qmor chat --base-model 'my run-fp16' --no-4bit", "qmor eval 'my run'"]
    assert (work / "my run-fp16" / "config.json").is_file()
