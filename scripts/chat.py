"""Chat in the terminal with a 4-bit base and a trained adapter: the same command as `qmor chat`
(qmor/commands/chat.py); --help lists its options and commands."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run from a checkout: its own qmor comes first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qmor.commands.chat import command, main, parse_args  # noqa: E402

__all__ = ["command", "main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
