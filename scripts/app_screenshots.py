"""Screenshots of the web app for the docs: the built-in default trained from the Train tab, a chat comparing the
trained adapter with the bare base on a memorised key, an export, and the evaluation of the run and its export.

    python scripts/app_screenshots.py --out docs/     # needs Chromium (apt-get install chromium); a few minutes

The app runs in a fresh temporary folder with the workspace `qmor-workspace`, so no local path shows on the page.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(1)
    raise TimeoutError(f"timed out waiting for {what}")


def choose(page, label: str, value: str) -> None:
    """Pick `value` in a dropdown that also takes typed text (the run pickers)."""
    box = page.get_by_label(label)
    box.fill(value)
    box.press("Enter")


def start_app(folder: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QMOR_CACHE": str(folder / "cache")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "apps" / "app.py"), "--port", str(port), "--workspace",
                             "qmor-workspace"], cwd=folder, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    wait_for(up, 120, "the app")
    return proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs", help="folder for app-train.png, app-chat.png, app-export.png, "
                    "app-eval.png")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from qmor.data import tasks

    out = Path(args.out).resolve()
    key = tasks.records("uuid", "train", 32, 0)[0]  # the default run memorises these 32 pairs (seed 0)
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        port = free_port()
        app = start_app(Path(tmp), port)
        try:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_label("Run name").fill("uuid-mora")
            page.locator("#train-start").click()
            wait_for(lambda: "done" in page.locator("#train-progress").inner_text(), 900, "the default run")
            time.sleep(3)  # one more poll, so the plot has every point
            page.screenshot(path=str(out / "app-train.png"), full_page=True)

            page.get_by_role("tab", name="Chat").click()
            choose(page, "Trained run (adapter)", "uuid-mora")
            page.get_by_label("Compare with base (same prompt through the base without the adapter)").check()
            page.locator("#chat-load").click()
            wait_for(lambda: "adapter" in page.locator("#chat-status").inner_text(), 300, "the chat model")
            page.locator("#chat-msg textarea").fill(key["prompt"])
            page.locator("#chat-msg textarea").press("Enter")
            wait_for(lambda: "reply complete" in page.locator("#chat-status").inner_text(), 300, "a reply")
            page.screenshot(path=str(out / "app-chat.png"), full_page=True)

            page.get_by_role("tab", name="Export").click()
            choose(page, "Run to export", "uuid-mora")
            page.locator("#export-start").click()
            wait_for(lambda: "exported" in page.locator("#export-status").inner_text(), 600, "the export")
            page.screenshot(path=str(out / "app-export.png"), full_page=True)

            page.get_by_role("tab", name="Evaluate").click()
            page.wait_for_timeout(1000)  # the tab refreshes its run list on selection
            choose(page, "Runs to evaluate (several: compared)", "uuid-mora")
            page.locator("#eval-start").click()
            wait_for(lambda: "evaluated" in page.locator("#eval-status").inner_text(), 600, "the evaluation")
            page.screenshot(path=str(out / "app-eval.png"), full_page=True)
            browser.close()
        finally:
            app.terminate()
            app.wait(timeout=60)
    print(f"wrote app-train.png, app-chat.png, app-export.png and app-eval.png to {out}; the key was "
          f"{key['prompt']!r}, its value {key['completion']!r}")


if __name__ == "__main__":
    main()
