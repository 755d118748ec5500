"""Fine-tune an adapter on a 4-bit NF4 base: the same command as `qmor train` (qmor/commands/train.py).

    python scripts/finetune_4bit.py                      # the built-in default, offline on a CPU
    python scripts/finetune_4bit.py --help               # every flag
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run from a checkout: its own qmor comes first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qmor.commands.train import build_config, ignored_by_resume, main, parser  # noqa: E402

__all__ = ["build_config", "ignored_by_resume", "main", "parser"]

if __name__ == "__main__":
    sys.exit(main())
