"""qmor's web app: train, watch, chat, export and evaluate from the browser.

    python apps/app.py [--host 127.0.0.1] [--port 7860] [--workspace DIR] [--share] [--password ...]

Listens on loopback by default. Any other host, or --share, needs a password and confines every path to the
workspace, because the form fields would otherwise let anyone who reaches the port read or write files.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `apps` and `qmor` importable from the project folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apps.command import short_path  # noqa: E402
from apps.jobs import Jobs  # noqa: E402
from apps.paths import LOCAL_HOSTS, Workspace, check_launch, make_workspace  # noqa: E402
from qmor.errors import QmorError  # noqa: E402


def parse(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description="qmor web app: train, chat, export and evaluate in the browser")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--workspace", default="qmor-workspace", help="folder for runs, uploads and exports")
    p.add_argument("--share", action="store_true", help="also open a public gradio share link (needs a password)")
    p.add_argument("--password", default=None, help="login password (or env QMOR_APP_PASSWORD); user name: --user")
    p.add_argument("--user", default="qmor", help="login user name when a password is set")
    p.add_argument("--restrict-paths", action="store_true",
                   help="confine paths to the workspace even on loopback (always on for other hosts or --share)")
    return p.parse_args(argv)


def build(ws: Workspace, jobs: Jobs):
    # gradio and the tabs built on it load only when the app starts, so that --help and a refused launch answer at once
    import gradio as gr

    from apps import chat_tab, eval_tab, export_tab, train_tab  # gradio: see above
    from apps.ui import CSS  # gradio: see above

    with gr.Blocks(title="qmor") as demo:
        gr.Markdown(f"## qmor · 4-bit fine-tuning\nWorkspace: `{short_path(str(ws.root))}`"
                    + (" (paths confined to it)" if ws.restrict else ""))
        with gr.Tabs():
            with gr.Tab("Train", id="train"):
                train = train_tab.build(ws, jobs)
            with gr.Tab("Chat", id="chat") as chat_tab_block:
                chat = chat_tab.build(ws)
            with gr.Tab("Export", id="export") as export_tab_block:
                export = export_tab.build(ws, jobs)
            with gr.Tab("Evaluate", id="evaluate") as eval_tab_block:
                evaluation = eval_tab.build(ws, jobs)
        # a refreshed page (or a restarted app) shows the running job at once instead of waiting for a tick
        demo.load(train["poll"], None, train["poll_out"], api_name=False, show_progress="hidden")
        demo.load(train["family_changed"], train["family"], train["specific"], api_name=False)
        demo.load(train["preview_command"], train["inputs"], train["cmd_box"], api_name=False)
        chat_tab_block.select(chat["refresh"], None, chat["runs"], api_name=False)
        export_tab_block.select(lambda: gr.update(choices=_runs(ws)), None, export["runs"], api_name=False)
        eval_tab_block.select(lambda: gr.update(choices=_runs(ws)), None, evaluation["runs"], api_name=False)
        eval_tab_block.select(evaluation["latest"], None, evaluation["shown"], api_name=False)
    return demo, CSS


def _runs(ws: Workspace) -> list[str]:
    from apps.ui import trained_runs  # imports gradio: see build

    return trained_runs(ws)


def job_env(ws: Workspace) -> dict:
    """What every job's environment sets over the app's own: the hub's download cache and qmor's (built-in models,
    LoftQ bases) confined with the runs when paths are (the app's own chat uses ws.cache)."""
    env = {"PYTHONUNBUFFERED": "1"}
    if ws.restrict:
        env.update(HF_HOME=str(ws.root / "hf-cache"), QMOR_CACHE=str(ws.cache))
    return env


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse(argv, prog)
    password = args.password or os.environ.get("QMOR_APP_PASSWORD") or None
    exposed = args.host not in LOCAL_HOSTS or args.share
    try:
        check_launch(args.host, args.share, password)
        ws = make_workspace(args.workspace, restrict=exposed or args.restrict_paths)
    except (QmorError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # gradio's upload folder inside the workspace: gradio reads it from its environment only, before it starts
    os.environ["GRADIO_TEMP_DIR"] = str(ws.root / ".uploads")
    jobs = Jobs(ws.root, job_env(ws))
    jobs.stop_children_at_exit()
    demo, css = build(ws, jobs)
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                auth=(args.user, password) if password else None, allowed_paths=[str(ws.root)],
                css=css, footer_links=["api"], show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
