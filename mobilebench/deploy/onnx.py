"""ONNX in and out: export with a dynamic batch axis, onnxruntime sessions, the parity check
every exported model must pass against PyTorch before a command declares it good, and the
metadata (class names, preprocessing) that lets `mobilebench predict` run a model file on its own."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mobilebench.data import Split
from mobilebench.deploy.common import INPUT_NAME, OUTPUT_NAME, Source, quiet, require, runner_accuracy
from mobilebench.errors import UserError


def batch_dim() -> dict[int, Any]:
    return {0: torch.export.Dim("batch", min=1, max=65536)}


def export_onnx(model: nn.Module, path: Path, image_size: int, exporter: str = "dynamo", opset: int | None = None,
                metadata: dict[str, str] | None = None) -> Path:
    """Write `model` as ONNX taking a normalised float NCHW batch of any size; returns `path`.

    `metadata` (see `source_metadata`) is stored in the file's metadata_props.
    """
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
                torch.onnx.export(model, (example,), str(path), dynamo=True, dynamic_shapes=(batch_dim(),),
                                  external_data=False, **kwargs)
            else:
                torch.onnx.export(model, (example,), str(path), dynamo=False,
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, **kwargs)
    except UserError:
        raise
    except Exception as err:  # the exporters raise many types; the first line says what went wrong
        raise UserError(f"ONNX export ({exporter}) failed: {str(err).strip().splitlines()[0]}") from None
    if metadata:
        write_metadata(path, metadata)
    return path


# --- metadata: what a model file needs to classify images without its checkpoint --------------

META_PREFIX = "mobilebench."
META_VERSION = 1
META_FIELDS = ("classes", "mean", "std", "image_size", "resize")  # JSON-encoded; mobilebench.model is plain text
PREPROCESS_NOTE = ("RGB; bilinear antialiased resize to image_size x image_size as uint8; (pixel / 255 - mean) / std; "
                   "then, when resize is not null, bilinear antialiased resize to resize x resize; float32 NCHW; "
                   "output: logits (no softmax), one per class in `classes` order")


def source_metadata(source: Source) -> dict[str, str]:
    """The metadata_props of a checkpoint's exported model: class names and the exact preprocessing.

    image_size is the size images were decoded to in training (the checkpoint's data), resize the
    on-batch resize eval applies after normalising (augment.resize), so predict can redo both.
    """
    blob = source.blob or {}
    stats = blob.get("data") or {}
    if not stats.get("classes") or source.mean is None or source.std is None:
        return {}  # a random-weight model (bench latency) has no classes to record
    values = {"classes": list(stats["classes"]), "mean": list(source.mean),
              "std": list(source.std), "image_size": int(stats.get("image_size") or source.image_size),
              "resize": ((blob.get("config") or {}).get("augment") or {}).get("resize")}
    meta = {META_PREFIX + key: json.dumps(values[key]) for key in META_FIELDS}
    meta[META_PREFIX + "model"] = source.name
    meta[META_PREFIX + "metadata_version"] = str(META_VERSION)
    meta[META_PREFIX + "preprocess"] = PREPROCESS_NOTE
    if source.checkpoint:
        meta[META_PREFIX + "checkpoint"] = Path(source.checkpoint).name  # the name only: no local paths in a deployed file
    return meta


def write_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Set `metadata` in the ONNX file's metadata_props (replacing keys of the same name), in place."""
    onnx = require("onnx")
    model = onnx.load(str(path))
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    for key, value in [*kept, *metadata.items()]:
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def read_file_metadata(path: Path) -> dict[str, str]:
    """The mobilebench.* metadata_props of an ONNX file."""
    model = require("onnx").load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props if p.key.startswith(META_PREFIX)}


def copy_metadata(source: Path, target: Path) -> None:
    """Give `target` the mobilebench metadata of `source` (the int8 model carries its fp32 source's)."""
    metadata = read_file_metadata(source)
    if metadata:
        write_metadata(target, metadata)


def session_metadata(session: Any) -> dict[str, Any] | None:
    """The decoded mobilebench metadata of a loaded model ({model, classes, mean, std, image_size,
    resize}), or None when the file lacks it or it does not parse."""
    return decode_metadata(session.get_modelmeta().custom_metadata_map)


def decode_metadata(props: dict[str, str]) -> dict[str, Any] | None:
    """`source_metadata`'s key/value strings decoded and checked (any model file format), or None."""
    try:
        values = {key: json.loads(props[META_PREFIX + key]) for key in META_FIELDS}
        values["model"] = props[META_PREFIX + "model"]
    except (KeyError, ValueError):
        return None
    classes, mean, std = values["classes"], values["mean"], values["std"]
    ok = (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)
          and all(isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v) for v in (mean, std))
          and isinstance(values["image_size"], int) and values["image_size"] > 0
          and (values["resize"] is None or isinstance(values["resize"], int) and values["resize"] > 0))
    return values if ok else None


def ort_session(path: str | Path, threads: int) -> Any:
    """An onnxruntime CPU session with every graph optimisation and a fixed thread count."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: its warnings are advice about the graph, not problems
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for unreadable models
        raise UserError(f"onnxruntime cannot load {path}: {str(err).splitlines()[0]}") from None


def ort_run(session: Any, x: torch.Tensor | np.ndarray) -> np.ndarray:
    array = x.numpy() if isinstance(x, torch.Tensor) else x
    return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(array, dtype=np.float32)})[0]


def ort_accuracy(session: Any, split: Split, source: Source, batch_size: int = 256) -> float:
    """Top-1 accuracy of an onnxruntime session on `split` (same batches as `torch_accuracy`)."""
    return runner_accuracy(lambda x: ort_run(session, x), split, source, batch_size)


def onnx_runner(path: Path, threads: int) -> Callable[[torch.Tensor], np.ndarray]:
    session = ort_session(path, threads)
    return lambda x: ort_run(session, x)


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
