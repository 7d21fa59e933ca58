"""Helpers the deployment commands share: the model to deploy, its data, and its accuracy in PyTorch."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from mobilebench.config import Config
from mobilebench.data import DataSplits, Split, load_data
from mobilebench.errors import UserError

INSTALL_HINT = "pip install 'mobilebench[deploy]'"
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def require(module: str) -> ModuleType:
    """Import an optional deployment dependency, or fail with the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{module} is not installed; install the deployment extras with: {INSTALL_HINT}") from None


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the progress prints, log records and deprecation chatter of the exporters and of
    onnxruntime's quantizer (it logs advice through the root logger); the commands print their own summary."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


@dataclass
class Source:
    """The model being deployed plus what its input must look like."""

    model: nn.Module
    name: str
    model_args: dict[str, Any]
    checkpoint: str | None  # None: random weights
    blob: dict[str, Any] | None
    image_size: int  # side of the network input (after any resize)
    mean: list[float] | None  # normalisation the model was trained with; None until data is loaded
    std: list[float] | None

    @property
    def num_classes(self) -> int:
        return int(self.model_args["num_classes"])

    def input_spec(self) -> dict[str, Any]:
        """What the exported graph expects, for the JSON report."""
        return {"name": INPUT_NAME, "shape": ["batch", 3, self.image_size, self.image_size], "dtype": "float32",
                "layout": "NCHW, RGB", "normalisation": "(pixel / 255 - mean) / std", "mean": self.mean, "std": self.std}


def need_checkpoint(config: Config, usage: str) -> str:
    """What `checkpoint=` says (a file or a run dir: `load_source` resolves it), or one line asking for it."""
    if not config.checkpoint:
        raise UserError(f"this command needs a checkpoint: {usage}")
    return str(config.checkpoint)


def load_source(path: str) -> Source:
    """The checkpoint's model (EMA weights when kept) in eval mode on the CPU; one-line errors."""
    from mobilebench.checkpoint import load_model_and_checkpoint, resolve_checkpoint

    path = str(resolve_checkpoint(path))
    model, blob = load_model_and_checkpoint(path, "cpu")
    stats = blob.get("data") or {}
    resize = (blob.get("config") or {}).get("augment", {}).get("resize")
    size = int(resize or stats.get("image_size") or 32)
    return Source(model, blob["model_args"]["name"], dict(blob["model_args"]), path, blob, size,
                  stats.get("mean"), stats.get("std"))


def random_source(config: Config, num_classes: int = 10) -> Source:
    """A model built from the config with random weights (latency needs no training)."""
    from mobilebench.models import build_model
    from mobilebench.trainer import model_args

    args = model_args(config.model, config.model.num_classes or num_classes)
    model = build_model(**args).eval()
    size = config.augment.resize or config.data.image_size
    return Source(model, config.model.name, args, None, None, size, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])


def source_data(source: Source, config: Config, use_checkpoint_data: bool = True) -> DataSplits:
    """The data the checkpoint was trained on (or the configured data when the user overrode it)."""
    from mobilebench.checkpoint import checkpoint_data_config

    data_cfg = checkpoint_data_config(source.blob) if use_checkpoint_data and source.blob else config.data
    data = load_data(data_cfg)
    if data.num_classes != source.num_classes:
        raise UserError(f"checkpoint {source.checkpoint} predicts {source.num_classes} classes but data {data_cfg.name} "
                        f"has {data.num_classes}; pass the data the model was trained on")
    if source.mean is None or source.std is None:
        source.mean, source.std = data.mean, data.std
    return data


def take(split: Split, n: int | None, seed: int = 0) -> Split:
    """A seeded random subset (image folders are sorted by class, so the first n would be one class)."""
    if n is None or n >= len(split):
        return split
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return Split(split.x[idx], split.y[idx])


def batches(split: Split, source: Source, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised, unaugmented float batches exactly as the model saw them in evaluation."""
    from mobilebench.loader import eval_batches

    resize = source.image_size if source.image_size != split.x.shape[-1] else None
    return eval_batches(split, batch_size, source.mean, source.std, torch.device("cpu"), channels_last=False, resize=resize)


def random_batch(source: Source, n: int, seed: int = 0) -> torch.Tensor:
    """Stand-in input for random-weight models: roughly what a normalised image looks like."""
    return torch.randn(n, 3, source.image_size, source.image_size, generator=torch.Generator().manual_seed(seed))


def runner_accuracy(run: Callable[[torch.Tensor], np.ndarray], split: Split, source: Source,
                    batch_size: int = 256) -> float:
    """Top-1 of any logits function (an onnxruntime session, a .pte runner, an exported graph) on the
    eval batches `torch_accuracy` scores."""
    correct = total = 0
    with torch.no_grad():
        for x, y in batches(split, source, batch_size):
            correct += int((np.asarray(run(x)).argmax(1) == y.numpy()).sum())
            total += len(y)
    return correct / max(total, 1)


def torch_accuracy(model: nn.Module, split: Split, source: Source, batch_size: int = 256) -> float:
    from mobilebench.engine import evaluate

    with torch.inference_mode():
        return evaluate(model, batches(split, source, batch_size), source.num_classes, torch.device("cpu")).acc


def state_bytes(model: nn.Module, path: Path | None = None) -> int:
    """Bytes of the model's state dict saved with torch.save (written to `path` when given)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())
    return buffer.tell()


def file_bytes(path: str | Path) -> int:
    return os.path.getsize(path)


def write_report(run_dir: Path, name: str, report: dict[str, Any]) -> Path:
    from mobilebench.runfiles import write_json_atomic

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / name
    write_json_atomic(path, report, json.dumps(report, indent=2, default=str) + "\n")
    return path


def mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.2f} MB"
