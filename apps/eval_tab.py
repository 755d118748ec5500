"""Evaluate tab: `qmor eval` on one run or several, as a job with its progress and a Stop button; then the figures,
the plot, the side-by-side replies, and for several runs their comparison."""

from __future__ import annotations

import html
import json
import re
import time
from pathlib import Path

import gradio as gr

from apps import command
from apps.jobs import Jobs, stopped, tail
from apps.paths import Workspace, check_name, check_run_sources, confined, dataset_arg, run_dir
from apps.ui import error_md, ok_md, trained_runs
from qmor.errors import QmorError
from qmor.eval import report
from qmor.training.run_dir import RunDir

# tqdm's line: "RUN: adapter: answers:  45%|████▌     | 5/11 [...]"; the description is what runs now
PROGRESS_RE = re.compile(r"(.*):\s+(\d+)%\|[^|]*\|\s*(\d+)/(\d+)")


def progress_html(log_text: str, state: str) -> str:
    found = PROGRESS_RE.findall(log_text)
    what, pct, done, total = found[-1] if found else ("starting", "0", "0", "?")
    pct = "100" if state == "done" else pct
    colour = {"error": "#d33", "stopped": "#d98b00", "done": "#2a9d4b"}.get(state, "#3b82f6")
    return (f"<div id='qmor-eval-progress' data-state='{state}'><b>{state}</b> · {html.escape(what.strip())} · "
            f"stage {done}/{total} · {pct}%<div style='background:#e5e7eb;border-radius:4px;height:10px;"
            f"margin-top:4px'><div style='width:{pct}%;background:{colour};height:10px;border-radius:4px'></div>"
            "</div></div>")


def eval_command(runs: list[Path], out: Path | None, dataset: str | None, prompts: int, limit: int,
                 max_new_tokens: int, general: bool) -> list[str]:
    args = [*map(str, runs), "--prompts", str(prompts), "--limit", str(limit), "--max-new-tokens",
            str(max_new_tokens)]
    args += ["--dataset", dataset] if dataset else []
    args += [] if general else ["--no-general"]
    args += ["--output", str(out)] if out else []
    return [*command.eval_command(), *map(command.short_path, args)]


def whole(value, name: str, low: int) -> int:
    if value is None or float(value) != int(value) or int(value) < low:
        raise QmorError(f"{name} must be a whole number of at least {low}, got {value}")
    return int(value)


def results(runs: list[Path], comparison: Path | None) -> tuple[str, str | None, str]:
    """The figures (a table per run, the comparison first), the plot to show and the side-by-side replies."""
    reports = [json.loads((r / report.JSON).read_text()) for r in runs]
    figures = [report.comparison(reports), ""] if comparison else []
    side = []
    for r in reports:
        text = report.markdown(r)
        head, _, replies = text.partition("## Side by side (greedy)")
        # one level down: the page's own headings stay the largest
        head = re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + 2) + " ", head, flags=re.M)
        figures += [head.strip(), ""]
        side += [f"### {Path(r['run']).name}", replies.strip(), ""]
    plot = (comparison or runs[0]) / report.PLOT
    return "\n".join(figures), str(plot) if plot.is_file() else None, "\n".join(side)


def check_sources(ws: Workspace, run: Path) -> None:
    """What the evaluation reads beside the run stays in the workspace when paths are restricted: its base, its
    LoftQ base weights, and the exports its exports.json names (a link or an edited file could lead anywhere)."""
    check_run_sources(ws, run)
    for record in RunDir(run).recorded_exports():
        confined(ws, Path(record["path"]), f"export of run {run.name}")


def job_outputs(job: dict) -> tuple[list[Path], Path | None]:
    """The run folders and the comparison folder of an evaluation job, read back from its command."""
    args = job["command"][job["command"].index("eval") + 1:]  # after `python -m qmor eval`
    runs = [Path(a) for a in args[:next((i for i, a in enumerate(args) if a.startswith("--")), len(args))]]
    out = Path(args[args.index("--output") + 1]) if "--output" in args else None
    return runs, out


def latest(jobs: Jobs) -> tuple:
    """What the tab shows when it opens (or the page is refreshed): the running evaluation, or the last results."""
    job = jobs.latest("eval")
    if job is None:
        return "", "", "", None, "", ""
    text = tail(job["log"])
    if jobs.alive(job):
        return (ok_md("an evaluation is running; Stop ends it, its results show here when you open the tab again"),
                progress_html(text, "running"), "", None, "", text)
    runs, out = job_outputs(job)
    if jobs.exit_code(job) not in (0, 1) or not all((r / report.JSON).is_file() for r in runs):
        state = "stopped" if stopped(jobs.exit_code(job)) else "error"
        return "", progress_html(text, state), "", None, "", text
    figures, image, replies = results(runs, out)
    return ok_md("the last evaluation"), progress_html(text, "done"), figures, image, replies, text


def build(ws: Workspace, jobs: Jobs) -> dict:
    ui = _layout(ws)
    shown = [ui[k] for k in ("status", "bar", "figures", "plot", "side", "log")]
    _wire(ws, jobs, ui, shown)
    return {"runs": ui["picked"], "latest": lambda: latest(jobs), "shown": shown}


