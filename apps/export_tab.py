"""Export tab: a run's adapter merged into an fp16/bf16 model, as a PEFT adapter over its base, or as a GGUF file with
an Ollama Modelfile, in a subprocess, showing its log and verification."""

from __future__ import annotations

import re
import time

import gradio as gr

from apps import command
from apps.command import short_path
from apps.jobs import Jobs, tail
from apps.paths import Workspace, adapter_config, check_name, check_run_sources, confined, run_dir
from apps.ui import error_md, ok_md, trained_runs
from qmor.adapters import ADAPTERS, check_family, merge_refusal
from qmor.errors import QmorError
from qmor.export.gguf import TYPES as GGUF_TYPES
from qmor.export.peft import check_peft_family

FORMATS = [("merged model", "merged"), ("PEFT adapter + its base", "peft"), ("GGUF + Ollama Modelfile", "gguf")]
DTYPES = ("fp16", "bf16")  # of a merged model or a PEFT adapter's base
FIRST = ("merged", "fp16", "q8_0")  # the form's format, dtype and GGUF type when it opens
VERIFY_RE = re.compile(r"max \|Δlogit\| (\S+) \(tolerance (\S+?),.*top-1 agreement (\S+)")


def verification(log_text: str) -> str | None:
    """The export script's verification line, as a small table (None if it has not printed one)."""
    found = VERIFY_RE.findall(log_text)
    if not found:
        return None
    max_abs, tol, top1 = found[-1]
    return (f"| max abs logit difference | tolerance | top-1 agreement |\n|---|---|---|\n"
            f"| {max_abs} | {tol} | {top1} |")


def check_exportable(family: str | None, fmt: str) -> None:
    """Refuse, before a subprocess starts, a family the chosen format cannot hold (the export would refuse it too)."""
    if family not in ADAPTERS:
        return  # an unknown family: the export itself names the problem
    if fmt == "peft":
        check_peft_family(family, merged_instead="choose the merged model or GGUF format instead")
    elif not check_family(family).merges:
        raise QmorError(merge_refusal(family, "chat with the run"))


def export_args(fmt: str, dtype: str, gguf_type: str) -> list[str]:
    """The export script's format flags for the form's choices (GGUF reads its type, the others their dtype)."""
    # gradio refuses a value outside the Radio's choices, so fmt is one of FORMATS
    return ["--format", "gguf", "--gguf-type", gguf_type] if fmt == "gguf" else ["--format", fmt, "--dtype", dtype]


def default_name(run_name: str, fmt: str, dtype: str, gguf_type: str) -> str:
    """RUN-fp16, RUN-peft, RUN-q8_0: what the form proposes as the output name."""
    suffix = {"gguf": gguf_type, "peft": "peft"}.get(fmt, dtype)
    return f"{run_name}-{suffix}" if run_name else ""


def build(ws: Workspace, jobs: Jobs) -> dict:
    with gr.Row():
        runs = trained_runs(ws)
        run = gr.Dropdown(runs, value=runs[0] if runs else None, label="Run to export", scale=3,
                          elem_id="export-run", allow_custom_value=True)  # the newest run
        refresh_btn = gr.Button("Refresh runs", size="sm", scale=1)
    with gr.Row():
        fmt = gr.Radio(FORMATS, value=FIRST[0], label="Format", scale=3, elem_id="export-format")
        dtype = gr.Radio(list(DTYPES), value=FIRST[1], label="dtype", scale=1)
        gguf_type = gr.Radio(list(GGUF_TYPES), value=FIRST[2], label="GGUF type", scale=1, visible=False)
    with gr.Row():
        name = gr.Textbox(default_name(runs[0] if runs else "", *FIRST),
                          label="Output name (in the workspace's exports/)", placeholder="RUN-fp16", scale=3)
        overwrite = gr.Checkbox(False, label="Overwrite", scale=1)
    export_btn = gr.Button("Export", variant="primary", elem_id="export-start")
    status = gr.HTML(elem_id="export-status")
    result = gr.Markdown(elem_id="export-result")
    log = gr.Textbox(label="Export log (tail)", lines=10, max_lines=10, autoscroll=True, elem_id="export-log")

    def export(run_name, out_name, dt, ow, export_format=FIRST[0], gguf_weights=FIRST[2]):
        try:
            flags = export_args(export_format, dt, gguf_weights)
            if not run_name:
                raise QmorError("pick a trained run to export (Refresh runs if it just finished)")
            run_path = run_dir(ws, run_name)
            check_run_sources(ws, run_path)
            check_exportable(adapter_config(run_path).get("adapter", {}).get("family"), export_format)
            out_name = check_name(out_name or default_name(run_name, export_format, dt, gguf_weights), "output name")
            out = confined(ws, ws.exports / out_name, "output")
            if jobs.running("export"):
                raise QmorError("an export is already running; wait for it to finish")
            log_path = ws.exports / f"{out.name}.log"
            log_path.unlink(missing_ok=True)
            cmd = command.export_command(run_path, out, flags, bool(ow))
            job = jobs.start("export", cmd, log_path, out)
        except Exception as e:
            yield error_md(e), "", gr.update()
            return
        yield ok_md(f"exporting {run_name} to {out}"), "", ""
        while jobs.alive(job):
            time.sleep(1.0)
            yield gr.update(), gr.update(), tail(log_path)
        text = tail(log_path, lines=200)
        figures = verification(text)
        if job.get("exit_code") == 0 and out.is_dir():  # the export renames its folder into place when complete
            where = short_path(str(out))
            yield ok_md(f"exported to {where}"), f"**Output:** `{where}`\n\n{figures or ''}", tail(log_path)
        else:
            last = [ln for ln in text.splitlines() if ln.strip()][-1:] or ["no output"]
            yield error_md(QmorError(f"export failed: {last[0]}")), figures or "", tail(log_path)

    def format_changed(run_name, export_format, dt, gguf_weights):
        return (gr.update(visible=export_format != "gguf"), gr.update(visible=export_format == "gguf"),
                default_name(run_name, export_format, dt, gguf_weights))

    refresh_btn.click(lambda: gr.update(choices=trained_runs(ws)), None, run, api_name="export_runs")
    choices = [run, fmt, dtype, gguf_type]
    fmt.change(format_changed, choices, [dtype, gguf_type, name], api_visibility="private")
    for changed in (run, dtype, gguf_type):
        changed.change(default_name, choices, name, api_visibility="private")
    export_btn.click(export, [run, name, dtype, overwrite, fmt, gguf_type], [status, result, log], api_name="export")
    return {"runs": run}
