"""`mobilebench eval`: top-1, top-5, per-class accuracy and the confusion matrix of a checkpoint
(eval.json, confusion.png, per_class.png)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mobilebench.accel import set_cpu_allocator
from mobilebench.checkpoint import (
    checkpoint_data_config,
    load_model_and_checkpoint,
    resolve_checkpoint,
)
from mobilebench.config import Config
from mobilebench.data import load_data
from mobilebench.engine import EvalResult, evaluate_views
from mobilebench.errors import UserError
from mobilebench.loader import eval_batches
from mobilebench.results import eval_report, write_eval_files
from mobilebench.runtime import (
    PRECISION_DTYPES,
    resolve_device,
    resolve_precision,
    set_threads,
)


def run_eval(cfg: Config, run_dir: Path, use_checkpoint_data: bool = False) -> float:
    """Score `cfg.checkpoint` on the test split, print the tables and write eval.json; returns top-1."""
    if not cfg.checkpoint:
        raise UserError("eval needs a checkpoint: mobilebench eval checkpoint=outputs/.../checkpoints/best.pt")
    set_threads(cfg.trainer.threads)
    set_cpu_allocator(cfg.trainer.cpu_allocator)
    device = resolve_device(cfg.trainer.device)
    amp_dtype = PRECISION_DTYPES[resolve_precision(cfg.trainer.precision, device)]
    checkpoint = str(resolve_checkpoint(cfg.checkpoint))
    model, blob = load_model_and_checkpoint(checkpoint, device)  # a plain model: no training fast paths
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    data_cfg = checkpoint_data_config(blob) if use_checkpoint_data else cfg.data
    data = load_data(data_cfg)
    num_classes = blob["model_args"]["num_classes"]
    if data.num_classes != num_classes:
        raise UserError(f"checkpoint {checkpoint} predicts {num_classes} classes but data {data_cfg.name} has {data.num_classes}; "
                        "pass the data the model was trained on")
    stats = blob.get("data", {})
    mean, std = stats.get("mean", data.mean), stats.get("std", data.std)  # the model's training normalisation
    resize = blob.get("config", {}).get("augment", {}).get("resize")
    batches = eval_batches(data.test, data_cfg.batch_size * 2, mean, std, device, cfg.trainer.channels_last, resize)
    result, flipped = evaluate_views(model, batches, num_classes, device, amp_dtype, cfg.trainer.tta)
    report = eval_report(checkpoint, blob, data_cfg, data.classes, result, cfg.trainer.tta, flipped)
    write_eval_files(run_dir, report)
    print_eval(report, result)
    return result.acc


def print_eval(report: dict[str, Any], result: EvalResult) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{report['model']}[/bold] on {report['data']} test ({report['images']} images): "
                  f"top-1 {report['test_acc']:.4f}  top-5 {report['test_top5']:.4f}  loss {report['test_loss']:.4f}")
    if report["test_acc_tta"] is not None:
        console.print(f"with {report['tta']} TTA: top-1 {report['test_acc_tta']:.4f}  top-5 {report['test_top5_tta']:.4f}")
    classes = report["classes"]
    per_class = Table(title="per-class accuracy")
    per_class.add_column("class")
    per_class.add_column("accuracy", justify="right")
    per_class.add_column("images", justify="right")
    for name, acc, count in zip(classes, result.per_class_acc, result.confusion.sum(1).tolist()):
        per_class.add_row(name, f"{acc:.4f}", str(count))
    console.print(per_class)
    if len(classes) > 20:
        console.print(f"confusion matrix ({len(classes)} classes) is in eval.json")
        return
    confusion = Table(title="confusion matrix (rows: true class, columns: predicted)")
    confusion.add_column("")
    for name in classes:
        confusion.add_column(name[:6], justify="right")
    for name, row in zip(classes, result.confusion.tolist()):
        confusion.add_row(name, *[str(v) for v in row])
    console.print(confusion)
