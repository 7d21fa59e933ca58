"""`mobilebench export`: ONNX (or a torch.export `.pt2`) with a dynamic batch axis, checked against
PyTorch on real test images before it is declared good."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mobilebench.config import Config
from mobilebench.deploy.common import (
    OUTPUT_NAME,
    Source,
    batches,
    file_bytes,
    load_source,
    mb,
    need_checkpoint,
    quiet,
    random_batch,
    source_data,
    take,
    write_report,
)
from mobilebench.deploy.onnx import batch_dim, export_onnx, onnx_runner, parity, source_metadata
from mobilebench.errors import UserError
from mobilebench.runtime import set_threads
from mobilebench.validate import validate_export

USAGE = "mobilebench export checkpoint=outputs/train/.../checkpoints/best.pt format=onnx"


def export_pt2(model: nn.Module, path: Path, image_size: int) -> Path:
    """Save a torch.export ExportedProgram with a dynamic batch dimension."""
    example = torch.randn(2, 3, image_size, image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet():
        program = torch.export.export(model, (example,), dynamic_shapes=(batch_dim(),))
        torch.export.save(program, str(path))
    return path


def parity_inputs(source: Source, config: Config, n: int, batch_size: int,
                  use_checkpoint_data: bool = True) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """`n` test images from the checkpoint's data (random tensors for a random-weight model)."""
    if source.blob is None:
        return [(random_batch(source, min(n, batch_size), seed=1), None)]
    data = source_data(source, config, use_checkpoint_data)
    return list(batches(take(data.test, n, seed=0), source, batch_size))


def pt2_runner(path: Path) -> Callable[[torch.Tensor], np.ndarray]:
    with quiet():
        module = torch.export.load(str(path)).module()

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return module(x).float().numpy()

    return run


def run_export(config: Config, run_dir: Path, use_checkpoint_data: bool = True) -> dict[str, Any]:
    """Export the checkpoint's plain model, check parity on test images, write export.json."""
    cfg = config.export
    validate_export(cfg)  # the CLI checked it already; a direct caller gets the same one-line errors
    path = need_checkpoint(config, USAGE)
    threads = set_threads(cfg.threads or config.trainer.threads)
    source = load_source(path)
    inputs = parity_inputs(source, config, cfg.parity_images, cfg.batch_size, use_checkpoint_data)
    t0 = time.perf_counter()
    if cfg.format == "onnx":
        out = export_onnx(source.model, run_dir / "model.onnx", source.image_size, cfg.exporter, cfg.opset,
                          metadata=source_metadata(source))  # what predict needs to run the file alone
        export_s = time.perf_counter() - t0
        check = parity(source.model, onnx_runner(out, threads), inputs)
    else:
        out = export_pt2(source.model, run_dir / "model.pt2", source.image_size)
        export_s = time.perf_counter() - t0
        check = parity(source.model, pt2_runner(out), inputs)
    passed = check.ok(cfg.atol, cfg.min_agreement)
    report = {
        "checkpoint": source.checkpoint, "model": source.name, "model_args": source.model_args, "format": cfg.format,
        "exporter": cfg.exporter if cfg.format == "onnx" else "torch.export", "file": str(out),
        "bytes": file_bytes(out), "export_s": round(export_s, 2), "input": source.input_spec(),
        "output": {"name": OUTPUT_NAME, "shape": ["batch", source.num_classes], "meaning": "logits (no softmax)"},
        "threads": threads,
        "parity": {**check.__dict__, "atol": cfg.atol, "min_agreement": cfg.min_agreement, "passed": passed},
    }
    write_report(run_dir, "export.json", report)
    print_export(report)
    if not passed:
        raise UserError(f"parity check failed for {out}: max |diff| {check.max_abs_diff:.3g} (limit {cfg.atol:g}), "
                        f"top-1 agreement {check.agreement:.4%} (limit {cfg.min_agreement:.1%}); see {run_dir / 'export.json'}")
    return report


def print_export(report: dict[str, Any]) -> None:
    from rich.console import Console

    p = report["parity"]
    verdict = "[green]passed[/green]" if p["passed"] else "[red]FAILED[/red]"
    accs = ""
    if p["reference_acc"] is not None:
        accs = f", top-1 PyTorch {p['reference_acc']:.4f} / exported {p['exported_acc']:.4f}"
    console = Console()
    console.print(f"exported [bold]{report['model']}[/bold] ({report['exporter']}) to {report['file']} "
                  f"({mb(report['bytes'])}, dynamic batch, {report['export_s']:.1f}s)")
    console.print(f"parity on {p['images']} test images: max abs diff {p['max_abs_diff']:.2e} (<= {p['atol']:g}), "
                  f"top-1 agreement {p['agreement']:.2%} (>= {p['min_agreement']:.1%}){accs}: {verdict}")
