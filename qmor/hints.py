"""The follow-up commands qmor prints after training, an export or a chat: `qmor ...` commands (the console command
pip installs; `scripts/` is not installed) that run as printed from the folder the first command ran in, each at the
end of its line after a colon. Paths are quoted for the shell, so a folder with a space in its name works."""

from __future__ import annotations

import os
import shlex
from pathlib import Path


def command(*args: str | os.PathLike) -> str:
    return shlex.join(["qmor", *map(str, args)])


def chat(adapter: str | os.PathLike) -> str:
    return f"chat with it: {command('chat', '--adapter', adapter)}"


def chat_merged(model: str | os.PathLike) -> str:
    return f"chat with it: {command('chat', '--base-model', model, '--no-4bit')}"


def export(source: str | os.PathLike) -> str:
    return f"merge it into an fp16 model: {command('export', source, '--output', f'{Path(source)}-fp16')}"


def resume(run: str | os.PathLike) -> str:
    return f"continue with: {command('train', '--resume', '--output', run)}"


def evaluate(run: str | os.PathLike) -> str:
    return f"compare it with the adapter: {command('eval', run)}"
