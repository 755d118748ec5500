"""A run's metrics.jsonl -> what the train tab shows: loss table for the plot, progress, speed, ETA, final state."""

from __future__ import annotations

import pandas as pd

FINAL = ("done", "stopped", "error")


def loss_frame(events: list[dict]) -> pd.DataFrame:
    rows = [{"step": e["step"], "loss": e["loss"], "series": "train"}
            for e in events if e.get("event") == "train" and "loss" in e]
    rows += [{"step": e["step"], "loss": e["eval_loss"], "series": "eval"}
             for e in events if e.get("event") == "eval" and "eval_loss" in e]
    # typed even when empty: the plot reads its axis types from the first frame it gets, and an untyped empty frame
    # would make the loss axis categorical for good
    return pd.DataFrame(rows, columns=["step", "loss", "series"]).astype({"step": "int64", "loss": "float64",
                                                                          "series": "object"})


def _clock(seconds) -> str:
    if seconds is None:
        return "–"
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def summary(events: list[dict]) -> dict:
    """state (waiting|running|done|stopped|error), step, total, percent, tokens/s, eta, message."""
    total = next((e.get("total_steps") for e in reversed(events) if e.get("event") == "start"), None)
    trains = [e for e in events if e.get("event") == "train"]
    last = trains[-1] if trains else {}
    final = next((e for e in reversed(events) if e.get("event") in FINAL), None)
    # a resumed run appends a new start after its stopped event: only a final event after the last start counts
    last_start = max((i for i, e in enumerate(events) if e.get("event") == "start"), default=-1)
    if final is not None and events.index(final) < last_start:
        final = None
    step = (final or {}).get("step", last.get("step", 0)) or 0
    state = final["event"] if final else ("running" if events else "waiting")
    pct = 100.0 * step / total if total else 0.0
    if state == "done":
        pct = 100.0
    return {"state": state, "step": step, "total": total, "percent": min(100.0, pct),
            "tokens_per_s": last.get("tokens_per_s"), "eta": _clock(last.get("eta_s")) if state == "running" else "–",
            "loss": last.get("loss"), "message": (final or {}).get("message") or (final or {}).get("checkpoint")}


def progress_html(s: dict, title: str = "") -> str:
    """A progress bar with the figures beside it (plain HTML: no extra component to keep in step)."""
    colour = {"error": "#d33", "stopped": "#d98b00", "done": "#2a9d4b"}.get(s["state"], "#3b82f6")
    tps = f"{s['tokens_per_s']:,.0f} tokens/s" if s.get("tokens_per_s") else "– tokens/s"
    loss = f"loss {s['loss']:.4f}" if isinstance(s.get("loss"), (int, float)) else ""
    total = s["total"] if s["total"] else "?"
    return (
        f"<div id='qmor-progress' data-state='{s['state']}'><b>{title}</b> {s['state']} · step {s['step']}/{total}"
        f" · {s['percent']:.0f}% · {tps} · ETA {s['eta']} {('· ' + loss) if loss else ''}"
        f"<div style='background:#e5e7eb;border-radius:4px;height:10px;margin-top:4px'>"
        f"<div style='width:{s['percent']:.1f}%;background:{colour};height:10px;border-radius:4px'></div></div></div>"
    )
