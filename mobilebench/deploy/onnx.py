"""ONNX in and out: export with a dynamic batch axis, onnxruntime sessions, and the parity check
every exported model must pass against PyTorch before a command declares it good."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mobilebench.data import Split
from mobilebench.deploy.common import INPUT_NAME, OUTPUT_NAME, Source, batches, quiet, require
from mobilebench.errors import UserError


def batch_dim() -> dict[int, Any]:
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
                torch.onnx.export(model, (example,), str(path), dynamo=True, dynamic_shapes=(batch_dim(),),
                                  external_data=False, **kwargs)
            else:
                torch.onnx.export(model, (example,), str(path), dynamo=False,
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, **kwargs)
    except UserError:
        raise
    except Exception as err:  # the exporters raise many types; the first line says what went wrong
        raise UserError(f"ONNX export ({exporter}) failed: {str(err).strip().splitlines()[0]}") from None
    return path


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
    correct = total = 0
    for x, y in batches(split, source, batch_size):
        pred = ort_run(session, x).argmax(1)
        correct += int((pred == y.numpy()).sum())
        total += len(y)
    return correct / max(total, 1)


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
