"""`mobilebench quantize`: an int8 model whose convolutions really are int8, with its cost measured.

`method=static` exports the fp32 ONNX graph, calibrates activation ranges on training images and
writes an onnxruntime QDQ model (per-channel int8 weights, uint8 activations); onnxruntime fuses
each DequantizeLinear -> Conv -> QuantizeLinear into a QLinearConv at load time.

`method=dynamic` runs the tutorial's `torch.ao.quantization.quantize_dynamic(model, {nn.Linear,
nn.Conv2d})` and reports what it actually did: dynamic quantization has no Conv2d kernel, so only
the Linear layers change.

`method=qat` fine-tunes the model with fake-quantization (torchao's PT2E QAT flow, deploy/qat.py)
and lowers the int8 result to an ExecuTorch program (XNNPACK), next to a post-training int8 one
calibrated the usual way, so the report shows what the fine-tune bought.
"""

from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mobilebench.config import Config, QuantizeConfig
from mobilebench.deploy import qat
from mobilebench.deploy.common import (
    Source,
    batches,
    file_bytes,
    load_source,
    mb,
    need_checkpoint,
    random_batch,
    require,
    runner_accuracy,
    source_data,
    state_bytes,
    take,
    torch_accuracy,
    write_report,
)
from mobilebench.deploy.executorch import lower_to_pte, pte_runner, quantize_program, require_executorch
from mobilebench.deploy.int8 import calibration_arrays, conv_report, quantize_static, runtime_ops
from mobilebench.deploy.onnx import (
    export_onnx,
    onnx_runner,
    ort_accuracy,
    ort_run,
    ort_session,
    parity,
    source_metadata,
)
from mobilebench.deploy.qat_ranges import calibrate_activation_ranges
from mobilebench.deploy.timing import summarize, time_interleaved
from mobilebench.errors import UserError
from mobilebench.machine import machine_note
from mobilebench.runtime import set_threads
from mobilebench.validate import validate_quantize

USAGE = "mobilebench quantize checkpoint=outputs/train/.../checkpoints/best.pt method=static"


# --- reports ----------------------------------------------------------------------------


def latency_pair(runners: dict[str, Any], make_input: Any, batch_sizes: list[int], warmup: int,
                 repeats: int) -> dict[str, dict[str, dict[str, float]]]:
    """{batch: {runner: summary}} with the runners timed side by side."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for bs in batch_sizes:
        x = make_input(bs)
        timed = time_interleaved({name: (lambda run=run: run(x)) for name, run in runners.items()}, warmup, repeats)
        out[str(bs)] = {name: summarize(seconds, bs) for name, seconds in timed.items()}
    return out


def _speedups(latency: dict[str, dict[str, dict[str, float]]], before: str, after: str) -> dict[str, float]:
    return {bs: round(row[before]["median_ms"] / row[after]["median_ms"], 2) for bs, row in latency.items()}


def run_quantize(config: Config, run_dir: Path, use_checkpoint_data: bool = True) -> dict[str, Any]:
    """Quantize the checkpoint's plain model (static: onnxruntime int8; dynamic: torch) and report it."""
    cfg = config.quantize
    validate_quantize(cfg)  # the CLI checked it already; a direct caller gets the same one-line errors
    path = need_checkpoint(config, USAGE)
    if cfg.method == "qat":
        require_executorch()  # before any work: one line naming the `mobile` extra
    threads = set_threads(cfg.threads or config.trainer.threads)
    source = load_source(path)
    data = source_data(source, config, use_checkpoint_data)
    test = take(data.test, cfg.test_images, seed=0)
    common = {"checkpoint": source.checkpoint, "model": source.name, "model_args": source.model_args, "method": cfg.method,
              "test_images": len(test), "threads": threads, "input": source.input_spec(),
              "machine": machine_note()}
    if cfg.method == "dynamic":
        report = {**common, **_run_dynamic(source, test, cfg, run_dir)}
    elif cfg.method == "qat":
        report = {**common, **_run_qat(source, config, data.train, test, cfg, run_dir, threads, use_checkpoint_data)}
    else:
        report = {**common, **_run_static(source, config, test, cfg, run_dir, threads, use_checkpoint_data)}
    write_report(run_dir, "quantize.json", report)
    print_quantize(report)
    return report


