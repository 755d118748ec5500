"""The `qmor` command's subcommands, one module each with `main(argv, prog) -> exit code`; qmor/cli.py dispatches
to them and scripts/*.py are thin wrappers around the same functions."""

import sys

from qmor.errors import QmorError
from qmor.files import describe_os_error

# what a command reports as one line instead of a traceback: bad input, and the system refusing a file (a full
# disk, a folder that cannot be written, a model folder that cannot be read)
USER_ERRORS = (QmorError, OSError)


def fail(e: Exception) -> int:
    """Print `e` as one line (an OSError as the system's reason) and return the exit status 2."""
    text = (describe_os_error(e) or e) if isinstance(e, OSError) else e
    print(f"error: {text}", file=sys.stderr)
    return 2
