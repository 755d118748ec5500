"""`qmor app`: the web app (apps/app.py; --help lists its options). gradio is imported only under apps/, and comes
with the `app` extra; without it, `qmor app` says so in one line."""

from __future__ import annotations

import importlib.util
import sys


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if importlib.util.find_spec("gradio") is None:
        print('error: the app needs gradio: pip install "qmor[app]" (in a checkout: pip install -e ".[app]")',
              file=sys.stderr)
        return 2
    from apps.app import main as app_main  # gradio is checked for first, so its absence is one line

    return app_main(argv, prog)
