"""eval.json and its pictures, written by `eval` and by `train` for its final test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mobilebench import pictures
from mobilebench.config import DataConfig
from mobilebench.engine import EvalResult
from mobilebench.runfiles import write_json_atomic


def eval_report(checkpoint: str, blob: dict[str, Any], data_cfg: DataConfig, classes: list[str], result: EvalResult,
                tta: str, flipped: EvalResult | None) -> dict[str, Any]:
    """eval.json: the same keys whether or not TTA ran (its figures are null without it), like summary.json."""
    return {
        "checkpoint": str(checkpoint), "model": blob["model_args"]["name"], "model_args": blob["model_args"],
        "data": data_cfg.name, "data_root": data_cfg.root, "split": "test", "images": result.images,
        "test_acc": result.acc, "test_top5": result.top5, "test_loss": result.loss, "tta": tta,
        "test_acc_tta": flipped.acc if flipped else None, "test_top5_tta": flipped.top5 if flipped else None,
        "per_class_acc": dict(zip(classes, result.per_class_acc)), "classes": classes,
        "confusion": result.confusion.tolist(),
    }


def write_eval_files(run_dir: Path, report: dict[str, Any]) -> list[Path]:
    """eval.json, confusion.png and per_class.png (the PNGs only with matplotlib); the paths written."""
    run_dir.mkdir(parents=True, exist_ok=True)
    written = [run_dir / "eval.json"]
    write_json_atomic(written[0], report)
    classes, counts = report["classes"], report["confusion"]
    what = f"{report['model']} on {report['data']} test ({report['images']:,} images)"
    for png in (pictures.draw(run_dir / "confusion.png", pictures.confusion, classes, counts,
                              f"confusion matrix (row-normalized): {what}"),
                pictures.draw(run_dir / "per_class.png", pictures.per_class, classes,
                              [report["per_class_acc"][c] for c in classes], [sum(row) for row in counts],
                              report["test_acc"], f"per-class accuracy: {what}")):
        if png is not None:
            written.append(png)
    return written
