"""Exact ONNX graph rewrites that let onnxruntime keep MobileNetV3 in int8 end to end.

onnxruntime has int8 kernels for Conv, Add, Mul and GlobalAveragePool but none for HardSwish,
HardSigmoid or ReduceMean. Quantized as exported, every h-swish and SE gate of V3 becomes a float
island (DequantizeLinear -> HardSigmoid -> Mul -> QuantizeLinear), and on this CPU those islands
cost as much time as int8 saves in the convolutions. Rewritten first, with the same function:

* SE gate  HardSigmoid(Conv(s)) -> Clip(Conv'(s), 0, 1), alpha and beta folded into Conv' (exact);
  the Clip then disappears into the int8 conv's output range.
* h-swish  HardSwish(x) -> x * Clip(x * 1/6 + 1/2, 0, 1), i.e. int8 Mul, Add, Mul.
* pooling  ReduceMean over H, W (keepdims) -> GlobalAveragePool, which has an int8 kernel.

The rewritten fp32 graph is checked against the original before it is quantized. After
quantization, `fold_rescales` removes the int8 multiplies by a positive constant (h-swish's x/6):
in the quantized domain they only change the scale.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from mobilebench.deploy.common import require


def _attr(node: Any, name: str, default: Any) -> Any:
    onnx = require("onnx")
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _spatial_axes(node: Any, inits: dict[str, Any]) -> bool:
    """Whether a ReduceMean averages exactly H and W of an NCHW tensor, keeping the dims."""
    onnx = require("onnx")
    if _attr(node, "keepdims", 1) != 1:
        return False
    axes = _attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1] in inits:
        axes = onnx.numpy_helper.to_array(inits[node.input[1]]).tolist()
    return axes is not None and sorted(a % 4 for a in axes) == [2, 3]


def rewrite_for_int8(model: Any, se_gate: bool = True, hardswish: bool = True, pool: bool = True) -> dict[str, int]:
    """Apply the rewrites in place (each can be switched off); returns how many of each were made."""
    onnx = require("onnx")
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, int] = defaultdict(int)
    for node in graph.node:
        for name in node.input:
            consumers[name] += 1
    counts = {"se_gate": 0, "hardswish": 0, "global_pool": 0}

    def add_tensor(name: str, value: np.ndarray) -> str:
        graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def const(name: str, value: float) -> str:
        return add_tensor(name, np.array(value, dtype=np.float32))

    def constant(name: str) -> np.ndarray | None:
        """The value of a constant tensor: an initializer, possibly behind Identity (deduplicated) or a Constant node."""
        node = producer.get(name)
        while node is not None and node.op_type == "Identity":
            name = node.input[0]
            node = producer.get(name)
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(_attr(node, "value", None))
        return None

    # The TorchScript exporter shares identical initializers through Identity nodes; the quantizer
    # only quantizes weights it finds as initializers, so point every consumer at the tensor itself.
    for node in graph.node:
        for i, name in enumerate(node.input):
            source = producer.get(name)
            if source is not None and source.op_type == "Identity" and source.input[0] in inits:
                node.input[i] = source.input[0]
    needed = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
    nodes = []
    for index, node in enumerate(graph.node):
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in needed:
            continue
        p = f"{node.name or node.op_type}_rw{index}"  # unique prefix for the tensors a rewrite adds
        conv = producer.get(node.input[0]) if node.input else None
        folded = None
        if (se_gate and node.op_type == "HardSigmoid" and conv is not None and conv.op_type == "Conv" and len(conv.input) > 2
                and consumers[conv.output[0]] == 1):
            folded = [constant(conv.input[1]), constant(conv.input[2])]
        if folded is not None and all(v is not None for v in folded):
            alpha, beta = _attr(node, "alpha", 0.2), _attr(node, "beta", 0.5)
            w, b = folded
            # New tensors, never edits in place: exporters share identical initializers between layers.
            conv.input[1] = add_tensor(f"{p}_weight", (w * alpha).astype(w.dtype))
            conv.input[2] = add_tensor(f"{p}_bias", (b * alpha + beta).astype(b.dtype))
            nodes.append(helper.make_node("Clip", [node.input[0], const(f"{p}_lo", 0.0), const(f"{p}_hi", 1.0)],
                                          list(node.output), name=f"{p}_clip"))
            counts["se_gate"] += 1
        elif hardswish and node.op_type == "HardSwish":
            x = node.input[0]
            nodes += [
                helper.make_node("Mul", [x, const(f"{p}_sixth", 1.0 / 6.0)], [f"{p}_scaled"], name=f"{p}_scale"),
                helper.make_node("Add", [f"{p}_scaled", const(f"{p}_half", 0.5)], [f"{p}_shifted"], name=f"{p}_shift"),
                helper.make_node("Clip", [f"{p}_shifted", const(f"{p}_lo", 0.0), const(f"{p}_hi", 1.0)], [f"{p}_gate"], name=f"{p}_clip"),
                helper.make_node("Mul", [x, f"{p}_gate"], list(node.output), name=f"{p}_gated"),
            ]
            counts["hardswish"] += 1
        elif pool and node.op_type == "ReduceMean" and _spatial_axes(node, inits):
            nodes.append(helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output), name=f"{p}_gap"))
            counts["global_pool"] += 1
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_initializers(graph)  # e.g. the replaced ReduceMean axes
    return counts


def _drop_unused_initializers(graph: Any) -> None:
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def _scalar(inits: dict[str, Any], name: str | None) -> float | None:
    onnx = require("onnx")
    if name is None:
        return 0.0  # an omitted zero point
    if name not in inits:
        return None
    value = onnx.numpy_helper.to_array(inits[name])
    return float(value.reshape(())) if value.size == 1 else None


def fold_rescales(model: Any) -> int:
    """Remove each QDQ `Mul` of a per-tensor-quantized x by a positive constant c; returns how many.

    x * c of x = s * (q - z) is s*c * (q - z): the same integers q under the scale s*c. So the
    DequantizeLinear nodes that read the Mul's requantized output read q itself with scale s*c, and
    the Mul with its QuantizeLinear goes: one int8 QLinearMul pass over the tensor fewer per
    h-swish. Exact where the skipped requantization did not clip (quantize.py checks the logits).
    """
    onnx = require("onnx")
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    def arg(node: Any, i: int) -> str | None:
        return node.input[i] if len(node.input) > i and node.input[i] else None

    drop: set[int] = set()
    for mul in graph.node:
        dqs = [producer.get(name) for name in mul.input]
        if mul.op_type != "Mul" or len(dqs) != 2 or any(d is None or d.op_type != "DequantizeLinear" for d in dqs):
            continue
        constant = [d for d in dqs if d.input[0] in inits]
        if len(constant) != 1:
            continue
        dq_c, dq_x = constant[0], dqs[1 - dqs.index(constant[0])]
        q_c, s_c, z_c = (_scalar(inits, arg(dq_c, i)) for i in range(3))
        s_x = _scalar(inits, arg(dq_x, 1))
        after = consumers[mul.output[0]]
        if None in (q_c, s_c, z_c, s_x) or len(after) != 1 or after[0].op_type != "QuantizeLinear":
            continue
        c = (q_c - z_c) * s_c
        readers = consumers[after[0].output[0]]
        if c <= 0 or not readers or any(r.op_type != "DequantizeLinear" for r in readers):
            continue
        scale = f"{mul.name or 'mul'}_rescaled_{len(drop)}"
        graph.initializer.append(onnx.numpy_helper.from_array(np.array(s_x * c, dtype=np.float32), scale))
        for reader in readers:
            reader.input[:] = [dq_x.input[0], scale] + ([arg(dq_x, 2)] if arg(dq_x, 2) else [])
        drop.update({id(mul), id(after[0])})
    kept = [node for node in graph.node if id(node) not in drop]
    needed = {name for node in kept for name in node.input} | {out.name for out in graph.output}
    kept = [n for n in kept if not (n.op_type == "DequantizeLinear" and n.output[0] not in needed)]
    del graph.node[:]
    graph.node.extend(kept)
    _drop_unused_initializers(graph)
    return len(drop) // 2
