"""The PNGs a run writes beside its JSON: curves.png (train), confusion.png and per_class.png
(eval, and train's final test), bench.png (bench train).

matplotlib is optional (the `report` extra): without it each command prints one note and writes
no picture. Figures are drawn with matplotlib's object API (no pyplot state), so drawing from a
launcher's worker thread or a headless machine needs no backend setup.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

HINT = "pip install 'mobilebench[report]'"
_noted: set[str] = set()


def draw(path: Path, plot: Callable[..., Any], *args: Any) -> Path | None:
    """`plot(*args)` returns a Figure; save it to `path` atomically. None (and one note per
    process) when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if "matplotlib" not in _noted:
            _noted.add("matplotlib")
            sys.stderr.write(f"mobilebench: note: no {path.name} or other PNGs (matplotlib is not installed; {HINT})\n")
        return None
    fig = plot(*args)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)
    return path


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _values(rows: Sequence[Mapping[str, Any]], key: str, scale: float = 1.0) -> list[float]:
    return [scale * r[key] if isinstance(r.get(key), (int, float)) else math.nan for r in rows]


def curves(rows: Sequence[Mapping[str, Any]], title: str, test: Mapping[str, Any] | None = None) -> Any:
    """Loss, accuracy and learning rate per epoch from metrics.jsonl rows (interrupted markers dropped)."""
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in rows if not r.get("interrupted")]
    epochs = [r["epoch"] for r in rows]
    has_val = any(isinstance(r.get("val_acc"), (int, float)) for r in rows)
    fig = _figure(13, 3.8)
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    ax_loss.plot(epochs, _values(rows, "train_loss"), "o-", ms=3, label="train")
    ax_acc.plot(epochs, _values(rows, "train_acc", 100), "o-", ms=3, label="train")
    if has_val:
        ax_loss.plot(epochs, _values(rows, "val_loss"), "s-", ms=3, label="validation")
        ax_acc.plot(epochs, _values(rows, "val_acc", 100), "s-", ms=3, label="validation")
    if test and isinstance(test.get("test_acc"), (int, float)) and epochs:
        ax_acc.plot([epochs[-1]], [100 * test["test_acc"]], "*", ms=12, color="C3",
                    label=f"test {100 * test['test_acc']:.2f}%")
    ax_lr.plot(epochs, _values(rows, "lr"), "o-", ms=3, color="C2")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
    ax_lr.set(xlabel="epoch", ylabel="learning rate (end of epoch)", title="learning rate")
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.legend(frameon=True, framealpha=0.8, loc="best")
    ax_acc.legend(frameon=True, framealpha=0.8, loc="best")
    fig.suptitle(title)
    return fig


def confusion(classes: Sequence[str], counts: Sequence[Sequence[int]], title: str) -> Any:
    """Row-normalized confusion matrix: each row (true class) sums to 100%."""
    n = len(classes)
    rows = [[100 * v / max(sum(row), 1) for v in row] for row in counts]
    side = min(max(5.0, 0.55 * n + 2.5), 24.0)
    fig = _figure(side + 1.2, side)
    ax = fig.subplots()
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, shrink=0.8, label="% of the true class")
    ticks = range(n)
    ax.set_xticks(ticks, classes, rotation=45, ha="right", fontsize=8 if n > 12 else 9)
    ax.set_yticks(ticks, classes, fontsize=8 if n > 12 else 9)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    if n <= 20:  # numbers stay legible up to about 20 classes
        for i, row in enumerate(rows):
            for j, value in enumerate(row):
                if value >= 1:  # what rounds to 0 stays blank
                    ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if value > 60 else "black")
    return fig


def per_class(classes: Sequence[str], accuracy: Sequence[float], counts: Sequence[int], overall: float,
              title: str) -> Any:
    """Horizontal bars of each class's accuracy, the overall top-1 as a dashed line."""
    n = len(classes)
    fig = _figure(7.5, min(max(3.0, 0.32 * n + 1.4), 30.0))
    ax = fig.subplots()
    y = list(range(n))
    ax.barh(y, [100 * a for a in accuracy], color="C0")
    ax.axvline(100 * overall, color="C3", ls="--", label=f"overall {100 * overall:.2f}%")
    ax.set_yticks(y, [f"{c} (n={k})" for c, k in zip(classes, counts)], fontsize=8 if n > 20 else 9)
    ax.invert_yaxis()
    ax.set(xlim=(0, 100), xlabel="top-1 accuracy (%)", title=title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower left", frameon=True, fontsize=8)
    if n <= 40:
        for i, a in enumerate(accuracy):  # inside the bar's end when it is long, else just past it
            inside = a > 0.85
            ax.text(100 * a + (-1 if inside else 1), i, f"{100 * a:.1f}", va="center", ha="right" if inside else "left",
                    fontsize=7, color="white" if inside else "black")
    return fig


def bench(result: Mapping[str, Any]) -> Any:
    """`bench train`: images/s of mobilebench and the standard pipeline, data alone and whole steps;
    one dot per round over each bar."""
    fig = _figure(9, 3.8)
    axes = fig.subplots(1, 2)
    panels = (("data", "data pipeline alone", "data_ratio"), ("train", "training steps", "train_ratio"))
    for ax, (key, label, ratio_key) in zip(axes, panels):
        ours, theirs = result[f"{key}_images_per_s"], result[f"{key}_baseline_images_per_s"]
        ax.bar([0, 1], [ours, theirs], color=["C0", "C7"], width=0.6)
        rounds = result.get("rounds", {})
        for x, name in ((0, key), (1, f"{key}_baseline")):
            points = rounds.get(name) or []
            ax.plot([x] * len(points), points, "k.", ms=5, alpha=0.6)
        ax.set_xticks([0, 1], ["mobilebench", "standard PyTorch"])
        ax.set(ylabel="images per second", title=f"{label}: {result[ratio_key]:.2f}x")
        ax.grid(axis="y", alpha=0.3)
        for x, v in ((0, ours), (1, theirs)):
            ax.annotate(f"{v:,.0f}", (x, v), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=9)
        ax.margins(y=0.12)
    fig.suptitle(f"bench train: {result['model']} on {result['data']}, batch {result['batch_size']}, "
                 f"{result['device']}", fontsize=10)
    return fig
