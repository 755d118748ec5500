"""Small helpers every tab shares: turning exceptions into a readable line, listing runs."""

from __future__ import annotations

import html

import gradio as gr

from apps.paths import Workspace, inside, run_meta_file
from qmor.errors import QmorError


def message(e: BaseException) -> str:
    """User errors are already one readable line; anything else gets its type so a bug report can name it."""
    return str(e) if isinstance(e, QmorError) else f"{type(e).__name__}: {e}"


def error_md(e: BaseException) -> str:
    text = message(e)
    gr.Warning(text)
    return f"<div class='qmor-error'>⚠️ {html.escape(text)}</div>"


def ok_md(text: str) -> str:
    return f"<div class='qmor-ok'>{html.escape(text)}</div>"


def trained_runs(ws: Workspace) -> list[str]:
    """Runs with a final adapter, newest first (when paths are restricted, no link that leads out of the
    workspace)."""
    runs = [p for p in ws.runs.iterdir() if run_meta_file(p) is not None
            and (not ws.restrict or inside(ws, p.resolve()))]
    return [p.name for p in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)]


CSS = """
.qmor-error { color: #b91c1c; background: #fef2f2; border: 1px solid #fecaca; padding: 6px 10px; border-radius: 6px; }
.qmor-ok { color: #166534; background: #f0fdf4; border: 1px solid #bbf7d0; padding: 6px 10px; border-radius: 6px; }
"""
