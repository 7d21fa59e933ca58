"""`mobilebench quantize`: an int8 model whose convolutions really are int8, with its cost measured.

`method=static` exports the fp32 ONNX graph, calibrates activation ranges on training images and
writes an onnxruntime QDQ model (per-channel int8 weights, uint8 activations); onnxruntime fuses
each DequantizeLinear -> Conv -> QuantizeLinear into a QLinearConv at load time.

`method=dynamic` runs the tutorial's `torch.ao.quantization.quantize_dynamic(model, {nn.Linear,
nn.Conv2d})` and reports what it actually did: dynamic quantization has no Conv2d kernel, so only
the Linear layers change.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from mobilebench.config import Config
from mobilebench.deploy.common import (
    Source,
    batches,
    cpu_flags,
    cpu_name,
    file_bytes,
    load_source,
    mb,
    need_checkpoint,
    ort_accuracy,
    ort_run,
    ort_session,
    parse_section,
    quiet,
    random_batch,
    require,
    set_threads,
    source_data,
    state_bytes,
    take,
    torch_accuracy,
    write_report,
)
from mobilebench.deploy.timing import summarize, time_interleaved
from mobilebench.errors import UserError

METHODS = ("static", "dynamic")
CALIBRATION = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
# Node groups a user can keep in float with quantize.exclude (see `node_groups`).
GROUPS = ("stem", "depthwise", "se", "hardswish", "head")
USAGE = "mobilebench quantize checkpoint=outputs/train/.../checkpoints/best.pt method=static"
POOLS = ("ReduceMean", "GlobalAveragePool")
QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class QuantizeConfig:
    method: str = "static"  # static (onnxruntime QDQ int8) | dynamic (the tutorial's torch quantize_dynamic)
    calib_size: int = 512  # training images used to calibrate activation ranges
    calib_batch: int = 64
    calib_method: str = "minmax"  # minmax | entropy | percentile
    per_channel: bool = True  # one weight scale per output channel
    # 7-bit weights, avoiding u8s8 overflow on x86 CPUs without VNNI; None: on exactly those CPUs.
    reduce_range: Optional[bool] = None
    rewrite: bool = True  # exact rewrites so V3's h-swish, SE gates and pooling run in int8 (deploy/rewrite.py)
    preprocess: bool = False  # run onnxruntime's quant_pre_process (shape inference + graph optimisation) first
    # Node groups kept in float, from: stem, depthwise, se, hardswish, head. None: the measured
    # default for the model family (DEFAULT_EXCLUDE); [] quantizes every op onnxruntime can.
    exclude: Optional[list[str]] = None
    op_types: Optional[list[str]] = None  # restrict to these ONNX op types; None: all onnxruntime supports
    test_images: Optional[int] = None  # None: the whole test split
    eval_batch: int = 256
    latency_batches: list[int] = field(default_factory=lambda: [1, 32])
    warmup: int = 5
    repeats: int = 30
    threads: Optional[int] = None  # None: trainer.threads, else PyTorch's default
    exporter: str = "dynamo"  # ONNX exporter for the fp32 graph (see export.exporter)


# Chosen by measurement on the 2-core AVX2 CPU (docs/deployment.md): quantizing every supported
# op is fastest for all four families; the table keeps the choice per family in one place.
DEFAULT_EXCLUDE: dict[str, list[str]] = {"v1": [], "v2": [], "v3_small": [], "v3_large": []}


def parse_quantize(values: dict[str, Any]) -> QuantizeConfig:
    cfg = parse_section(QuantizeConfig, values, "quantize")
    if cfg.method not in METHODS:
        raise UserError(f"quantize.method={cfg.method!r} is not valid; choose one of: {', '.join(METHODS)}")
    if cfg.calib_method not in CALIBRATION:
        raise UserError(f"quantize.calib_method={cfg.calib_method!r} is not valid; choose one of: {', '.join(CALIBRATION)}")
    bad = [g for g in cfg.exclude or [] if g not in GROUPS]
    if bad:
        raise UserError(f"quantize.exclude has unknown group(s) {', '.join(bad)}; choose from: {', '.join(GROUPS)}")
    for key in ("calib_size", "calib_batch", "eval_batch", "repeats"):
        if getattr(cfg, key) < 1:
            raise UserError(f"quantize.{key}={getattr(cfg, key)} is out of range; it must be >= 1")
    if cfg.test_images is not None and cfg.test_images < 1:
        raise UserError(f"quantize.test_images={cfg.test_images} is out of range; it must be >= 1")
    if not cfg.latency_batches or min(cfg.latency_batches) < 1:
        raise UserError("quantize.latency_batches must list batch sizes >= 1")
    return cfg


# --- graph inspection -------------------------------------------------------------------


def node_groups(graph: Any) -> dict[str, list[str]]:
    """Names of the nodes in each excludable group, found from the graph's structure.

    stem: the first Conv. depthwise: grouped Convs. se: squeeze-excitation (pool -> Conv -> Relu
    -> Conv -> HardSigmoid -> Mul gate). hardswish: HardSwish nodes, or HardSigmoid(x) * x pairs.
    head: Gemm / MatMul. Works on float and QDQ graphs alike (Q/DQ pairs are looked through).
    """
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    def source(tensor: str) -> str:
        node = producer.get(tensor)
        while node is not None and node.op_type in QDQ:
            tensor = node.input[0]
            node = producer.get(tensor)
        return tensor

    def parent(node: Any) -> Any:
        return producer.get(source(node.input[0])) if node.input else None

    def children(node: Any) -> list[Any]:
        found, todo = [], list(node.output)
        while todo:
            for user in consumers[todo.pop()]:
                if user.op_type in QDQ:
                    todo += list(user.output)
                else:
                    found.append(user)
        return found

    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    if convs:
        groups["stem"].append(convs[0].name)
    se_fc2: set[str] = set()
    for node in convs:
        if any(a.name == "group" and a.i > 1 for a in node.attribute):
            groups["depthwise"].append(node.name)
        pool = parent(node)
        if pool is not None and pool.op_type in POOLS:  # SE squeeze conv
            groups["se"] += [pool.name, node.name]
            for act in children(node):
                # QDQ graphs fold the Relu into the quantization range, so fc2 may follow fc1 directly.
                for fc2 in children(act) if act.op_type == "Relu" else [act]:
                    if fc2.op_type == "Conv":
                        groups["se"] += [act.name, fc2.name] if act is not fc2 else [fc2.name]
                        se_fc2.add(fc2.output[0])
    for node in graph.node:
        if node.op_type == "HardSwish":
            groups["hardswish"].append(node.name)
        elif node.op_type == "HardSigmoid":
            gates = [m for m in children(node) if m.op_type == "Mul"]
            group = "se" if source(node.input[0]) in se_fc2 else "hardswish"
            groups[group] += [node.name, *(m.name for m in gates)]
        elif node.op_type in ("Gemm", "MatMul"):
            groups["head"].append(node.name)
    return groups


def conv_report(graph: Any) -> dict[str, Any]:
    """Which Conv / Gemm nodes of a QDQ graph take int8 weights (a DequantizeLinear of an int8 initializer)."""
    producer = {out: node for node in graph.node for out in node.output}
    int8 = {init.name for init in graph.initializer if init.data_type in (2, 3)}  # UINT8, INT8
    groups = node_groups(graph)
    kinds = {name: kind for kind in ("stem", "depthwise", "se") for name in groups[kind]}

    def quantized(node: Any) -> bool:
        dq = producer.get(node.input[1]) if len(node.input) > 1 else None
        return dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in int8

    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"int8": 0, "float": 0})
    float_names = []
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        kind = kinds.get(node.name, "pointwise" if node.op_type == "Conv" else "linear")
        is_q = quantized(node)
        counts[kind]["int8" if is_q else "float"] += 1
        if not is_q:
            float_names.append(node.name)
    convs = [n for n in graph.node if n.op_type == "Conv"]
    return {"conv_total": len(convs), "conv_int8": sum(quantized(n) for n in convs), "by_kind": dict(counts),
            "float_nodes": float_names,
            "quantize_nodes": sum(n.op_type == "QuantizeLinear" for n in graph.node),
            "dequantize_nodes": sum(n.op_type == "DequantizeLinear" for n in graph.node)}


def runtime_ops(path: Path, threads: int) -> dict[str, int]:
    """Op counts of the graph onnxruntime actually runs (after fusing QDQ into QLinearConv etc.)."""
    ort = require("onnxruntime")
    onnx = require("onnx")
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.intra_op_num_threads = threads
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    counts: dict[str, int] = defaultdict(int)
    for node in graph.node:
        counts[node.op_type] += 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


# --- static quantization ----------------------------------------------------------------


def calibration_arrays(source: Source, config: Config, cfg: QuantizeConfig, use_checkpoint_data: bool) -> list[np.ndarray]:
    """Normalised training images (a seeded random subset), or random tensors for random weights."""
    if source.blob is None:
        return [random_batch(source, min(cfg.calib_batch, cfg.calib_size - i), seed=i).numpy()
                for i in range(0, cfg.calib_size, cfg.calib_batch)]
    data = source_data(source, config, use_checkpoint_data)
    subset = take(data.train, cfg.calib_size, seed=0)
    return [x.numpy() for x, _ in batches(subset, source, cfg.calib_batch)]


def _reader(arrays: Iterable[np.ndarray], input_name: str) -> Any:
    quantization = require("onnxruntime.quantization")

    class Reader(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{input_name: a} for a in arrays])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    return Reader()


def resolve_reduce_range(setting: bool | None) -> bool:
    """7-bit weights where onnxruntime's u8s8 kernels can saturate: x86 CPUs without VNNI (AVX2-only).

    There, the int16 intermediate sums of vpmaddubsw overflow on full-range weights; measured here it
    cost v3_small 1.6 points of test accuracy, against 0.2 with reduce_range.
    """
    if setting is not None:
        return setting
    flags = cpu_flags()
    return bool(flags) and "avx2" in flags and not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


def _checked_rewrite(fp32: Path, out: Path, arrays: list[np.ndarray], exclude_groups: list[str]) -> dict[str, int]:
    """Write the int8-friendly rewrite of `fp32` to `out`, refusing it unless it computes the same logits."""
    from mobilebench.deploy.rewrite import rewrite_for_int8

    model = require("onnx").load(str(fp32))
    counts = rewrite_for_int8(model, se_gate="se" not in exclude_groups, hardswish="hardswish" not in exclude_groups)
    _save_if_same_logits(model, fp32, out, arrays, "the int8-friendly graph rewrite changed the fp32 logits")
    return counts


def _checked_fold(int8: Path, arrays: list[np.ndarray]) -> int:
    """Fold the int8 graph's constant rescales (rewrite.fold_rescales) in place, refusing a changed result."""
    from mobilebench.deploy.rewrite import fold_rescales

    model = require("onnx").load(str(int8))
    folded = fold_rescales(model)
    if folded:
        candidate = int8.with_name(int8.stem + ".folded.onnx")
        _save_if_same_logits(model, int8, candidate, arrays, "folding the int8 rescales changed the logits")
        candidate.replace(int8)
    return folded