def _layout(ws: Workspace) -> dict:
    """The tab's components, by name."""
    with gr.Row():
        runs = trained_runs(ws)
        picked = gr.Dropdown(runs, value=runs[:1], multiselect=True, label="Runs to evaluate (several: compared)",
                             scale=4, elem_id="eval-runs", allow_custom_value=True)
        refresh_btn = gr.Button("Refresh runs", size="sm", scale=1)
    with gr.Row():
        dataset = gr.Textbox("", label="Dataset (empty: each run's validation split, else its training data)",
                             scale=3)
        prompts = gr.Number(6, precision=0, minimum=0, label="Side-by-side prompts", scale=1)
        limit = gr.Number(100, precision=0, minimum=1, label="Examples scored", scale=1)
        max_new = gr.Number(48, precision=0, minimum=1, label="Tokens per reply", scale=1)
        general = gr.Checkbox(True, label="General questions (forgetting)", scale=1)
    with gr.Row():
        start_btn = gr.Button("Evaluate", variant="primary", elem_id="eval-start")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="eval-stop")
    status = gr.HTML(elem_id="eval-status")
    bar = gr.HTML(elem_id="eval-bar")
    figures = gr.Markdown(elem_id="eval-figures")
    plot = gr.Image(label="Plot", type="filepath", interactive=False, elem_id="eval-plot")
    with gr.Accordion("Side by side: base, adapter and each export", open=True):
        side = gr.Markdown(elem_id="eval-side")
    log = gr.Textbox(label="Log (tail)", lines=8, max_lines=8, autoscroll=True, elem_id="eval-log")
    return dict(picked=picked, refresh_btn=refresh_btn, dataset=dataset, prompts=prompts, limit=limit,
                max_new=max_new, general=general, start_btn=start_btn, stop_btn=stop_btn, status=status, bar=bar,
                figures=figures, plot=plot, side=side, log=log)


def _wire(ws: Workspace, jobs: Jobs, ui: dict, shown: list) -> None:
    """The handlers: evaluate as a job, stop it."""

    def evaluate(names, data="", n_prompts=6, n_limit=100, tokens=48, ask_general=True):
        try:
            names = [names] if isinstance(names, str) else list(names or [])
            if not names:
                raise QmorError("pick one or more trained runs to evaluate (Refresh runs if one just finished)")
            folders = [run_dir(ws, n) for n in names]
            for folder in folders:
                check_sources(ws, folder)
            out = confined(ws, ws.root / "evals" / check_name("-vs-".join(names)[:100], "comparison name"),
                           "comparison") if len(folders) > 1 else None
            cmd = eval_command(folders, out, dataset_arg(ws, data) if (data or "").strip() else None,
                               whole(n_prompts, "Side-by-side prompts", 0), whole(n_limit, "Examples scored", 1),
                               whole(tokens, "Tokens per reply", 1), bool(ask_general))
            if jobs.running("eval"):
                raise QmorError("an evaluation is already running; wait for it or stop it")
            log_path = ws.root / "evals" / f"{names[0]}{'-and-more' if out else ''}.log"
            log_path.unlink(missing_ok=True)
            job = jobs.start("eval", cmd, log_path, out or folders[0])
        except Exception as e:
            yield error_md(e), "", gr.update(), gr.update(), gr.update(), ""
            return
        yield ok_md(f"evaluating {', '.join(names)}"), progress_html("", "running"), "", None, "", ""
        while jobs.alive(job):
            time.sleep(1.0)
            text = tail(log_path)
            yield gr.update(), progress_html(text, "running"), gr.update(), gr.update(), gr.update(), text
        text = tail(log_path, lines=200)
        code = jobs.exit_code(job)
        if stopped(code):
            yield ok_md("stopped"), progress_html(text, "stopped"), "", None, "", tail(log_path)
            return
        if code not in (0, 1):  # 1: done, with an export flagged
            last = [ln for ln in text.splitlines() if ln.strip()][-1:] or ["no output"]
            yield (error_md(QmorError(f"evaluation failed: {last[0]}")), progress_html(text, "error"), "", None, "",
                   tail(log_path))
            return
        table, image, replies = results(folders, out)
        note = "; an export is flagged (see below)" if code == 1 else ""
        yield ok_md(f"evaluated {', '.join(names)}{note}"), progress_html(text, "done"), table, image, replies, \
            tail(log_path)

    def stop() -> str:
        """Stop the running evaluation (the runs it finished keep their reports)."""
        try:
            job = jobs.running("eval")
            if job is None:
                raise QmorError("no evaluation is running")
            jobs.stop(job, wait_s=20.0)
            return ok_md("stopping the evaluation")
        except Exception as e:
            return error_md(e)

    ui["refresh_btn"].click(lambda: gr.update(choices=trained_runs(ws)), None, ui["picked"], api_name="eval_runs")
    ui["start_btn"].click(evaluate, [ui[k] for k in ("picked", "dataset", "prompts", "limit", "max_new", "general")],
                          shown, api_name="evaluate")
    ui["stop_btn"].click(stop, None, ui["status"], api_name="stop_eval")
