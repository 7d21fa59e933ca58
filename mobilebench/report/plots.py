"""curves.png (validation accuracy and training loss per epoch) and pareto.png (accuracy vs cost)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from mobilebench.report.aggregate import Row

PLOTS_HINT = "plots skipped (matplotlib missing); get them with: pip install 'mobilebench[report]'"


# --- plots -------------------------------------------------------------------------------


def _series_label(row: Row) -> str:
    status = "" if row.status == "completed" else f" ({row.status})"
    return f"{row.model} {row.label}".strip() + status


def plot_curves(rows: list[Row], path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    labels = [_series_label(row) for row in rows]
    # One legend under both plots: long config labels inside an axes would squeeze it to nothing.
    ncols = 1 if max(map(len, labels)) > 45 else min(4, len(labels))
    legend_rows = math.ceil(len(labels) / ncols)
    fig = Figure(figsize=(10, 3.6 + 0.2 * legend_rows), dpi=100, layout="constrained")
    ax_acc, ax_loss = fig.subplots(1, 2)
    colors = _colors(len(rows))
    for row, color, row_label in zip(rows, colors, labels):
        for i, run in enumerate(row.runs):
            epochs = [m["epoch"] for m in run.metrics]
            label = row_label if i == 0 else None
            style = "-" if row.status == "completed" else ":"
            acc = [100 * m["val_acc"] if isinstance(m.get("val_acc"), (int, float)) else math.nan for m in run.metrics]
            ax_acc.plot(epochs, acc, style, color=color, marker="o", markersize=3, label=label, alpha=0.85)
            ax_loss.plot(epochs, [m.get("train_loss", math.nan) for m in run.metrics], style, color=color,
                         marker="o", markersize=3, alpha=0.85)
    ax_acc.set(xlabel="epoch", ylabel="val accuracy (%)", title="validation accuracy (one line per run)")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="training loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(loc="outside lower center", ncols=ncols, fontsize=8, frameon=False)
    fig.savefig(path, bbox_inches="tight")


def plot_pareto(values: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator

    colors = _colors(len(values))  # same colour per row as in curves.png
    done = [(v, c) for v, c in zip(values, colors) if v["status"] == "completed" and v["test_acc_mean"] is not None]
    panels = [("macs_m", "MACs (M) at training resolution")]
    if any(v["latency_ms_mean"] is not None for v, _ in done):
        panels.append(("latency_ms_mean", "latency fp32 (ms)"))
    # Points carry their model name; config settings, when rows differ in them, go to a legend below.
    with_config = any(v["config"] for v, _ in done)
    width = max(5.5 * len(panels), 10 if with_config else 0)
    fig = Figure(figsize=(width, 4.2 + (0.2 * len(done) if with_config else 0)), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    plain = FuncFormatter(lambda x, _: f"{x:g}")
    for ax, (key, xlabel) in zip(axes, panels):
        points = sorted((p for p in done if p[0][key] is not None), key=lambda p: p[0][key])
        for i, (v, color) in enumerate(points):
            n = f" (n={v['n']})" if v["n"] > 1 else ""
            ax.errorbar(v[key], v["test_acc_mean"], yerr=v["test_acc_std"] or 0, fmt="o", color=color, capsize=3,
                        label=f"{v['model']}{n} {v['config']}" if ax is axes[0] else None)
            # Neighbours on the x axis alternate above and below so their labels do not overprint;
            # the rightmost label goes left of its point so it stays inside the figure.
            last = i == len(points) - 1 and i > 0
            ax.annotate(v["model"] + ("" if with_config else n), (v[key], v["test_acc_mean"]), textcoords="offset points",
                        xytext=(-4 if last else 4, 5 if i % 2 == 0 else -5), ha="right" if last else "left",
                        va="bottom" if i % 2 == 0 else "top", fontsize=8, color=color)
        ax.set(xlabel=xlabel, ylabel="test accuracy (%)", title=f"test accuracy vs {xlabel.split(' (')[0]}")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_locator(LogLocator(subs=(2, 3, 5)))
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.grid(alpha=0.3, which="both")
        ax.margins(x=0.25, y=0.15)
    if with_config:
        fig.legend(loc="outside lower center", fontsize=8, frameon=False)
    fig.savefig(path, bbox_inches="tight")  # a legend wider than the figure still fits


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def write_plots(rows: list[Row], values: list[dict[str, Any]], out: Path) -> list[str]:
    """curves.png and pareto.png; [] (and a one-line note) without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.stderr.write(f"mobilebench: {PLOTS_HINT}\n")
        return []
    plot_curves(rows, out / "curves.png")
    plot_pareto(values, out / "pareto.png")
    return ["curves.png", "pareto.png"]
