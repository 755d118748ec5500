"""Export a trained adapter in every format, merged fp16 (the default), PEFT (--format peft) or GGUF (--format gguf):
the same command as `qmor export` (qmor/commands/export.py); --help lists its options."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run from a checkout: its own qmor comes first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qmor.commands.export import main, parse_args  # noqa: E402

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
