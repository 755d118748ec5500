"""Train tab: the form (one widget per row of the flag table in qmor/flags.py), the command preview,
Start/Stop/Resume, and the polled progress, loss plot and log."""

from __future__ import annotations

import contextlib
import inspect
import re
import shutil
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from apps import command, progress
from apps.jobs import Jobs, tail
from apps.paths import BUILTIN_DATASETS, Workspace, dataset_arg, run_dir, user_path
from apps.ui import error_md, ok_md
from qmor.data.pipeline import FILE_TYPES, preview
from qmor.errors import QmorError
from qmor.flags import FLAGS, Flag
from qmor.training.run_dir import RunDir

# the form: (accordion title, or None for always open; groups of qmor/flags.py laid out in it; widgets per row)
SECTIONS = [(None, ("model",), 4), (None, ("data",), 4), (None, ("adapter",), 5), (None, ("family", "init"), 8),
            ("Training", ("training",), 6), ("Memory", ("memory",), 6)]
FORM = [f for _, groups, _ in SECTIONS for g in groups for f in FLAGS if f.group == g and f.in_app]
# every form field in the order the start/preview endpoints take them (the run name right after the model), with
# its initial value: the training script's own defaults, so the untouched form runs exactly the CLI default (an
# option the run decides from the model and the data starts empty, or at "auto", and is left out of the command)
FIELDS = {"model": None, "run_name": "", **{f.key: f.default for f in FORM}}
# the options whose value decides which others apply ("family", "init"), each with those others
DEPENDENTS = {key: [f for f in FORM if f.only_when and f.only_when[0] == key]
              for key in dict.fromkeys(f.only_when[0] for f in FORM if f.only_when)}


def _values(vals) -> dict:
    # "auto" leaves the flag out: every option's auto is its default, or what the run decides
    return {k: None if x == "auto" else x for k, x in zip(FIELDS, vals, strict=True)}


def _auto_name(v: dict) -> str:
    return f"{v.get('family') or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"


def _dataset_choices(ws: Workspace) -> list[str]:
    files = sorted(str(p.relative_to(ws.root)) for p in ws.data.iterdir() if p.is_file())
    return [*BUILTIN_DATASETS, *files]


def _widget(flag: Flag, choices: list[str] | None = None) -> gr.components.Component:
    """One row of the flag table as the widget its `shown_as` names, starting at the option's default."""
    kw = {"label": flag.label, "scale": flag.scale, "visible": flag.applies({})}
    kind = flag.shown_as
    if kind == "number" and flag.auto:  # a browser sends an emptied number as 0, so auto is an empty text box
        return gr.Textbox("", placeholder=f"auto: {flag.auto}", **kw)
    if flag.info or flag.auto:
        kw["info"] = flag.info or f"auto: {flag.auto}"
    if kind == "checkbox":
        return gr.Checkbox(flag.default, **kw)
    if kind == "number":
        return gr.Number(flag.default, precision=0 if flag.kind is int else None, minimum=flag.minimum,
                         maximum=flag.maximum, **kw)
    if kind == "text":
        return gr.Textbox(flag.default, **kw)
    choices = list(flag.choices) if choices is None else choices
    if kind == "radio":  # a radio cannot be emptied, so auto is one of its choices
        return gr.Radio(["auto", *choices] if flag.auto else choices, value=flag.default or "auto", **kw)
    return gr.Dropdown(choices, value=flag.default, allow_custom_value=kind == "combo", **kw)


def _form(ws: Workspace) -> tuple[dict, dict]:
    """The form's widgets by field (FIELDS), and the dataset tools: upload and preview."""
    c: dict[str, gr.components.Component] = {}
    tools: dict[str, gr.components.Component] = {}
    for title, groups, per_row in SECTIONS:
        with gr.Accordion(title, open=False) if title else contextlib.nullcontext():
            flags = [f for f in FORM if f.group in groups]
            for i in range(0, len(flags), per_row):
                _row(ws, flags[i:i + per_row], c, tools)
        if "data" in groups:
            with gr.Accordion("Dataset preview", open=False):
                tools["preview_btn"] = gr.Button("Preview first rows", size="sm")
                tools["preview_md"] = gr.Markdown()
                tools["preview_df"] = gr.Dataframe(interactive=False, wrap=True, max_height=260)
    return c, tools


def _row(ws: Workspace, flags: list[Flag], c: dict, tools: dict) -> None:
    """One row of widgets, with the app's own beside theirs: the run name after the model, the upload box after
    the dataset's row."""
    with gr.Row():
        for flag in flags:
            c[flag.key] = _widget(flag, _dataset_choices(ws) if flag.key == "dataset" else None)
            if flag.key == "model":  # the run's name under the workspace's runs/, the app's --output
                c["run_name"] = gr.Textbox("", label="Run name", placeholder="automatic (family-date-time)", scale=2)
        if any(f.key == "dataset" for f in flags):
            tools["upload"] = gr.File(label="Upload a dataset", file_types=list(FILE_TYPES), scale=2, height=90)


