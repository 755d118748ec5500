"""`qmor app`: the web app (apps/app.py; --help lists its options).

The app is not part of the installed package: gradio is imported only under apps/, which sits beside qmor/ in the
source tree and is not packaged. So `qmor app` needs qmor installed from a clone (`pip install -e ".[app]"`, which
keeps the package in the tree, next to apps/) and gradio (the `app` extra); without either it says so in one line.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the source tree holding qmor/ and apps/


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not (ROOT / "apps" / "app.py").is_file():
        print(f"error: the app ships with qmor's source tree, not in the installed package ({ROOT} has no apps/); "
              'clone the repository and install it with pip install -e ".[app]"', file=sys.stderr)
        return 2
    if importlib.util.find_spec("gradio") is None:
        print(f'error: the app needs gradio; install it in the checkout: cd {ROOT} && pip install -e ".[app]"',
              file=sys.stderr)
        return 2
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from apps.app import main as app_main

    return app_main(argv, prog)
