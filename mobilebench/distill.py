"""Knowledge distillation: a frozen teacher's softened logits as a second training target.

Loss = (1 - alpha) * CE(student, labels; label smoothing) + alpha * T^2 * KL(teacher/T || student/T),
Hinton et al.'s formulation (the T^2 keeps the soft term's gradient scale independent of T). The
teacher is any mobilebench checkpoint, rebuilt from its own stored model config, run in eval mode
without gradients on the student's augmented batch.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mobilebench.checkpoint import load_model_and_checkpoint, resolve_checkpoint
from mobilebench.config import DistillConfig
from mobilebench.errors import UserError

log = logging.getLogger("mobilebench")


class DistillationLoss(nn.Module):
    """`forward(student_logits, target, teacher_logits)`; target: class indices or soft targets (MixUp)."""

    def __init__(self, alpha: float, temperature: float, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.alpha, self.temperature = alpha, temperature
        self.ce = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        hard = self.ce(logits, target)
        if self.alpha == 0:
            return hard  # exactly the plain loss, whatever the teacher says
        t = self.temperature
        # In fp32 whatever the autocast dtype: log-probabilities of soft targets underflow in bf16.
        student = F.log_softmax(logits.float() / t, dim=1)
        teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
        soft = F.kl_div(student, teacher, log_target=True, reduction="batchmean") * t * t
        return (1 - self.alpha) * hard + self.alpha * soft


class TeacherModel(nn.Module):
    """The frozen teacher: eval mode whatever its caller asks, no gradients."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> TeacherModel:
        return super().train(False)  # BatchNorm always uses the teacher's running statistics

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@dataclass
class Teacher:
    module: TeacherModel
    record: dict[str, Any]  # what summary.json and the checkpoint say about it


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_teacher(cfg: DistillConfig, classes: list[str], device: torch.device, channels_last: bool,
                 norm: tuple[list[float], list[float]]) -> Teacher:
    """The teacher `cfg.teacher` names, checked against the student's classes, ready on `device`.

    The teacher gets the student's normalised batch; `norm` (the student's mean/std) is compared
    with the teacher's own so a mismatch is said rather than silently costing accuracy.
    """
    path = resolve_checkpoint(str(cfg.teacher))
    if not path.exists():
        raise UserError(f"distill.teacher={cfg.teacher} does not exist; train the teacher first (the presets: "
                        "experiment=cifar10_v3_large_teacher) or pass distill.teacher=PATH to a checkpoint or run dir")
    # Building the model draws its (then overwritten) initial weights from torch's global RNG; keep
    # that stream as it was, so a run with a teacher initialises and drops out like one without.
    with torch.random.fork_rng(devices=[]):
        model, blob = load_model_and_checkpoint(path, device)
    theirs = list((blob.get("data") or {}).get("classes") or [])
    n = blob["model_args"].get("num_classes")
    if n != len(classes) or (theirs and theirs != list(classes)):
        shown = ", ".join(theirs[:4]) + (", ..." if len(theirs) > 4 else "") if theirs else "unknown names"
        raise UserError(f"distill.teacher={cfg.teacher} was trained on {n} classes ({shown}), but this data has "
                        f"{len(classes)} ({', '.join(classes[:4])}{', ...' if len(classes) > 4 else ''}); "
                        "pass a teacher trained on the same classes")
    stats = blob.get("data") or {}
    if stats.get("mean") and max(abs(a - b) for a, b in zip([*stats["mean"], *stats["std"]], [*norm[0], *norm[1]])) > 0.01:
        log.warning("the teacher was trained with mean %s / std %s, this data is normalised "
                    "with %s / %s; it sees the student's batches as they are", stats["mean"], stats["std"], *norm)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    record = {"path": str(path.resolve()), "sha256": file_sha256(path), "model": blob["model_args"]["name"],
              "model_args": blob["model_args"], "params": sum(p.numel() for p in model.parameters()),
              "input": cfg.teacher_input, "alpha": cfg.alpha, "temperature": cfg.temperature, "test_acc": None}
    return Teacher(TeacherModel(model), record)


def check_same_teacher(record: dict[str, Any] | None, stored: dict[str, Any] | None, ckpt: Path) -> None:
    """A resumed run must keep the teacher it started with, or its later epochs learn other targets."""
    if record is None and stored is None:
        return
    if record is None:
        raise UserError(f"{ckpt} was trained with distill.teacher={stored['path']}; resume with that teacher "
                        "(or start a new run dir to train without one)")
    if stored is None:
        raise UserError(f"{ckpt} was trained without a teacher; resume it without distill.teacher, or start a new "
                        "run dir for the distilled run")
    if stored.get("sha256") != record["sha256"]:
        raise UserError(f"distill.teacher={record['path']} is not the teacher {ckpt} was trained with "
                        f"({stored.get('path')}, sha256 {str(stored.get('sha256'))[:12]}...); resume with that file, "
                        "or start a new run dir")
