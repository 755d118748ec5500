"""eval.png: base against adapter (loss, answers, general questions) and each export's agreement; the comparison
plot puts several runs' adapters side by side on the same panels."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

PANELS = ("loss", "answers: character accuracy", "general questions answered", "exports: top-1 agreement")


def values(r: dict) -> dict[str, dict[str, float]]:
    """Each panel's bars, by label."""
    out = {p: {} for p in PANELS}
    if r["loss"]:
        out["loss"] = {k: r["loss"][k]["loss"] for k in ("base", "adapter")}
    if r["answers"]:
        out["answers: character accuracy"] = {k: r["answers"][k]["char_accuracy"] for k in ("base", "adapter")}
    if r["general"]:
        n = max(r["general"]["n"], 1)
        out["general questions answered"] = {"base": r["general"]["base_correct"] / n,
                                             "adapter": r["general"]["adapter_correct"] / n}
    out["exports: top-1 agreement"] = {e["name"]: e["top1"] for e in r["exports"]}
    return out


def run(r: dict, path: Path) -> None:
    shown = values(r)
    draw({p: {label: [v] for label, v in bars.items()} for p, bars in shown.items()}, [Path(r["run"]).name], path,
         f"qmor eval: {Path(r['run']).name}")


def comparison(reports: list[dict], path: Path) -> None:
    """Per panel, one group of bars per run: base and adapter (and each export's agreement)."""
    names = [Path(r["run"]).name for r in reports]
    series: dict[str, dict[str, list[float]]] = {p: {} for p in PANELS}
    for i, r in enumerate(reports):
        for panel, bars in values(r).items():
            for label, v in bars.items():
                key = label if panel != "exports: top-1 agreement" else label.replace(names[i], "RUN")
                series[panel].setdefault(key, [float("nan")] * len(reports))[i] = v
    draw(series, names, path, f"qmor eval: {len(reports)} runs")


def draw(series: dict[str, dict[str, list[float]]], groups: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: runs in scripts, on servers and in the app's subprocess
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6))
    for ax, panel in zip(axes, PANELS, strict=True):
        bars = series[panel]
        width = 0.8 / max(1, len(bars))
        for j, (label, heights) in enumerate(bars.items()):
            xs = [g + (j - (len(bars) - 1) / 2) * width for g in range(len(groups))]
            colour = {"base": "tab:gray", "adapter": "tab:blue"}.get(label)
            ax.bar(xs, heights, width, label=label, color=colour)
        ax.set_xticks(range(len(groups)), groups, rotation=15 if len(groups) > 1 else 0)
        ax.set_title(panel, fontsize=10)
        # headroom above the tallest bar keeps the legend off the bars (shares reach 1.0 in a good run)
        top = 1.0 if panel != "loss" else max([h for hs in bars.values() for h in hs if not math.isnan(h)] or [1.0])
        ax.set_ylim(0, 1.3 * top)
        if panel != "loss":
            ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.grid(axis="y", alpha=0.3)
        if bars:
            ax.legend(fontsize="small", loc="upper center", ncols=min(len(bars), 2))
        else:
            ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
