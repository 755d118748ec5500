"""The experiments' plots: one colour per adapter family, the same in every figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: experiments run headless
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {"lora": "tab:blue", "moslora": "tab:orange", "mora": "tab:green", "mor": "tab:red", "sira": "tab:purple"}


def curves(runs: list[dict], key: str, ylabel: str, path: Path, title: str,
           ylim: tuple[float, float] | None = (0, 1.02)) -> None:
    """`key` of each run's curve against step; one panel per learning rate, one line per family."""
    lrs = sorted({r["lr"] for r in runs})
    fig, axes = plt.subplots(1, len(lrs), figsize=(5 * len(lrs), 3.8), sharey=True, squeeze=False)
    for ax, lr in zip(axes[0], lrs, strict=True):
        for r in (r for r in runs if r["lr"] == lr):
            steps = [p["step"] for p in r["curve"]]
            ax.plot(steps, [p[key] for p in r["curve"]], marker=".", label=r["family"],
                    color=COLOURS.get(r["family"]))
        ax.set_title(f"lr {lr:g}")
        ax.set_xlabel("step")
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(loc="lower right")
    fig.suptitle(title)
    save(fig, path)


def bars(groups: list[str], series: dict[str, list[float]], ylabel: str, path: Path, title: str,
         ylim: tuple[float, float] | None = (0, 1.02)) -> None:
    """Grouped bars: one group per entry of `groups`, one bar per series (a family, or an init)."""
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(1, len(series)) / 3), 3.8))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=name, color=COLOURS.get(name, "tab:gray"))  # a reference series
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title)
    save(fig, path)


def save(fig, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
