"""`mobilebench export`: ONNX, a torch.export `.pt2` or an ExecuTorch `.pte` (XNNPACK delegate; with
export.int8=true also a PT2E int8 `.pte`), checked against PyTorch on real test images before it is
declared good."""

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
    runner_accuracy,
    source_data,
    take,
    torch_accuracy,
    write_report,
)
from mobilebench.deploy.onnx import Parity, batch_dim, export_onnx, onnx_runner, parity, source_metadata
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
    if cfg.format == "executorch":
        from mobilebench.deploy.executorch import require_executorch

        require_executorch()  # before any work: one line naming the extra
    threads = set_threads(cfg.threads or config.trainer.threads)
    source = load_source(path)
    inputs = parity_inputs(source, config, cfg.parity_images, cfg.batch_size, use_checkpoint_data)
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if cfg.format == "onnx":
        out = export_onnx(source.model, run_dir / "model.onnx", source.image_size, cfg.exporter, cfg.opset,
                          metadata=source_metadata(source))  # what predict needs to run the file alone
        export_s = time.perf_counter() - t0
        check = parity(source.model, onnx_runner(out, threads), inputs)
    elif cfg.format == "executorch":
        out, export_s, check, extra = export_executorch(source, config, run_dir, inputs, threads, use_checkpoint_data)
    else:
        out = export_pt2(source.model, run_dir / "model.pt2", source.image_size)
        export_s = time.perf_counter() - t0
        check = parity(source.model, pt2_runner(out), inputs)
    passed = check.ok(cfg.atol, cfg.min_agreement)
    exporter = {"onnx": cfg.exporter, "pt2": "torch.export"}.get(cfg.format, "torch.export + ExecuTorch XNNPACK")
    report = {
        "checkpoint": source.checkpoint, "model": source.name, "model_args": source.model_args, "format": cfg.format,
        "exporter": exporter, "file": str(out),
        "bytes": file_bytes(out), "export_s": round(export_s, 2), "input": source.input_spec(),
        "output": {"name": OUTPUT_NAME, "shape": ["batch", source.num_classes], "meaning": "logits (no softmax)"},
        "threads": threads,
        "parity": {**check.__dict__, "atol": cfg.atol, "min_agreement": cfg.min_agreement, "passed": passed},
        **extra,
    }
    write_report(run_dir, "export.json", report)
    print_export(report)
    if not passed:
        raise UserError(f"parity check failed for {out}: max |diff| {check.max_abs_diff:.3g} (limit {cfg.atol:g}), "
                        f"top-1 agreement {check.agreement:.4%} (limit {cfg.min_agreement:.1%}); see {run_dir / 'export.json'}")
    int8 = report.get("int8")
    if int8 and not int8["parity"]["passed"]:
        raise UserError(f"int8 check failed for {int8['file']}: top-1 agreement with PyTorch {int8['parity']['agreement']:.4%} "
                        f"(limit export.int8_min_agreement={int8['parity']['min_agreement']:.0%}); see {run_dir / 'export.json'}")
    return report


def export_executorch(source: Source, config: Config, run_dir: Path, inputs: list[tuple[torch.Tensor, torch.Tensor | None]],
                      threads: int, use_checkpoint_data: bool) -> tuple[Path, float, Parity, dict[str, Any]]:
    """model.pte (fp32, XNNPACK) and, with export.int8, model_int8.pte (PT2E int8); both carry the
    class names and preprocessing (`deploy.executorch`), both run in executorch.runtime here."""
    from mobilebench.deploy import executorch as et

    t0 = time.perf_counter()
    metadata = source_metadata(source)
    out = run_dir / "model.pte"
    delegation = et.lower_to_pte(et.export_program(source.model, source.image_size), out, metadata)
    export_s = time.perf_counter() - t0
    et_threads = et.set_threads(threads)
    fp32 = et.pte_runner(out)
    check = parity(source.model, fp32, inputs)
    extra: dict[str, Any] = {
        "runtime": f"executorch {_version()} (executorch.runtime, XNNPACK delegate)", "executorch_threads": et_threads,
        "batch": {"dynamic": True, "min": 1, "max": delegation["max_batch"],
                  "note": "the program takes 1..max images per call; larger batches are run in pieces of max"},
        "metadata": {"method": et.METADATA_METHOD, "keys": sorted(metadata)},
        "delegation": delegation,
    }
    if config.export.int8:
        extra["int8"] = export_int8(source, config, run_dir, inputs, metadata, fp32, use_checkpoint_data)
        extra["int8"]["size_ratio_fp32_over_int8"] = round(file_bytes(out) / extra["int8"]["bytes"], 2)
    return out, export_s, check, extra


