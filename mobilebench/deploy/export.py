"""`mobilebench export`: ONNX (or a torch.export `.pt2`) with a dynamic batch axis, checked against
PyTorch on real test images before it is declared good."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from mobilebench.config import Config
from mobilebench.deploy.common import (
    INPUT_NAME,
    OUTPUT_NAME,
    Source,
    batches,
    file_bytes,
    load_source,
    mb,
    need_checkpoint,
    ort_run,
    ort_session,
    parse_section,
    quiet,
    random_batch,
    require,
    set_threads,
    source_data,
    take,
    write_report,
)
from mobilebench.errors import UserError

FORMATS = ("onnx", "pt2")
EXPORTERS = ("dynamo", "torchscript")
USAGE = "mobilebench export checkpoint=outputs/train/.../checkpoints/best.pt format=onnx"


@dataclass
class ExportConfig:
    format: str = "onnx"  # onnx | pt2 (torch.export)
    exporter: str = "dynamo"  # ONNX only: dynamo (torch.export based, the default) | torchscript (legacy, ~5x faster to run)
    opset: Optional[int] = None  # None: the exporter's default
    parity_images: int = 1000  # test images compared between PyTorch and the exported model
    batch_size: int = 250
    atol: float = 1e-4  # max |logit difference| allowed
    min_agreement: float = 0.999  # fraction of images whose top-1 class must agree
    threads: Optional[int] = None  # None: trainer.threads, else PyTorch's default


def parse_export(values: dict[str, Any]) -> ExportConfig:
    cfg = parse_section(ExportConfig, values, "export")
    if cfg.format not in FORMATS:
        raise UserError(f"export.format={cfg.format!r} is not valid; choose one of: {', '.join(FORMATS)}")
    if cfg.exporter not in EXPORTERS:
        raise UserError(f"export.exporter={cfg.exporter!r} is not valid; choose one of: {', '.join(EXPORTERS)}")
    if cfg.parity_images < 1 or cfg.batch_size < 1:
        raise UserError("export.parity_images and export.batch_size must be >= 1")
    if not 0.0 < cfg.min_agreement <= 1.0 or cfg.atol <= 0:
        raise UserError("export.min_agreement must be in (0, 1] and export.atol > 0")
    return cfg


def _batch_dim() -> dict[int, Any]:
    return {0: torch.export.Dim("batch", min=1, max=65536)}


def export_onnx(model: nn.Module, path: Path, image_size: int, exporter: str = "dynamo", opset: int | None = None) -> Path:
    """Write `model` as ONNX taking a normalised float NCHW batch of any size; returns `path`."""
    require("onnx")
    example = torch.randn(2, 3, image_size, image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME]}
    if opset is not None:
        kwargs["opset_version"] = opset
    try:
        with quiet(), torch.no_grad():
            if exporter == "dynamo":
                require("onnxscript")
                torch.onnx.export(model, (example,), str(path), dynamo=True, dynamic_shapes=(_batch_dim(),),
                                  external_data=False, **kwargs)
            else:
                torch.onnx.export(model, (example,), str(path), dynamo=False,
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, **kwargs)
    except UserError:
        raise
    except Exception as err:  # the exporters raise many types; the first line says what went wrong
        raise UserError(f"ONNX export ({exporter}) failed: {str(err).strip().splitlines()[0]}") from None
    return path


def export_pt2(model: nn.Module, path: Path, image_size: int) -> Path:
    """Save a torch.export ExportedProgram with a dynamic batch dimension."""
    example = torch.randn(2, 3, image_size, image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet():
        program = torch.export.export(model, (example,), dynamic_shapes=(_batch_dim(),))
        torch.export.save(program, str(path))
    return path


@dataclass
class Parity:
    images: int
    max_abs_diff: float
    agreement: float  # fraction of images with the same top-1 class
    reference_acc: float | None  # PyTorch top-1 on these images (None without labels)
    exported_acc: float | None

    def ok(self, atol: float, min_agreement: float) -> bool:
        return self.max_abs_diff <= atol and self.agreement >= min_agreement


def parity(reference: nn.Module, run: Callable[[torch.Tensor], np.ndarray],
           inputs: list[tuple[torch.Tensor, torch.Tensor | None]]) -> Parity:
    """Compare logits of the exported model with PyTorch's on the same batches.

    A single-image batch is run too, so a batch axis that was accidentally fixed fails here.
    """
    diff, same, correct_ref, correct_exp, total = 0.0, 0, 0, 0, 0
    labelled = all(y is not None for _, y in inputs)
    first = inputs[0][0][:1]
    for x, y in [(first, None if not labelled else inputs[0][1][:1]), *inputs]:
        with torch.inference_mode():
            ref = reference(x).float().numpy()
        out = np.asarray(run(x), dtype=np.float32)
        if out.shape != ref.shape:
            raise UserError(f"the exported model returned shape {out.shape} for input {tuple(x.shape)}, PyTorch {ref.shape}")
        diff = max(diff, float(np.abs(out - ref).max()))
        if x is first:
            continue
        same += int((out.argmax(1) == ref.argmax(1)).sum())
        if labelled:
            correct_ref += int((ref.argmax(1) == y.numpy()).sum())
            correct_exp += int((out.argmax(1) == y.numpy()).sum())
        total += len(x)
    return Parity(total, diff, same / max(total, 1), correct_ref / total if labelled else None,
                  correct_exp / total if labelled else None)


def parity_inputs(source: Source, config: Config, n: int, batch_size: int,
                  use_checkpoint_data: bool = True) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """`n` test images from the checkpoint's data (random tensors for a random-weight model)."""
    if source.blob is None:
        return [(random_batch(source, min(n, batch_size), seed=1), None)]
    data = source_data(source, config, use_checkpoint_data)
    return list(batches(take(data.test, n, seed=0), source, batch_size))


def onnx_runner(path: Path, threads: int) -> Callable[[torch.Tensor], np.ndarray]:
    session = ort_session(path, threads)
    return lambda x: ort_run(session, x)


def pt2_runner(path: Path) -> Callable[[torch.Tensor], np.ndarray]:
    with quiet():
        module = torch.export.load(str(path)).module()

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return module(x).float().numpy()

    return run


def run_export(config: Config, run_dir: Path, use_checkpoint_data: bool = True) -> dict[str, Any]:
    cfg = parse_export(config.export)
    path = need_checkpoint(config, USAGE)
    threads = set_threads(cfg.threads or config.trainer.threads)
    source = load_source(path)
    inputs = parity_inputs(source, config, cfg.parity_images, cfg.batch_size, use_checkpoint_data)
    t0 = time.perf_counter()
    if cfg.format == "onnx":
        out = export_onnx(source.model, run_dir / "model.onnx", source.image_size, cfg.exporter, cfg.opset)
        export_s = time.perf_counter() - t0
        check = parity(source.model, onnx_runner(out, threads), inputs)
    else:
        out = export_pt2(source.model, run_dir / "model.pt2", source.image_size)
        export_s = time.perf_counter() - t0
        check = parity(source.model, pt2_runner(out), inputs)
    passed = check.ok(cfg.atol, cfg.min_agreement)
    report = {
        "checkpoint": path, "model": source.name, "model_args": source.model_args, "format": cfg.format,
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
