"""The table as report.md, report.csv and a terminal table."""

from __future__ import annotations

import csv
import io
import math
from datetime import datetime
from pathlib import Path
from typing import Any

from mobilebench.report.aggregate import dataset_id
from mobilebench.report.runs import Run, get_path, shown_path

# --- output ------------------------------------------------------------------------------

CSV_COLUMNS = ("model", "config", "status", "n", "seeds", "data", "epochs", "epochs_done", "train_images", "params_m",
               "image_size", "macs_m", "macs_224_m", "best_val_acc_mean", "best_val_acc_std", "test_acc_mean",
               "test_acc_std", "test_acc_tta_mean", "test_acc_tta_std", "train_min_mean", "images_per_s_mean", "device", "int8_test_acc_mean",
               "int8_test_acc_std", "int8_drop_pts", "latency_ms_mean", "int8_latency_ms_mean", "latency_batch",
               "latency_backend", "run_dirs")


LEFT_COLUMNS = ("model", "config", "status", "device")


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _pm(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def _status_text(v: dict[str, Any]) -> str:
    if v["status"] == "completed":
        return "completed"
    done = v["epochs_done"]
    return f"{v['status']} ({done}/{v['epochs']} epochs)" if done is not None and v["epochs"] else v["status"]


def display_table(values: list[dict[str, Any]], image_size: Any) -> tuple[list[str], list[list[str]]]:
    """Header and cells shared by report.md and the terminal; optional columns only when filled."""
    res = f"{image_size}px" if image_size else "train res"
    cols: list[tuple[str, Any]] = [("model", lambda v: v["model"])]
    if any(v["config"] for v in values):
        cols.append(("config", lambda v: v["config"] or "—"))
    cols += [
        ("status", _status_text),
        ("n", lambda v: str(v["n"])),
        ("params (M)", lambda v: _fmt(v["params_m"])),
        (f"MACs (M) @{res}", lambda v: _fmt(v["macs_m"], 1)),
        ("MACs (M) @224px, same net", lambda v: _fmt(v["macs_224_m"], 0)),
        ("best val acc (%)", lambda v: _pm(v["best_val_acc_mean"], v["best_val_acc_std"])),
        ("test acc (%)", lambda v: _pm(v["test_acc_mean"], v["test_acc_std"])),
    ]
    if any(v["test_acc_tta_mean"] is not None for v in values):
        cols.append(("test acc, flip TTA (%)", lambda v: _pm(v["test_acc_tta_mean"], v["test_acc_tta_std"])))
    cols += [
        ("train time (min)", lambda v: _fmt(v["train_min_mean"], 1)),
        ("images/s", lambda v: _fmt(v["images_per_s_mean"], 0)),
        ("device", lambda v: v["device"] or "—"),
    ]
    if any(v["int8_test_acc_mean"] is not None for v in values):
        cols.append(("int8 acc (%)", lambda v: _pm(v["int8_test_acc_mean"], v["int8_test_acc_std"])))
    if any(v["int8_drop_pts"] is not None for v in values):
        cols.append(("int8 drop (pts)", lambda v: _fmt(v["int8_drop_pts"], 2)))
    if any(v["latency_ms_mean"] is not None for v in values):
        cols.append(("latency fp32 (ms)", lambda v: _fmt(v["latency_ms_mean"], 2)))
    if any(v["int8_latency_ms_mean"] is not None for v in values):
        cols.append(("latency int8 (ms)", lambda v: _fmt(v["int8_latency_ms_mean"], 2)))
    return [c for c, _ in cols], [[f(v) for _, f in cols] for v in values]


def markdown_table(header: list[str], cells: list[list[str]]) -> str:
    def line(items: list[str]) -> str:
        return "| " + " | ".join(i.replace("|", "\\|") for i in items) + " |"

    align = ["---" if h in LEFT_COLUMNS else "---:" for h in header]
    return "\n".join([line(header), "| " + " | ".join(align) + " |", *(line(c) for c in cells)]) + "\n"


def write_csv(values: list[dict[str, Any]], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for v in values:
        writer.writerow({k: ("" if v.get(k) is None else round(v[k], 4) if isinstance(v[k], float) else v[k])
                         for k in CSV_COLUMNS})
    path.write_text(buf.getvalue())


def shared_settings(runs: list[Run]) -> list[str]:
    """Facts every run agrees on, stated once above the table (data, subset, epochs, software)."""
    facts = []
    for label, get in (("data", dataset_id), ("train / val / test images", _split_sizes),
                       ("epochs", lambda r: r.summary.get("epochs", get_path(r.config, "trainer.epochs"))),
                       ("batch", lambda r: r.summary.get("global_batch_size")),
                       ("precision", lambda r: r.summary.get("precision")),
                       ("threads", lambda r: r.summary.get("threads")),
                       ("torch", lambda r: r.summary.get("torch"))):
        seen = {str(get(r)) for r in runs if get(r) is not None}
        if len(seen) == 1:
            facts.append(f"{label}: {seen.pop()}")
    return facts


def _split_sizes(run: Run) -> str | None:
    s = run.summary
    if s.get("train_images") is None:
        return None
    return f"{s['train_images']} / {s.get('val_images')} / {s.get('test_images')}"


def markdown_report(header: list[str], cells: list[list[str]], runs: list[Run], values: list[dict[str, Any]],
                    plots: list[str], command: str) -> str:
    lines = ["# MobileNet comparison", "",
             f"Generated {datetime.now().astimezone():%Y-%m-%d %H:%M %Z} by `{command}` from {plural(len(runs), 'run')}.", ""]
    facts = shared_settings(runs)
    if facts:
        lines += ["Shared by every run: " + "; ".join(facts) + ".", ""]
    lines += [markdown_table(header, cells),
              "Accuracies are mean ± sample std over the n runs of a row (seeds listed in report.csv). "
              "Best val acc uses the EMA weights when the run kept an EMA; test acc is the best-val checkpoint on the test split. "
              "MACs @224px is the same network (same stem and width) on a 224x224 input, not the ImageNet-stem model. "
              "Train time excludes evaluation; images/s is training throughput.", ""]
    unfinished = [v for v in values if v["status"] != "completed"]
    if unfinished:
        lines += [f"{len(unfinished)} run(s) did not complete and are listed with their status; their accuracies are "
                  "the best validation so far and count in no mean.", ""]
    if any(r.deploy.sources for r in runs):
        lines += ["int8 accuracy (and its drop against fp32 on the same images) and latency (median per batch at "
                  "the smallest batch timed, see report.csv) come from: "
                  + ", ".join(f"`{shown_path(Path(s))}`" for r in runs for s in r.deploy.sources) + ".", ""]
    for name in plots:
        lines += [f"![{name}]({name})", ""]
    return "\n".join(lines)


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def print_table(header: list[str], cells: list[list[str]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="left" if h in LEFT_COLUMNS else "right")
    for c in cells:
        table.add_row(*c)
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # piped into a file or a log, rich would squeeze the table into 80 columns
    console.print(table)
