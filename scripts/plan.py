"""Will it fit? Predicted peak GPU memory of a training step: the same command as `qmor plan`
(qmor/commands/plan.py); --help lists its options."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run from a checkout: its own qmor comes first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qmor.commands.plan import main, parser  # noqa: E402

__all__ = ["main", "parser"]

if __name__ == "__main__":
    sys.exit(main())