def _run_static(source: Source, config: Config, test: Any, cfg: QuantizeConfig, run_dir: Path, threads: int,
                use_checkpoint_data: bool) -> dict[str, Any]:
    fp32 = export_onnx(source.model, run_dir / "model.onnx", source.image_size, cfg.exporter,
                       metadata=source_metadata(source))  # quantize_static copies it into the int8 model
    check = parity(source.model, onnx_runner(fp32, threads), [next(iter(batches(take(test, 64), source, 64)))])
    if check.max_abs_diff > 1e-3:
        raise UserError(f"the fp32 ONNX export differs from PyTorch by {check.max_abs_diff:.3g}; run `mobilebench export` to see the parity report")
    int8 = run_dir / "model.int8.onnx"
    arrays = calibration_arrays(source, config, cfg, use_checkpoint_data)
    choice = quantize_static(fp32, int8, arrays, cfg, source.name)
    onnx = require("onnx")
    graph_report = conv_report(onnx.load(str(int8)).graph)
    s32, s8 = ort_session(fp32, threads), ort_session(int8, threads)
    acc = {"pytorch_fp32": torch_accuracy(source.model, test, source, cfg.eval_batch),
           "onnx_fp32": ort_accuracy(s32, test, source, cfg.eval_batch),
           "onnx_int8": ort_accuracy(s8, test, source, cfg.eval_batch)}
    latency = latency_pair({"onnx_fp32": lambda x: ort_run(s32, x), "onnx_int8": lambda x: ort_run(s8, x)},
                           lambda bs: random_batch(source, bs).numpy(), cfg.latency_batches, cfg.warmup, cfg.repeats)
    return {
        "files": {"fp32": str(fp32), "int8": str(int8)},
        "quantization": {"format": "QDQ", "weights": "int8, per-channel" if cfg.per_channel else "int8, per-tensor",
                         "activations": "uint8, per-tensor", "calibration": cfg.calib_method,
                         "calib_images": sum(len(a) for a in arrays), "preprocess": cfg.preprocess, **choice},
        "graph": graph_report, "runtime_ops": runtime_ops(int8, threads),
        "accuracy": {**acc, "drop_points": round((acc["onnx_fp32"] - acc["onnx_int8"]) * 100, 2)},
        "size_bytes": {"before": file_bytes(fp32), "after": file_bytes(int8)},
        "latency": latency, "speedup": _speedups(latency, "onnx_fp32", "onnx_int8"),
        "before": "onnxruntime fp32", "after": "onnxruntime int8",
    }


