"""`python -m qmor ...`: the `qmor` command (qmor/cli.py)."""

import sys

from qmor.cli import main

sys.exit(main())
