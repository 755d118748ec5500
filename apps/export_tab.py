"""Export tab: merge a run's adapter into an fp16/bf16 model in a subprocess, showing its log and verification."""

from __future__ import annotations

import re
import time

import gradio as gr

from apps import command, jobs
from apps.command import short_path
from apps.paths import Workspace, check_name, check_run_sources, confined, run_dir
from apps.ui import adapter_config, error_md, ok_md, trained_runs
from qmor.adapters import ADAPTERS, check_family, merge_refusal
from qmor.errors import QmorError

VERIFY_RE = re.compile(r"max \|Δlogit\| (\S+) \(tolerance (\S+?),.*top-1 agreement (\S+)")


def verification(log_text: str) -> str | None:
    """The export script's verification line, as a small table (None if it has not printed one)."""
    found = VERIFY_RE.findall(log_text)
    if not found:
        return None
    max_abs, tol, top1 = found[-1]
    return (f"| max abs logit difference | tolerance | top-1 agreement |\n|---|---|---|\n"
            f"| {max_abs} | {tol} | {top1} |")


def build(ws: Workspace) -> dict:
    with gr.Row():
        run = gr.Dropdown(trained_runs(ws), label="Run to export", scale=3, elem_id="export-run",
                          allow_custom_value=True)
        refresh_btn = gr.Button("Refresh runs", size="sm", scale=1)
    with gr.Row():
        name = gr.Textbox("", label="Output name (in the workspace's exports/)", placeholder="RUN-fp16", scale=3)
        dtype = gr.Radio(["fp16", "bf16"], value="fp16", label="dtype", scale=1)
        overwrite = gr.Checkbox(False, label="Overwrite", scale=1)
    export_btn = gr.Button("Merge and export", variant="primary", elem_id="export-start")
    status = gr.HTML(elem_id="export-status")
    result = gr.Markdown(elem_id="export-result")
    log = gr.Textbox(label="Export log (tail)", lines=10, max_lines=10, autoscroll=True, elem_id="export-log")

    def export(run_name, out_name, dt, ow):
        try:
            if not run_name:
                raise QmorError("pick a trained run to export (Refresh runs if it just finished)")
            run_path = run_dir(ws, run_name)
            check_run_sources(ws, run_path)
            family = adapter_config(run_path).get("adapter", {}).get("family")
            if family in ADAPTERS and not check_family(family).merges:
                raise QmorError(merge_refusal(family, "chat with the run"))
            out = confined(ws, ws.exports / check_name(out_name or f"{run_name}-{dt}", "output name"), "output")
            if jobs.running(ws.root, "export"):
                raise QmorError("an export is already running; wait for it to finish")
            log_path = ws.exports / f"{out.name}.log"
            log_path.unlink(missing_ok=True)
            job = jobs.start(ws.root, "export", command.export_command(run_path, out, dt, bool(ow)), log_path, out)
        except Exception as e:
            yield error_md(e), "", gr.update()
            return
        yield ok_md(f"exporting {run_name} to {out}"), "", ""
        while jobs.alive(ws.root, job):
            time.sleep(1.0)
            yield gr.update(), gr.update(), jobs.tail(log_path)
        text = jobs.tail(log_path, lines=200)
        figures = verification(text)
        if job.get("exit_code") == 0 and (out / "config.json").is_file():
            where = short_path(str(out))
            yield ok_md(f"exported to {where}"), f"**Output:** `{where}`\n\n{figures or ''}", jobs.tail(log_path)
        else:
            last = [ln for ln in text.splitlines() if ln.strip()][-1:] or ["no output"]
            yield error_md(QmorError(f"export failed: {last[0]}")), figures or "", jobs.tail(log_path)

    def default_name(run_name, dt):
        return f"{run_name}-{dt}" if run_name else ""

    refresh_btn.click(lambda: gr.update(choices=trained_runs(ws)), None, run, api_name="export_runs")
    run.change(default_name, [run, dtype], name, api_visibility="private")
    dtype.change(default_name, [run, dtype], name, api_visibility="private")
    export_btn.click(export, [run, name, dtype, overwrite], [status, result, log], api_name="export")
    return {"runs": run}