def _run_qat(source: Source, config: Config, train: Any, test: Any, cfg: QuantizeConfig, run_dir: Path, threads: int,
             use_checkpoint_data: bool) -> dict[str, Any]:
    metadata = source_metadata(source)
    arrays = calibration_arrays(source, config, cfg, use_checkpoint_data)
    t0 = time.perf_counter()
    prepared = qat.prepare_qat(source)
    calibrated = calibrate_activation_ranges(prepared, source.model, arrays) if cfg.qat_ranges == "histogram" else 0
    tune = qat.finetune(prepared, train, source, cfg)
    converted = qat.convert_qat(prepared, source)
    qat_s = time.perf_counter() - t0
    program = qat.inference_program(converted, source)
    qat_pte, ptq_pte = run_dir / "model_qat_int8.pte", run_dir / "model_ptq_int8.pte"
    delegation = {"qat": lower_to_pte(program, qat_pte, metadata)}
    ptq, calib_images = quantize_program(source.model, source.image_size, arrays)  # as export format=executorch int8=true
    delegation["ptq"] = lower_to_pte(ptq, ptq_pte, metadata)
    onnx_path, onnx_report = qat.export_onnx_qdq(program, run_dir / "model_qat_int8.onnx", metadata, threads)
    acc = {"pytorch_fp32": torch_accuracy(source.model, test, source, cfg.eval_batch),
           "pytorch_qat_int8": qat.graph_accuracy(converted, test, source, cfg.eval_batch),
           "executorch_ptq_int8": runner_accuracy(pte_runner(ptq_pte, threads), test, source, cfg.eval_batch),
           "executorch_qat_int8": runner_accuracy(pte_runner(qat_pte, threads), test, source, cfg.eval_batch)}
    if onnx_path is not None:
        acc["onnx_qat_int8"] = ort_accuracy(ort_session(onnx_path, threads), test, source, cfg.eval_batch)
    points = {key: round((acc["pytorch_fp32"] - acc[f"executorch_{key}_int8"]) * 100, 2) for key in ("ptq", "qat")}
    return {
        "files": {"qat_int8": str(qat_pte), "ptq_int8": str(ptq_pte), "onnx_qat_int8": str(onnx_path) if onnx_path else None},
        "quantization": {"flow": "torchao PT2E: prepare_qat_pt2e -> fine-tune -> convert_pt2e -> XNNPACK .pte",
                         "quantizer": "XNNPACKQuantizer, get_symmetric_quantization_config(is_per_channel=True, is_qat=True); "
                                      "PTQ: the same with is_qat=False",
                         "weights": "int8, per-channel, BatchNorm folded", "activations": "int8, per-tensor",
                         "calib_images": calib_images},
        "qat": {**tune, "activation_ranges": cfg.qat_ranges, "activation_quantizers_calibrated": calibrated,
                "prepare_train_convert_seconds": round(qat_s, 1)},
        "accuracy": {**acc, "drop_points": points["qat"], "ptq_drop_points": points["ptq"],
                     "qat_gain_points": round(points["ptq"] - points["qat"], 2)},
        "size_bytes": {"fp32_state_dict": state_bytes(source.model), "ptq_int8": file_bytes(ptq_pte),
                       "qat_int8": file_bytes(qat_pte)},
        "delegation": delegation, "onnx_qdq": {"file": str(onnx_path) if onnx_path else None, **onnx_report},
        "before": "PyTorch fp32", "after": "ExecuTorch int8 (QAT)",
    }


def dynamic_layers(before: nn.Module, after: nn.Module) -> dict[str, dict[str, int]]:
    """Per layer type, how many modules quantize_dynamic actually replaced."""
    replaced = dict(after.named_modules())
    out: dict[str, dict[str, int]] = {}
    for name, module in before.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            row = out.setdefault(type(module).__name__, {"total": 0, "quantized": 0})
            row["total"] += 1
            row["quantized"] += int(type(replaced.get(name)) is not type(module))
    return out


def _run_dynamic(source: Source, test: Any, cfg: QuantizeConfig, run_dir: Path) -> dict[str, Any]:
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
        qmodel = quantize_dynamic(copy.deepcopy(source.model), {nn.Linear, nn.Conv2d}, dtype=torch.qint8)
    layers = dynamic_layers(source.model, qmodel)
    size = {"before": state_bytes(source.model, run_dir / "model.fp32_state.pt"),
            "after": state_bytes(qmodel, run_dir / "model.dynamic_int8_state.pt")}
    acc = {"pytorch_fp32": torch_accuracy(source.model, test, source, cfg.eval_batch),
           "pytorch_dynamic_int8": torch_accuracy(qmodel, test, source, cfg.eval_batch)}

    def eager(model: nn.Module) -> Any:
        def run(x: torch.Tensor) -> Any:
            with torch.inference_mode():
                return model(x)
        return run

    latency = latency_pair({"pytorch_fp32": eager(source.model), "pytorch_dynamic_int8": eager(qmodel)},
                           lambda bs: random_batch(source, bs), cfg.latency_batches, cfg.warmup, cfg.repeats)
    conv = layers.get("Conv2d", {"total": 0, "quantized": 0})
    return {
        "call": "torch.ao.quantization.quantize_dynamic(model, {nn.Linear, nn.Conv2d}, dtype=torch.qint8)",
        "layers": layers,
        "note": (f"quantized {layers.get('Linear', {}).get('quantized', 0)} of {layers.get('Linear', {}).get('total', 0)} Linear "
                 f"and {conv['quantized']} of {conv['total']} Conv2d layers: dynamic quantization has no Conv2d kernel, "
                 "so the convolutions (almost all of the compute) stay fp32; use method=static"),
        "accuracy": {**acc, "drop_points": round((acc["pytorch_fp32"] - acc["pytorch_dynamic_int8"]) * 100, 2)},
        "size_bytes": size, "latency": latency, "speedup": _speedups(latency, "pytorch_fp32", "pytorch_dynamic_int8"),
        "files": {"fp32": str(run_dir / "model.fp32_state.pt"), "int8": str(run_dir / "model.dynamic_int8_state.pt")},
        "before": "PyTorch eager fp32", "after": "PyTorch eager, dynamic int8 Linear",
    }


