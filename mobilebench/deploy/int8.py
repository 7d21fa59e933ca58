"""Static int8 quantization of an ONNX graph with onnxruntime, and reports on what came out int8.

`quantize_static` calibrates activation ranges on training images and writes a QDQ model
(per-channel int8 weights, uint8 activations); onnxruntime fuses each DequantizeLinear -> Conv ->
QuantizeLinear into a QLinearConv at load time. `conv_report` and `runtime_ops` say which
convolutions really run in int8.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mobilebench.config import QUANTIZE_GROUPS, Config, QuantizeConfig
from mobilebench.deploy.common import Source, batches, quiet, random_batch, require, source_data, take
from mobilebench.deploy.onnx import copy_metadata, ort_run, ort_session
from mobilebench.errors import UserError
from mobilebench.machine import cpu_flags

CALIBRATION = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
POOLS = ("ReduceMean", "GlobalAveragePool")
QDQ = ("QuantizeLinear", "DequantizeLinear")

# Chosen by measurement on the 2-core AVX2 CPU (docs/deployment.md): quantizing every supported
# op is fastest for all four families; the table keeps the choice per family in one place.
DEFAULT_EXCLUDE: dict[str, list[str]] = {"v1": [], "v2": [], "v3_small": [], "v3_large": []}


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

    groups: dict[str, list[str]] = {g: [] for g in QUANTIZE_GROUPS}
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
    copy_metadata(fp32, out)  # class names and preprocessing travel with the int8 model too
    return {"exclude_groups": exclude_groups, "excluded_nodes": len(excluded), "reduce_range": reduce_range,
            "rewrites": rewrites, "op_types": cfg.op_types or "all onnxruntime supports"}