def _save_if_same_logits(model: Any, reference: Path, out: Path, arrays: list[np.ndarray], what: str) -> None:
    """Save the edited ONNX `model` to `out` and keep it only if its logits on 16 calibration images
    stay within 1e-3 of the logits' scale from `reference` (an edit that should not change the function)."""
    require("onnx").save(model, str(out))
    x = arrays[0][:16]
    ref, new = ort_run(ort_session(reference, 1), x), ort_run(ort_session(out, 1), x)
    diff = float(np.abs(ref - new).max())
    if diff > 1e-3 * max(1.0, float(np.abs(ref).max())):
        out.unlink()
        raise UserError(f"{what} by {diff:.3g}; run with quantize.rewrite=false")


def quantize_static(fp32: Path, out: Path, arrays: list[np.ndarray], cfg: QuantizeConfig, family: str) -> dict[str, Any]:
    """Write the int8 QDQ model; returns the choices made (exclusions, rewrites, reduce_range)."""
    onnx = require("onnx")
    quantization = require("onnxruntime.quantization")
    exclude_groups = DEFAULT_EXCLUDE.get(family, []) if cfg.exclude is None else list(cfg.exclude)
    reduce_range = resolve_reduce_range(cfg.reduce_range)
    rewrites: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp, quiet():
        src = fp32
        if cfg.rewrite:
            src = Path(tmp) / "rewritten.onnx"
            rewrites = _checked_rewrite(fp32, src, arrays, exclude_groups)
        if cfg.preprocess:
            pre = Path(tmp) / "preprocessed.onnx"
            quantization.quant_pre_process(str(src), str(pre))
            src = pre
        graph = onnx.load(str(src)).graph
        groups = node_groups(graph)
        excluded = sorted({name for g in exclude_groups for name in groups[g]})
        try:
            quantization.quantize_static(
                str(src), str(out), _reader(arrays, graph.input[0].name),
                quant_format=quantization.QuantFormat.QDQ,
                activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
                per_channel=cfg.per_channel, reduce_range=reduce_range,
                calibrate_method=getattr(quantization.CalibrationMethod, CALIBRATION[cfg.calib_method]),
                nodes_to_exclude=excluded, op_types_to_quantize=cfg.op_types,
            )
        except Exception as err:  # onnxruntime's quantizer raises bare Exceptions with useful first lines
            raise UserError(f"static quantization failed: {str(err).strip().splitlines()[0]}") from None
        if cfg.rewrite:
            rewrites["folded_rescales"] = _checked_fold(out, arrays)
    return {"exclude_groups": exclude_groups, "excluded_nodes": len(excluded), "reduce_range": reduce_range,
            "rewrites": rewrites, "op_types": cfg.op_types or "all onnxruntime supports"}


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
    cfg = parse_quantize(config.quantize)
    path = need_checkpoint(config, USAGE)
    threads = set_threads(cfg.threads or config.trainer.threads)
    source = load_source(path)
    data = source_data(source, config, use_checkpoint_data)
    test = take(data.test, cfg.test_images, seed=0)
    common = {"checkpoint": path, "model": source.name, "model_args": source.model_args, "method": cfg.method,
              "test_images": len(test), "threads": threads, "input": source.input_spec(),
              "machine": machine_note()}
    if cfg.method == "dynamic":
        report = {**common, **_run_dynamic(source, test, cfg, run_dir)}
    else:
        report = {**common, **_run_static(source, config, test, cfg, run_dir, threads, use_checkpoint_data)}
    write_report(run_dir, "quantize.json", report)
    print_quantize(report)
    return report


def _run_static(source: Source, config: Config, test: Any, cfg: QuantizeConfig, run_dir: Path, threads: int,
                use_checkpoint_data: bool) -> dict[str, Any]:
    from mobilebench.deploy.export import export_onnx, onnx_runner, parity

    fp32 = export_onnx(source.model, run_dir / "model.onnx", source.image_size, cfg.exporter)
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


def machine_note() -> dict[str, Any]:
    import os
    import platform
    from importlib.metadata import PackageNotFoundError, version

    try:
        ort_version = version("onnxruntime")
    except PackageNotFoundError:
        ort_version = None
    isa = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"})
    return {"cpu": cpu_name() or platform.machine(), "cores": os.cpu_count(), "isa": isa, "torch": torch.__version__,
            "onnxruntime": ort_version}


def print_quantize(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
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