def _run_panel() -> dict:
    """The command preview, the buttons, and what polling fills in: status, progress, loss plot, log."""
    p = {"cmd_box": gr.Code(label="Command (what Start runs)", language="shell", interactive=False, lines=2)}
    with gr.Row():
        p["start"] = gr.Button("Start", variant="primary", elem_id="train-start")
        p["stop"] = gr.Button("Stop", variant="stop", elem_id="train-stop")
        p["resume"] = gr.Button("Resume last run", elem_id="train-resume")
    p["status"] = gr.HTML(elem_id="train-status")
    p["progress"] = gr.HTML(progress.progress_html(progress.summary([]), "no run yet"), elem_id="train-progress")
    # starts with no value: a plot whose first value is an empty frame never draws the lines it gets later
    p["plot"] = gr.LinePlot(None, x="step", y="loss", color="series", title="Loss", height=280, elem_id="loss-plot")
    p["log"] = gr.Textbox(label="Log (tail)", lines=10, max_lines=10, autoscroll=True, elem_id="train-log")
    p["timer"] = gr.Timer(2.0)
    return p


def preview_command(ws: Workspace, *vals) -> str:
    """The command Start would run, or why it cannot be built (the box doubles as live validation)."""
    v = _values(vals)
    v["run_name"] = v["run_name"] or "NAME"
    try:
        return command.shown(command.train_command(command.train_args(ws, v)))
    except Exception as e:
        return f"# cannot build the command: {e}"


def start(ws: Workspace, jobs: Jobs, *vals):
    """Start a training run with these settings; returns the status and the command."""
    try:
        if jobs.running("train"):
            raise QmorError("a training run is already going; stop it first (one GPU, one job)")
        v = _values(vals)
        v["run_name"] = (v["run_name"] or "").strip() or _auto_name(v)
        out = run_dir(ws, v["run_name"])
        try:
            RunDir(out).check_fresh()  # a run that failed before its first checkpoint may start again by name
        except QmorError:
            raise QmorError(f"run {v['run_name']!r} exists already; choose another name, or Resume it") from None
        cmd = command.train_command(command.train_args(ws, v))
        jobs.start("train", cmd, RunDir(out).log, out, log_in_run=True)
        return ok_md(f"started {v['run_name']}"), command.shown(cmd)
    except Exception as e:
        return error_md(e), gr.update()


def stop(jobs: Jobs) -> str:
    """Stop the running training run (it writes a checkpoint first)."""
    try:
        job = jobs.running("train")
        if job is None:
            raise QmorError("no training run is going")
        ended = jobs.stop(job)
        s = progress.summary(RunDir(job["run_dir"]).read_events())
        where = f"; checkpoint {s['message']}" if s["state"] == "stopped" and s["message"] else ""
        if not ended:
            raise QmorError("the run did not stop on SIGINT or SIGTERM and was killed; "
                            "it resumes from its last saved checkpoint, if any")
        return ok_md(f"stopped {Path(job['run_dir']).name} at step {s['step']}{where}; Resume continues it")
    except Exception as e:
        return error_md(e)


def resume(jobs: Jobs):
    """Continue the latest run from its last checkpoint."""
    try:
        if jobs.running("train"):
            raise QmorError("a training run is already going; stop it first")
        job = jobs.latest("train")
        if job is None:
            raise QmorError("there is no run to resume yet; press Start")
        run = Path(job["run_dir"])
        if progress.summary(RunDir(run).read_events())["state"] == "done":
            raise QmorError(f"run {run.name} has finished; start a new run instead")
        if not RunDir(run).checkpoints.is_dir():
            raise QmorError(f"run {run.name} has no checkpoint to resume from; Start it again under the same "
                            "name")
        cmd = command.resume_command(run)
        jobs.start("train", cmd, RunDir(run).log, run, log_in_run=True)
        return ok_md(f"resuming {run.name}"), command.shown(cmd)
    except Exception as e:
        return error_md(e), gr.update()


def poll(jobs: Jobs):
    """Progress, loss plot, log tail and the Start/Stop states of the latest run."""
    job = jobs.latest("train")
    if job is None:
        return (progress.progress_html(progress.summary([]), "no run yet"), None, "",
                gr.update(interactive=True), gr.update(interactive=False))
    run = Path(job["run_dir"])
    events = RunDir(run).read_events()
    s = progress.summary(events)
    is_alive = jobs.alive(job)
    if not is_alive and s["state"] in ("running", "waiting"):
        code = job.get("exit_code")
        s["state"] = "error" if code not in (0, None) else "ended"
        if code not in (0, None):
            s["message"] = f"exit code {code}; see the log"
    frame = progress.loss_frame(events)
    return (progress.progress_html(s, run.name), frame if len(frame) else None, tail(job["log"]),
            gr.update(interactive=not is_alive), gr.update(interactive=is_alive))