def export_int8(source: Source, config: Config, run_dir: Path, inputs: list[tuple[torch.Tensor, torch.Tensor | None]],
                metadata: dict[str, str], fp32: Callable[[torch.Tensor], np.ndarray], use_checkpoint_data: bool) -> dict[str, Any]:
    """PT2E int8 (XNNPACK quantizer) calibrated on quantize.calib_size training images -> model_int8.pte."""
    from mobilebench.deploy import executorch as et
    from mobilebench.deploy.int8 import calibration_arrays

    t0 = time.perf_counter()
    calibration = (torch.from_numpy(a) for a in calibration_arrays(source, config, config.quantize, use_checkpoint_data))
    program, seen = et.quantize_program(source.model, source.image_size, calibration)
    meta = {**metadata, "mobilebench.quantization": "int8 PT2E, XNNPACKQuantizer symmetric per-channel"} if metadata else None
    out = run_dir / "model_int8.pte"
    delegation = et.lower_to_pte(program, out, meta)
    export_s = time.perf_counter() - t0
    int8 = et.pte_runner(out)
    check = parity(source.model, int8, inputs)
    report = {"file": str(out), "bytes": file_bytes(out), "export_s": round(export_s, 2), "calib_images": seen,
              "quantizer": "XNNPACKQuantizer, get_symmetric_quantization_config(is_per_channel=True): int8 weights "
                           "per output channel, int8 activations per tensor (PT2E prepare/convert)",
              "convs": delegation.pop("convs"), "delegation": delegation,
              "parity": {"images": check.images, "agreement": check.agreement, "max_abs_diff": check.max_abs_diff,
                         "min_agreement": config.export.int8_min_agreement,
                         "passed": check.agreement >= config.export.int8_min_agreement,
                         "note": "top-1 agreement with PyTorch only: int8 moves the logits by design"},
              "accuracy": None}
    if source.blob is not None:  # labelled test images: accuracy of PyTorch, the fp32 and the int8 program
        data = source_data(source, config, use_checkpoint_data)
        test = take(data.test, config.quantize.test_images, seed=0)
        bs = config.export.batch_size
        accs = {"pytorch": torch_accuracy(source.model, test, source, bs),
                **{name: runner_accuracy(run, test, source, bs) for name, run in (("fp32", fp32), ("int8", int8))}}
        report["accuracy"] = {"images": len(test), **{name: round(acc, 4) for name, acc in accs.items()}}
    return report


def _version() -> str:
    from executorch.version import __version__

    return __version__.split("+")[0]


def print_export(report: dict[str, Any]) -> None:
    from rich.console import Console

    p = report["parity"]
    verdict = "[green]passed[/green]" if p["passed"] else "[red]FAILED[/red]"
    accs = ""
    if p["reference_acc"] is not None:
        accs = f", top-1 PyTorch {p['reference_acc']:.4f} / exported {p['exported_acc']:.4f}"
    console = Console()
    batch = f"batch 1..{report['batch']['max']}, larger in pieces" if "batch" in report else "dynamic batch"
    console.print(f"exported [bold]{report['model']}[/bold] ({report['exporter']}) to {report['file']} "
                  f"({mb(report['bytes'])}, {batch}, {report['export_s']:.1f}s)")
    if "delegation" in report:
        console.print(delegation_line(report["delegation"], report["executorch_threads"]))
    console.print(f"parity on {p['images']} test images: max abs diff {p['max_abs_diff']:.2e} (<= {p['atol']:g}), "
                  f"top-1 agreement {p['agreement']:.2%} (>= {p['min_agreement']:.1%}){accs}: {verdict}")
    q = report.get("int8")
    if q:
        c, qp = q["convs"]["conv"], q["parity"]
        console.print(f"int8 [bold]{q['file']}[/bold] ({mb(q['bytes'])}, {report['bytes'] / q['bytes']:.1f}x smaller, "
                      f"{q['calib_images']} calibration images, {q['export_s']:.1f}s): {c['int8']} of "
                      f"{c['int8'] + c['float']} convolutions int8; " + delegation_line(q["delegation"]))
        verdict = "[green]passed[/green]" if qp["passed"] else "[red]FAILED[/red]"
        console.print(f"int8 top-1 agreement with PyTorch on {qp['images']} test images {qp['agreement']:.2%} "
                      f"(>= {qp['min_agreement']:.0%}; max abs diff {qp['max_abs_diff']:.3g}, not checked): {verdict}")
        if q["accuracy"]:
            a = q["accuracy"]
            console.print(f"test top-1 on {a['images']} images: PyTorch {a['pytorch']:.4f}, fp32 .pte {a['fp32']:.4f}, "
                          f"int8 .pte {a['int8']:.4f}")


def delegation_line(d: dict[str, Any], threads: int | None = None) -> str:
    left = ", ".join(f"{op} x{n}" for op, n in d["non_delegated_ops"].items()) or "none"
    where = f" ({threads} runtime threads)" if threads else ""
    return (f"XNNPACK delegates {d['delegated_nodes']} nodes in {d['delegates']} subgraph(s), "
            f"{d['non_delegated_nodes']} left outside: {left}{where}")