def print_quantize(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if report["method"] == "qat":
        return print_qat(report, console)
    acc, size = report["accuracy"], report["size_bytes"]
    before_acc = acc.get("onnx_fp32", acc.get("pytorch_fp32"))
    after_acc = acc.get("onnx_int8", acc.get("pytorch_dynamic_int8"))
    table = Table(title=f"{report['model']} {report['method']} quantization ({report['test_images']} test images, "
                        f"{report['threads']} threads)")
    for col in ("", report["before"], report["after"], "change"):
        table.add_column(col, justify="right" if col else "left")
    table.add_row("test top-1", f"{before_acc:.4f}", f"{after_acc:.4f}", f"{(after_acc - before_acc) * 100:+.2f} points")
    table.add_row("size on disk", mb(size["before"]), mb(size["after"]), f"{size['before'] / size['after']:.2f}x smaller")
    before_key, after_key = list(next(iter(report["latency"].values())))
    for bs, row in report["latency"].items():
        table.add_row(f"median ms, batch {bs}", f"{row[before_key]['median_ms']:.2f}", f"{row[after_key]['median_ms']:.2f}",
                      f"{report['speedup'][bs]:.2f}x faster")
    console.print(table)
    if "graph" in report:
        g = report["graph"]
        kinds = ", ".join(f"{kind} {v['int8']}/{v['int8'] + v['float']}" for kind, v in g["by_kind"].items())
        console.print(f"int8 weights: {g['conv_int8']} of {g['conv_total']} convolutions ({kinds}); "
                      f"onnxruntime runs {report['runtime_ops'].get('QLinearConv', 0)} QLinearConv nodes")
    else:
        console.print(report["note"])


def print_qat(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    acc, size, tune = report["accuracy"], report["size_bytes"], report["qat"]
    table = Table(title=f"{report['model']} QAT int8 ({tune['steps']} steps of {tune['batch_size']}, "
                        f"{report['test_images']} test images, {report['threads']} threads)")
    for col in ("", "PyTorch fp32", "ExecuTorch int8 PTQ", "ExecuTorch int8 QAT"):
        table.add_column(col, justify="right" if col else "left")
    fp32, ptq, tuned = acc["pytorch_fp32"], acc["executorch_ptq_int8"], acc["executorch_qat_int8"]
    table.add_row("test top-1", f"{fp32:.4f}", f"{ptq:.4f}", f"{tuned:.4f}")
    table.add_row("change", "", f"{(ptq - fp32) * 100:+.2f} points", f"{(tuned - fp32) * 100:+.2f} points")
    table.add_row("size on disk", f"{mb(size['fp32_state_dict'])} (weights)", mb(size["ptq_int8"]), mb(size["qat_int8"]))
    console.print(table)
    d = report["delegation"]["qat"]
    convs = d["convs"]["conv"]
    console.print(f"QAT fine-tune {tune['seconds']:.1f}s ({tune['seconds_per_step']:.2f}s/step), observers frozen at step "
                  f"{tune['observers_frozen_at_step']}, BatchNorm at step {tune['bn_frozen_at_step']}; "
                  f"{d['delegates']} XNNPACK delegate(s), {d['non_delegated_nodes']} nodes outside, "
                  f"{convs['int8']} of {convs['int8'] + convs['float']} convs int8")
    console.print(f"ONNX QDQ: {report['onnx_qdq']['note']}")