def preview_data(ws: Workspace, dataset, fmt, split="train", subset="", columns=""):
    """The detected format and the first rows of a dataset (its split, and its columns renamed as training will)."""
    try:
        detected, rows = preview(dataset_arg(ws, dataset), n=5, format=fmt, split=split or "train", subset=subset or "",
                                 columns=columns or None)
        frame = pd.DataFrame([{k: _cell(v) for k, v in r.items()} for r in rows])
        return ok_md(f"format: {detected} · showing {len(rows)} rows"), frame
    except Exception as e:
        return error_md(e), pd.DataFrame()


def uploaded(ws: Workspace, file):
    """Save an uploaded dataset into the workspace's data/ and select it."""
    try:
        if not file:
            return gr.update(), ""
        src = Path(file)
        name = re.sub(r"[^A-Za-z0-9._-]", "_", src.name).lstrip(".") or "dataset"
        dest = user_path(ws, str(ws.data / name), "upload")
        shutil.copyfile(src, dest)
        rel = str(dest.relative_to(ws.root))
        return gr.update(choices=_dataset_choices(ws), value=rel), ok_md(f"saved as {rel}")
    except Exception as e:
        return gr.update(), error_md(e)



def _visibility(key: str):
    """Show the options that apply to this value of `key` (a family's own options, LoftQ's iterations)."""
    def show(value):
        return [gr.update(visible=f.applies({key: value})) for f in DEPENDENTS[key]]

    return show


def _endpoint(fn, *bound, fields: dict | None = None):
    """fn with its first arguments bound, as gradio reads it: the docstring describes the API endpoint and the
    signature names its parameters (`fields`, where fn takes *vals, which the API would call param_0, param_1, ...,
    each defaulting to its initial value: gradio makes a parameter whose widget starts empty, as an option the run
    decides does, optional only when the signature gives it a default)."""
    def handler(*vals):
        return fn(*bound, *vals)

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    if fields is None:
        params = [inspect.Parameter(n, kind) for n in list(inspect.signature(fn).parameters)[len(bound):]]
    else:
        params = [inspect.Parameter(n, kind, default=value) for n, value in fields.items()]
    handler.__name__, handler.__doc__ = fn.__name__, fn.__doc__
    handler.__signature__ = inspect.Signature(params)
    return handler


def build(ws: Workspace, jobs: Jobs) -> dict:
    """Lay out the tab inside the current Blocks context and wire it; returns what app.py wires to demo.load."""
    c, tools = _form(ws)
    p = _run_panel()
    inputs = [c[k] for k in FIELDS]
    preview_fn = _endpoint(preview_command, ws, fields=FIELDS)
    for key, flags in DEPENDENTS.items():
        c[key].change(_visibility(key), c[key], [c[f.key] for f in flags], api_visibility="private")
    for comp in inputs:
        comp.change(preview_fn, inputs, p["cmd_box"], api_name=False, show_progress="hidden")
    data = [c[k] for k in ("dataset", "format", "split", "subset", "columns")]
    tools["preview_btn"].click(_endpoint(preview_data, ws), data, [tools["preview_md"], tools["preview_df"]],
                               api_name="preview_data")
    tools["upload"].upload(_endpoint(uploaded, ws), tools["upload"], [c["dataset"], tools["preview_md"]],
                           api_name="upload_dataset")
    p["start"].click(_endpoint(start, ws, jobs, fields=FIELDS), inputs, [p["status"], p["cmd_box"]],
                     api_name="start_training")
    p["stop"].click(_endpoint(stop, jobs), None, p["status"], api_name="stop_training")
    p["resume"].click(_endpoint(resume, jobs), None, [p["status"], p["cmd_box"]], api_name="resume_training")
    poll_out = [p["progress"], p["plot"], p["log"], p["start"], p["stop"]]
    poll_fn = _endpoint(poll, jobs)
    p["timer"].tick(poll_fn, None, poll_out, api_name="poll_training", show_progress="hidden")
    return {"poll": poll_fn, "poll_out": poll_out, "family_changed": _visibility("family"), "family": c["family"],
            "specific": [c[f.key] for f in DEPENDENTS["family"]], "preview_command": preview_fn, "inputs": inputs,
            "cmd_box": p["cmd_box"]}


def _cell(v) -> str:
    text = v if isinstance(v, str) else repr(v)
    return text if len(text) <= 300 else text[:300] + "…"
