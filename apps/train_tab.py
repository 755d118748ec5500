"""Train tab: the form, the command preview, Start/Stop/Resume, and the polled progress, loss plot and log."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from apps import command, jobs, progress
from apps.paths import BUILTIN_DATASETS, Workspace, dataset_arg, run_dir, user_path
from apps.ui import error_md, ok_md
from qmor.adapters import option_defaults
from qmor.errors import QmorError
from qmor.train import check_fresh
from qmor.train_config import TrainConfig


def _defaults() -> dict[str, object]:
    """The training script's own defaults (read from TrainConfig, so they cannot drift): the untouched form runs
    exactly the CLI default."""
    cfg = TrainConfig()
    a, d = cfg.adapter, cfg.data
    return {
        "model": cfg.model, "trust_remote_code": cfg.trust_remote_code, "run_name": "", "device": cfg.device,
        "dataset": d.source, "format": d.format, "num_examples": d.num_examples,
        "family": a.family, "rank": a.r, "alpha": a.alpha, "dropout": a.dropout, "targets": a.targets,
        **option_defaults(), "init": a.init, "loftq_iters": a.loftq_iters, "lr": cfg.lr, "epochs": cfg.epochs,
        "max_steps": cfg.max_steps, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "max_len": d.max_len,
        "warmup_ratio": cfg.warmup_ratio, "weight_decay": cfg.weight_decay, "max_grad_norm": cfg.max_grad_norm,
        "val_size": d.val_size, "eval_steps": cfg.eval_steps, "save_steps": cfg.save_steps,
        "keep_checkpoints": cfg.keep_checkpoints, "log_steps": cfg.log_steps, "eval_generate": cfg.eval_generate,
        "packing": d.packing, "train_on_prompt": d.train_on_prompt, "seed": cfg.seed,
        "gradient_checkpointing": cfg.gradient_checkpointing, "offload_activations": cfg.offload_activations,
        "loss_chunk": cfg.loss_chunk,
    }


FIELDS = _defaults()  # every form field in the order the start/preview endpoints take them, with its initial value
FORMATS = ["auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text"]


def _values(vals) -> dict:
    v = dict(zip(FIELDS, vals, strict=True))
    if v.get("device") == "auto":
        v["device"] = None
    return v


def _auto_name(v: dict) -> str:
    return f"{v.get('family') or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"


def _dataset_choices(ws: Workspace) -> list[str]:
    files = sorted(str(p.relative_to(ws.root)) for p in ws.data.iterdir() if p.is_file())
    return [*BUILTIN_DATASETS, *files]


def build(ws: Workspace, env: dict) -> dict:
    """Lay out the tab inside the current Blocks context; returns what app.py wires to demo.load."""
    c: dict[str, gr.components.Component] = {}
    with gr.Row():
        c["model"] = gr.Textbox(FIELDS["model"], label="Model (hub id, local folder, or built-in 'tiny' / 'smollm2')",
                                scale=3)
        c["run_name"] = gr.Textbox("", label="Run name", placeholder="automatic (family-date-time)", scale=2)
        c["device"] = gr.Dropdown(["auto", "cuda", "cpu"], value="auto", label="Device", scale=1)
        c["trust_remote_code"] = gr.Checkbox(False, label="Trust remote code", scale=1,
                                             info="runs code from the model repository")
    with gr.Row():
        c["dataset"] = gr.Dropdown(_dataset_choices(ws), value=FIELDS["dataset"], allow_custom_value=True, scale=3,
                                   label="Dataset (built-in name, or a file path in the workspace)")
        c["format"] = gr.Dropdown(FORMATS, value="auto", label="Format", scale=1)
        c["num_examples"] = gr.Number(FIELDS["num_examples"], label="Examples (built-in tasks; 0 = task default)",
                                      precision=0, scale=1)
        upload = gr.File(label="Upload a dataset", file_types=[".json", ".jsonl", ".csv", ".parquet", ".txt"],
                         scale=2, height=90)
    with gr.Accordion("Dataset preview", open=False):
        preview_btn = gr.Button("Preview first rows", size="sm")
        preview_md = gr.Markdown()
        preview_df = gr.Dataframe(interactive=False, wrap=True, max_height=260)
    with gr.Row():
        c["family"] = gr.Radio(list(command.FAMILIES), value=FIELDS["family"], label="Adapter family", scale=3)
        c["rank"] = gr.Number(FIELDS["rank"], label="Rank r", precision=0, minimum=1)
        c["alpha"] = gr.Number(FIELDS["alpha"], label="Alpha", visible=False)
        c["dropout"] = gr.Number(FIELDS["dropout"], label="Dropout", minimum=0, maximum=0.99)
        c["targets"] = gr.Textbox(FIELDS["targets"], label="Targets", info="all-linear, q_proj,v_proj, or a regex")
    with gr.Row():
        c["mora_kind"] = gr.Dropdown(["auto", "sharing", "rope"], value="auto", label="MoRA operators")
        c["experts"] = gr.Number(FIELDS["experts"], label="Experts", precision=0, minimum=1, visible=False)
        c["top_k"] = gr.Number(FIELDS["top_k"], label="Top-k", precision=0, minimum=1, visible=False)
        c["capacity_factor"] = gr.Number(FIELDS["capacity_factor"], label="Capacity factor", visible=False)
        c["expert_dropout"] = gr.Number(FIELDS["expert_dropout"], label="Expert dropout", visible=False)
        c["aux_loss_weight"] = gr.Number(FIELDS["aux_loss_weight"], label="Aux loss weight", visible=False)
        c["init"] = gr.Radio(["loftq", "default"], value=FIELDS["init"], label="Initialisation")
        c["loftq_iters"] = gr.Number(FIELDS["loftq_iters"], label="LoftQ iterations", precision=0, minimum=1)
    with gr.Accordion("Training", open=False):
        with gr.Row():
            c["lr"] = gr.Number(FIELDS["lr"], label="Learning rate")
            c["epochs"] = gr.Number(FIELDS["epochs"], label="Epochs")
            c["max_steps"] = gr.Number(FIELDS["max_steps"], label="Max steps (0 = by epochs)", precision=0, minimum=0)
            c["batch_size"] = gr.Number(FIELDS["batch_size"], label="Batch size", precision=0, minimum=1)
            c["grad_accum"] = gr.Number(FIELDS["grad_accum"], label="Grad accumulation", precision=0, minimum=1)
            c["max_len"] = gr.Number(FIELDS["max_len"], label="Max length (tokens)", precision=0, minimum=8)
        with gr.Row():
            c["warmup_ratio"] = gr.Number(FIELDS["warmup_ratio"], label="Warmup ratio")
            c["weight_decay"] = gr.Number(FIELDS["weight_decay"], label="Weight decay")
            c["max_grad_norm"] = gr.Number(FIELDS["max_grad_norm"], label="Max grad norm")
            c["val_size"] = gr.Number(FIELDS["val_size"], label="Validation size (fraction or count)")
            c["eval_steps"] = gr.Number(FIELDS["eval_steps"], label="Eval every (steps)", precision=0)
            c["save_steps"] = gr.Number(FIELDS["save_steps"], label="Checkpoint every (steps)", precision=0)
        with gr.Row():
            c["log_steps"] = gr.Number(FIELDS["log_steps"], label="Log every (steps)", precision=0, minimum=1)
            c["keep_checkpoints"] = gr.Number(FIELDS["keep_checkpoints"], label="Checkpoints kept", precision=0)
            c["eval_generate"] = gr.Number(FIELDS["eval_generate"], label="Score answers at end (examples)",
                                           precision=0, minimum=0)
            c["seed"] = gr.Number(FIELDS["seed"], label="Seed", precision=0)
            c["packing"] = gr.Checkbox(False, label="Packing")
            c["train_on_prompt"] = gr.Checkbox(False, label="Train on prompt")
    with gr.Accordion("Memory", open=False), gr.Row():
        c["gradient_checkpointing"] = gr.Checkbox(True, label="Gradient checkpointing")
        c["offload_activations"] = gr.Checkbox(False, label="Offload activations to CPU")
        c["loss_chunk"] = gr.Number(FIELDS["loss_chunk"], label="Loss chunk (tokens)", precision=0, minimum=0)
    cmd_box = gr.Code(label="Command (what Start runs)", language="shell", interactive=False, lines=2)
    with gr.Row():
        start_btn = gr.Button("Start", variant="primary", elem_id="train-start")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="train-stop")
        resume_btn = gr.Button("Resume last run", elem_id="train-resume")
    status = gr.HTML(elem_id="train-status")
    prog = gr.HTML(progress.progress_html(progress.summary([]), "no run yet"), elem_id="train-progress")
    # starts with no value: a plot whose first value is an empty frame never draws the lines it gets later
    plot = gr.LinePlot(None, x="step", y="loss", color="series", title="Loss", height=280, elem_id="loss-plot")
    log = gr.Textbox(label="Log (tail)", lines=10, max_lines=10, autoscroll=True, elem_id="train-log")
    timer = gr.Timer(2.0)

    inputs = [c[k] for k in FIELDS]

    def preview_command(*vals):
        v = _values(vals)
        v["run_name"] = v["run_name"] or "NAME"
        try:
            return command.shown(command.train_command(command.train_args(ws, v)))
        except Exception as e:  # the preview box doubles as live validation
            return f"# cannot build the command: {e}"

    def start(*vals):
        try:
            if jobs.running(ws.root, "train"):
                raise QmorError("a training run is already going; stop it first (one GPU, one job)")
            v = _values(vals)
            v["run_name"] = (v["run_name"] or "").strip() or _auto_name(v)
            out = run_dir(ws, v["run_name"])
            try:
                check_fresh(out)  # a run that failed before its first checkpoint may start again under its name
            except QmorError:
                raise QmorError(f"run {v['run_name']!r} exists already; choose another name, or Resume it") from None
            cmd = command.train_command(command.train_args(ws, v))
            jobs.start(ws.root, "train", cmd, out / "train.log", out, env, log_in_run=True)
            return ok_md(f"started {v['run_name']}"), command.shown(cmd)
        except Exception as e:
            return error_md(e), gr.update()

    def stop():
        try:
            job = jobs.running(ws.root, "train")
            if job is None:
                raise QmorError("no training run is going")
            ended = jobs.stop(ws.root, job)
            s = progress.summary(progress.read_events(job["run_dir"]))
            where = f"; checkpoint {s['message']}" if s["state"] == "stopped" and s["message"] else ""
            if not ended:
                raise QmorError("the run did not stop on SIGINT or SIGTERM and was killed; "
                                "it resumes from its last saved checkpoint, if any")
            return ok_md(f"stopped {Path(job['run_dir']).name} at step {s['step']}{where}; Resume continues it")
        except Exception as e:
            return error_md(e)

    def resume():
        try:
            if jobs.running(ws.root, "train"):
                raise QmorError("a training run is already going; stop it first")
            job = jobs.latest(ws.root, "train")
            if job is None:
                raise QmorError("there is no run to resume yet; press Start")
            run = Path(job["run_dir"])
            if progress.summary(progress.read_events(run))["state"] == "done":
                raise QmorError(f"run {run.name} has finished; start a new run instead")
            if not (run / "checkpoints").is_dir():
                raise QmorError(f"run {run.name} has no checkpoint to resume from; Start it again under the same "
                                "name")
            cmd = command.resume_command(run)
            jobs.start(ws.root, "train", cmd, run / "train.log", run, env, log_in_run=True)
            return ok_md(f"resuming {run.name}"), command.shown(cmd)
        except Exception as e:
            return error_md(e), gr.update()

    def poll():
        job = jobs.latest(ws.root, "train")
        if job is None:
            return (progress.progress_html(progress.summary([]), "no run yet"), None, "",
                    gr.update(interactive=True), gr.update(interactive=False))
        run = Path(job["run_dir"])
        events = progress.read_events(run)
        s = progress.summary(events)
        is_alive = jobs.alive(ws.root, job)
        if not is_alive and s["state"] in ("running", "waiting"):
            code = job.get("exit_code")
            s["state"] = "error" if code not in (0, None) else "ended"
            if code not in (0, None):
                s["message"] = f"exit code {code}; see the log"
        frame = progress.loss_frame(events)
        return (progress.progress_html(s, run.name), frame if len(frame) else None, jobs.tail(job["log"]),
                gr.update(interactive=not is_alive), gr.update(interactive=is_alive))

    def preview_data(dataset, fmt):
        try:
            from qmor.data import preview

            detected, rows = preview(dataset_arg(ws, dataset), n=5, format=fmt)
            frame = pd.DataFrame([{k: _cell(v) for k, v in r.items()} for r in rows])
            return ok_md(f"format: {detected} · showing {len(rows)} rows"), frame
        except Exception as e:
            return error_md(e), pd.DataFrame()

    def uploaded(file):
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

    def family_changed(family):
        own = command.FAMILY_FIELDS.get(family, ())
        return [gr.update(visible=k in own) for k in command.SPECIFIC]

    c["family"].change(family_changed, c["family"], [c[k] for k in command.SPECIFIC], api_visibility="private")
    c["init"].change(lambda i: gr.update(visible=i == "loftq"), c["init"], c["loftq_iters"],
                     api_visibility="private")
    for comp in inputs:
        comp.change(preview_command, inputs, cmd_box, api_name=False, show_progress="hidden")
    preview_btn.click(preview_data, [c["dataset"], c["format"]], [preview_md, preview_df], api_name="preview_data")
    upload.upload(uploaded, upload, [c["dataset"], preview_md], api_name="upload_dataset")
    start_btn.click(start, inputs, [status, cmd_box], api_name="start_training")
    stop_btn.click(stop, None, status, api_name="stop_training")
    resume_btn.click(resume, None, [status, cmd_box], api_name="resume_training")
    poll_out = [prog, plot, log, start_btn, stop_btn]
    timer.tick(poll, None, poll_out, api_name="poll_training", show_progress="hidden")
    return {"poll": poll, "poll_out": poll_out, "family_changed": family_changed, "family": c["family"],
            "specific": [c[k] for k in command.SPECIFIC], "preview_command": preview_command, "inputs": inputs,
            "cmd_box": cmd_box}


def _cell(v) -> str:
    text = v if isinstance(v, str) else repr(v)
    return text if len(text) <= 300 else text[:300] + "…"
