"""`mobilebench bench latency`: milliseconds per batch for PyTorch eager fp32, onnxruntime fp32 and
int8, and ExecuTorch (XNNPACK) fp32 and int8, timed side by side with a stated thread count.

`checkpoint=PATH` times that model (int8 calibrated on its training images); without a checkpoint
the configured model (`model=v2`) is timed with random weights, calibrated on random tensors --
latency does not depend on what the weights are. `bench.backends=null` times every backend whose
runtime is installed; a list names exactly the backends to time, and a missing runtime is an error.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mobilebench.config import LATENCY_BACKENDS, Config, LatencyConfig, QuantizeConfig
from mobilebench.deploy.common import (
    Source,
    load_source,
    random_batch,
    random_source,
    require,
    source_data,
    write_report,
)
from mobilebench.deploy.int8 import calibration_arrays, quantize_static
from mobilebench.deploy.onnx import export_onnx, ort_run, ort_session
from mobilebench.deploy.timing import summarize, time_interleaved
from mobilebench.machine import machine_note
from mobilebench.runtime import set_threads
from mobilebench.validate import validate_bench

LABELS = {"pytorch": "torch fp32", "onnx_fp32": "ort fp32", "onnx_int8": "ort int8",  # short: the table must fit 80 columns
          "executorch_fp32": "et fp32", "executorch_int8": "et int8"}
INT8_PAIRS = {"onnx_int8": ("int8_vs_fp32", "onnx_fp32"), "executorch_int8": ("executorch_int8_vs_fp32", "executorch_fp32")}


def _importable(module: str) -> bool:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def resolve_backends(cfg: LatencyConfig) -> list[str]:
    """The backends to time: the configured list (each runtime required), or every installed one."""
    from mobilebench.deploy.executorch import executorch_installed, require_executorch

    onnx_modules = ["onnx", "onnxruntime", *(["onnxscript"] if cfg.exporter == "dynamo" else [])]
    if cfg.backends is None:
        onnx_ok = all(_importable(m) for m in onnx_modules)
        et_ok = executorch_installed()
        return [b for b in LATENCY_BACKENDS if b == "pytorch" or (onnx_ok if b.startswith("onnx") else et_ok)]
    chosen = [b for b in LATENCY_BACKENDS if b in cfg.backends]  # table order, duplicates dropped
    if any(b.startswith("onnx") for b in chosen):
        for module in onnx_modules:
            require(module)
    if any(b.startswith("executorch") for b in chosen):
        require_executorch()
    return chosen


def build_runners(source: Source, config: Config, cfg: LatencyConfig, run_dir: Path, threads: int,
                  use_checkpoint_data: bool,
                  backends: list[str]) -> tuple[dict[str, Callable[[torch.Tensor], Any]], dict[str, Any]]:
    """One callable per backend taking a float NCHW batch, plus what was built for them."""
    runners: dict[str, Callable[[torch.Tensor], Any]] = {}
    built: dict[str, Any] = {}
    # Both int8 backends calibrate on the same images: select (and decode) them once.
    calibration = (calibration_arrays(source, config, QuantizeConfig(calib_size=cfg.calib_size), use_checkpoint_data)
                   if {"onnx_int8", "executorch_int8"} & set(backends) else [])
    if "pytorch" in backends:
        model = source.model.eval()

        def eager(x: torch.Tensor) -> Any:
            with torch.inference_mode():
                return model(x)

        runners["pytorch"] = eager
    if {"onnx_fp32", "onnx_int8"} & set(backends):
        fp32 = export_onnx(source.model, run_dir / "model.onnx", source.image_size, cfg.exporter)
        built["onnx_fp32"] = str(fp32)
        if "onnx_fp32" in backends:
            s32 = ort_session(fp32, threads)
            runners["onnx_fp32"] = lambda x: ort_run(s32, x)
        if "onnx_int8" in backends:
            qcfg = QuantizeConfig(calib_size=cfg.calib_size)
            int8 = run_dir / "model.int8.onnx"
            built["onnx_int8"] = {"file": str(int8), **quantize_static(fp32, int8, calibration, qcfg, source.name)}
            s8 = ort_session(int8, threads)
            runners["onnx_int8"] = lambda x: ort_run(s8, x)
    if {"executorch_fp32", "executorch_int8"} & set(backends):
        build_executorch(source, cfg, run_dir, threads, calibration, backends, runners, built)
    return runners, built


def build_executorch(source: Source, cfg: LatencyConfig, run_dir: Path, threads: int, calibration: list[Any],
                     backends: list[str], runners: dict[str, Callable[[torch.Tensor], Any]], built: dict[str, Any]) -> None:
    """model.pte / model_int8.pte with a batch bound covering every timed batch size (so none is cut in pieces)."""
    from mobilebench.deploy import executorch as et
    from mobilebench.deploy.onnx import source_metadata

    bound = max(et.MAX_BATCH, *cfg.batch_sizes)
    et.set_threads(threads)  # process-wide pool, before any program is loaded
    metadata = source_metadata(source)
    if "executorch_fp32" in backends:
        out = run_dir / "model.pte"
        report = et.lower_to_pte(et.export_program(source.model, source.image_size, bound), out, metadata)
        built["executorch_fp32"] = {"file": str(out), **report}
        runners["executorch_fp32"] = et.pte_runner(out)
    if "executorch_int8" in backends:
        program, seen = et.quantize_program(source.model, source.image_size, (torch.from_numpy(a) for a in calibration), bound)
        out = run_dir / "model_int8.pte"
        report = et.lower_to_pte(program, out, metadata)
        built["executorch_int8"] = {"file": str(out), "calib_images": seen, **report}
        runners["executorch_int8"] = et.pte_runner(out)


def run_latency(config: Config, run_dir: Path, use_checkpoint_data: bool = True) -> dict[str, Any]:
    """Time the plain model and its ONNX fp32 / int8 versions side by side; writes latency.json."""
    cfg: LatencyConfig = config.bench
    validate_bench(config.bench)  # the CLI checked it already; a direct caller gets the same one-line errors
    backends = resolve_backends(cfg)  # before any work: a missing runtime is one line
    threads = set_threads(cfg.threads or config.trainer.threads)
    source = load_source(config.checkpoint) if config.checkpoint else random_source(config)
    if source.mean is None and source.blob is not None:
        source_data(source, config, use_checkpoint_data)
    runners, built = build_runners(source, config, cfg, run_dir, threads, use_checkpoint_data, backends)
    results: dict[str, dict[str, dict[str, float]]] = {name: {} for name in runners}
    for bs in cfg.batch_sizes:
        x = random_batch(source, bs)
        timed = time_interleaved({name: (lambda run=run: run(x)) for name, run in runners.items()}, cfg.warmup, cfg.repeats)
        for name, seconds in timed.items():
            results[name][str(bs)] = summarize(seconds, bs)
    report = {
        "model": source.name, "model_args": source.model_args,
        "checkpoint": source.checkpoint or "random weights", "input_shape": [3, source.image_size, source.image_size],
        "threads": thread_report(threads, runners),
        "backends": list(runners),
        "batch_sizes": cfg.batch_sizes, "warmup": cfg.warmup, "repeats": cfg.repeats,
        "method": ("wall clock per batch; backends take turns in 5 rounds of chunks (first call of each turn untimed), "
                   "so load from other processes hits all of them alike"),
        "results": results, "speedup": speedups(results), "built": built,
        "machine": machine_note(),
    }
    write_report(run_dir, "latency.json", report)
    print_latency(report)
    return report


def thread_report(threads: int, runners: dict[str, Any]) -> dict[str, Any]:
    report: dict[str, Any] = {"pytorch_intra_op": torch.get_num_threads()}
    if any(name.startswith("onnx") for name in runners):
        report.update(onnxruntime_intra_op=threads, onnxruntime_inter_op=1)
    if any(name.startswith("executorch") for name in runners):
        from mobilebench.deploy.executorch import set_threads as executorch_threads

        report["executorch_threadpool"] = executorch_threads(None)  # the pool's size, set in build_executorch
    return report


def speedups(results: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Median-latency ratios: each backend against PyTorch eager, and each int8 against its runtime's fp32."""
    out: dict[str, dict[str, float]] = {}
    pairs = [(f"{name}_vs_pytorch", "pytorch", name) for name in LATENCY_BACKENDS if name != "pytorch"]
    pairs += [(key, fp32, int8) for int8, (key, fp32) in INT8_PAIRS.items()]
    for key, base, other in pairs:
        if base in results and other in results:
            out[key] = {bs: round(results[base][bs]["median_ms"] / results[other][bs]["median_ms"], 2) for bs in results[base]}
    return out


def print_latency(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = report["threads"]
    table = Table(title=f"{report['model']} ({report['checkpoint']}) {'x'.join(map(str, report['input_shape']))}: "
                        f"{t['pytorch_intra_op']} threads, median / p90 of {report['repeats']} calls")
    for col in ("batch", "backend", "median ms", "p90 ms", "images/s", "vs PyTorch", "int8 vs fp32"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    results, speed = report["results"], report["speedup"]
    for bs in map(str, report["batch_sizes"]):
        for name, rows in results.items():
            row = rows[bs]
            vs_torch = speed.get(f"{name}_vs_pytorch", {}).get(bs)
            vs_fp32 = speed.get(INT8_PAIRS[name][0], {}).get(bs) if name in INT8_PAIRS else None
            table.add_row(bs, LABELS[name], f"{row['median_ms']:.2f}", f"{row['p90_ms']:.2f}", f"{row['images_per_s']:,.0f}",
                          f"{vs_torch:.2f}x" if vs_torch else "", f"{vs_fp32:.2f}x" if vs_fp32 else "")
        table.add_section()
    Console().print(table)
