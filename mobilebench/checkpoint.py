"""Checkpoints: atomic saves, safe loads, and models rebuilt from their own checkpoint.

A checkpoint holds only tensors and plain Python types, so it loads with
`torch.load(weights_only=True)`: a file carrying arbitrary pickled objects is refused before any
of its code can run. The resolved config is stored as a plain dict, which is what lets
`load_model` rebuild the network without the caller knowing which one it is.
"""

from __future__ import annotations

import logging
import pickle
import random
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mobilebench.config import DataConfig, section_from_dict
from mobilebench.errors import UserError
from mobilebench.runfiles import atomic_write

if TYPE_CHECKING:
    from mobilebench.data import DataSplits
    from mobilebench.engine import Parts, TrainState

log = logging.getLogger("mobilebench")

FORMAT_VERSION = 1
_CODE_SIGNS = ("GLOBAL", "allowlist", "call reduce")


class CheckpointError(UserError):
    """A checkpoint that is missing, unsafe, corrupt or does not fit."""


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Write with `runfiles.atomic_write` (fsynced): a crash mid-save leaves the old file intact."""
    path = Path(path)
    try:
        atomic_write(path, lambda f: torch.save({"format_version": FORMAT_VERSION, **payload}, f), fsync=True)
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoint {path}: {err.strerror or err}; free disk space or pick a writable hydra.run.dir") from None


EXPORTED = {".onnx": "an ONNX model", ".pte": "an ExecuTorch program", ".pt2": "a torch.export program"}


def resolve_checkpoint(path: str | Path, prefer: tuple[str, ...] = ("best.pt", "last.pt")) -> Path:
    """The .pt file `path` names, as users type it: a file, a run dir or its checkpoints/ dir.

    A dir resolves to the first of `prefer` it holds (training resumes prefer last.pt), and the log
    says which. A dir without checkpoints, an exported model or an empty file is one line naming it.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        for name in prefer:
            for candidate in (p / "checkpoints" / name, p / name):
                if candidate.is_file():
                    log.info("checkpoint %s is a run dir: using %s", path, candidate)
                    return candidate
        raise CheckpointError(f"{p} is a directory without checkpoints ({' or '.join(f'checkpoints/{n}' for n in prefer)}); "
                              "pass a run dir that finished at least one epoch, or the .pt file itself")
    if p.suffix in EXPORTED:
        raise CheckpointError(f"{p} is {EXPORTED[p.suffix]}, not a training checkpoint; pass the .pt it was exported "
                              "from (a run's checkpoints/best.pt) or its run dir")
    if p.is_file() and p.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {p} is empty (0 bytes), likely cut off by a full disk or a kill; "
                              "use another checkpoint, e.g. last.pt instead of best.pt")
    return p


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a mobilebench checkpoint; every failure is one CheckpointError line."""
    path = resolve_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass checkpoint=PATH to a .pt file from a run's checkpoints/ dir")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # Every weights_only failure mentions weights_only, garbage bytes included; only these
        # say the file asked for a Python global or callable, i.e. it carries code.
        if any(sign in str(err) for sign in _CODE_SIGNS):
            raise CheckpointError(
                f"checkpoint {path} contains pickled Python objects that could run code; refused "
                "(mobilebench checkpoints hold only tensors and plain types)"
            ) from None
        raise CheckpointError(f"checkpoint {path} is corrupt ({_unpickle_reason(err)}); use another checkpoint") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({first}); use another checkpoint, e.g. last.pt instead of best.pt") from None
    if not isinstance(blob, dict) or "model_args" not in blob or "model" not in blob:
        raise CheckpointError(f"{path} is not a mobilebench checkpoint (no model_args / model weights)")
    version = blob.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version}, newer than this mobilebench reads ({FORMAT_VERSION}); upgrade mobilebench"
        )
    return blob


def _unpickle_reason(err: Exception) -> str:
    """The unpickler's own reason, without torch's advice to retry with weights_only=False."""
    text = str(err)
    _, marker, rest = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (rest if marker else text).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def inference_state_dict(blob: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights to deploy: the EMA copy when the run kept one, else the trained weights."""
    ema = blob.get("ema")
    if ema:
        return {k.removeprefix("module."): v for k, v in ema.items() if k != "n_averaged"}
    return blob["model"]


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:200]
        raise CheckpointError(f"checkpoint {path} does not fit the model it names ({detail})") from None


def load_model_and_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The rebuilt model (eval mode, EMA weights when present) and the checkpoint it came from."""
    from mobilebench.models import build_model

    blob = load_checkpoint(path, map_location)
    try:
        model = build_model(**blob["model_args"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} names a model this version cannot build ({err})") from None
    load_weights(model, inference_state_dict(blob), path)
    return model.to(map_location).eval(), blob


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model from the config stored in the checkpoint and load its weights (EMA when present)."""
    return load_model_and_checkpoint(path, map_location)[0]


def checkpoint_data_config(blob: dict[str, Any]) -> DataConfig:
    """The data config the checkpoint was trained with (for commands run without data overrides)."""
    return section_from_dict(DataConfig, (blob.get("config") or {}).get("data"))


def checkpoint_payload(cfg_dict: dict[str, Any], args: dict[str, Any], raw: nn.Module, parts: Parts,
                       state: TrainState, gen: torch.Generator, data: DataSplits) -> dict[str, Any]:
    """Everything a bit-exact resume needs, in plain types (format version 1; see `load_checkpoint`)."""
    return {
        "model_args": args,
        "model": raw.state_dict(),
        "ema": parts.ema.state_dict() if parts.ema is not None else None,
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "state": {k: v for k, v in asdict(state).items() if k != "epoch_gen_state"},
        "epoch_gen_state": state.epoch_gen_state,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "data": gen.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "config": cfg_dict,
        "data": {"classes": data.classes, "mean": data.mean, "std": data.std, "image_size": data.train.x.shape[-1]},
    }


def restore(blob: dict[str, Any], path: Path, args: dict[str, Any], raw: nn.Module, parts: Parts,
            gen: torch.Generator) -> TrainState:
    """Load a checkpoint's weights, optimizer, schedule and RNG states; returns where training stood."""
    from mobilebench.engine import TrainState

    if blob["model_args"] != args:
        raise CheckpointError(f"checkpoint {path} is for model {blob['model_args']}, but this run builds {args}; "
                              "resume with the same model settings or start a new run dir")
    load_weights(raw, blob["model"], path)
    if parts.ema is not None and blob.get("ema"):
        parts.ema.load_state_dict(blob["ema"])
    try:
        parts.optimizer.load_state_dict(blob["optimizer"])
        parts.scheduler.load_state_dict(blob["scheduler"])
        parts.scaler.load_state_dict(blob["scaler"])
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {path} has optimizer state that does not fit this config ({err})") from None
    rng = blob["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(_as_tuple(rng["python"]))
    gen.set_state(rng["data"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return TrainState(**blob["state"], epoch_gen_state=blob.get("epoch_gen_state"))


def _as_tuple(obj: Any) -> Any:
    return tuple(_as_tuple(o) for o in obj) if isinstance(obj, (list, tuple)) else obj
