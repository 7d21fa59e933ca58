"""The training engine: `fit`, `train_one_epoch` and `evaluate`.

It knows modules, tensors and batches, never model names or Hydra. Everything an epoch needs is
passed in a `Parts`; everything a resume needs is in `TrainState` plus the parts' state dicts.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mobilebench.errors import UserError


class NonFiniteLoss(UserError):
    """The loss became NaN or Inf (and the policy says stop, or the skip limit was reached)."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the state is saved and the run exits non-zero."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class Parts:
    model: nn.Module  # what runs forward: maybe compiled or DDP-wrapped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None  # None: fp32
    ema: torch.optim.swa_utils.AveragedModel | None = None
    grad_clip: float = 0.0
    nan_policy: str = "stop"
    nan_skip_limit: int = 10
    max_steps_per_epoch: int | None = None
    # Knowledge distillation: a frozen module whose logits on the same batch go to
    # `loss_fn(logits, y, teacher_logits)`; None: `loss_fn(logits, y)`.
    teacher: nn.Module | None = None


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps so far
    best_val_acc: float = -1.0
    skipped_batches: int = 0
    # Mid-epoch position, set when an interrupted epoch was saved part-way through.
    step_in_epoch: int = 0
    epoch_sums: dict[str, float] = field(default_factory=dict)
    epoch_gen_state: torch.Tensor | None = None


@dataclass
class EpochStats:
    loss: float
    acc: float
    images: int
    seconds: float
    data_s: float
    teacher_s: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


@dataclass
class EvalResult:
    loss: float
    acc: float
    top5: float
    confusion: torch.Tensor  # [num_classes, num_classes] counts, rows = true class
    images: int

    @property
    def per_class_acc(self) -> list[float]:
        totals = self.confusion.sum(1).clamp_min(1)
        return (self.confusion.diag() / totals).tolist()


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class StopFlag:
    """First SIGINT/SIGTERM asks the loop to stop at the next step; a second SIGINT exits at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._exiting = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a launcher's worker): no handlers
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        if self._exiting:
            return  # keep ignoring Ctrl-C: restoring Python's handler would turn a third press into a traceback at exit
        if self.signum is not None and signal.SIGINT in self._previous:
            # The state is saved and the run is on its way out: a press that lands now would kill
            # it by signal mid-exit (no clean message, exit code -2), so ignore it.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            self._previous.pop(signal.SIGINT)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            self._exiting = True
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            sys.stderr.write("\nmobilebench: second interrupt, exiting without saving\n")
            raise SystemExit(130)
        self.signum = signum

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DistributedDataParallel


def train_one_epoch(parts: Parts, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], state: TrainState,
                    stop: StopFlag, progress: Callable[[dict[str, float]], None]) -> EpochStats:
    """One pass over `batches`, resuming at `state.step_in_epoch` when the epoch was interrupted."""
    model, opt = parts.model, parts.optimizer
    model.train()
    sums = {"loss": 0.0, "correct": 0.0, "images": 0.0, "seconds": 0.0, "data_s": 0.0, "teacher_s": 0.0,
            **state.epoch_sums}
    skip = state.step_in_epoch
    it: Iterator = iter(batches)
    t_epoch = time.perf_counter()
    for i in range(len(batches)):  # type: ignore[arg-type]
        if parts.max_steps_per_epoch is not None and i >= parts.max_steps_per_epoch:
            break
        t0 = time.perf_counter()
        x, y, *full = next(it)  # a loader for a teacher may add the batch before progressive resizing
        t_data = time.perf_counter() - t0
        if i < skip:
            continue  # replayed only so the data order and augmentation draws line up
        with autocast(parts.device, parts.amp_dtype):
            if parts.teacher is not None:
                teacher_logits, t_teacher = timed(parts.teacher, full[0] if full else x, parts.device)
                sums["teacher_s"] += t_teacher
            logits = model(x)
            loss = parts.loss_fn(logits, y) if parts.teacher is None else parts.loss_fn(logits, y, teacher_logits)
        # One device sync per step for both numbers the loop needs on the host. Mixed (soft)
        # targets count against their dominant label.
        correct = (logits.argmax(1) == (y.argmax(1) if y.ndim == 2 else y)).sum()
        loss_value, correct_value = torch.stack([loss.detach().float(), correct.float()]).tolist()
        if not math.isfinite(loss_value):
            state.skipped_batches += 1
            lr = opt.param_groups[0]["lr"]
            where = f"step {state.step}, epoch {state.epoch + 1}, lr {lr:.4g}"
            if parts.nan_policy == "stop":
                raise NonFiniteLoss(f"loss became {loss_value} at {where}; lower optimizer.lr, set trainer.grad_clip, or trainer.nan_policy=skip")
            if state.skipped_batches > parts.nan_skip_limit:
                raise NonFiniteLoss(f"loss was non-finite on {state.skipped_batches} batches (last at {where}), over trainer.nan_skip_limit={parts.nan_skip_limit}")
            opt.zero_grad(set_to_none=True)
            continue
        parts.scaler.scale(loss).backward()
        if parts.grad_clip > 0:
            parts.scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), parts.grad_clip)
        parts.scaler.step(opt)
        parts.scaler.update()
        opt.zero_grad(set_to_none=True)
        parts.scheduler.step()
        if parts.ema is not None:
            parts.ema.update_parameters(_unwrap(model))
        state.step += 1
        n = y.shape[0]
        sums["loss"] += loss_value * n
        sums["correct"] += correct_value
        sums["images"] += n
        sums["data_s"] += t_data
        state.step_in_epoch = i + 1
        state.epoch_sums = sums
        progress({"step": state.step, "step_in_epoch": i + 1, "loss": sums["loss"] / sums["images"],
                  "acc": sums["correct"] / sums["images"],
                  "lr": opt.param_groups[0]["lr"], "images": sums["images"],
                  "seconds": sums["seconds"] + time.perf_counter() - t_epoch})
        if i + 1 < len(batches):  # type: ignore[arg-type]
            stop.check()
    seconds = sums["seconds"] + time.perf_counter() - t_epoch
    images = max(sums["images"], 1)
    state.step_in_epoch, state.epoch_sums = 0, {}
    return EpochStats(sums["loss"] / images, sums["correct"] / images, int(sums["images"]), seconds, sums["data_s"],
                      sums["teacher_s"])


def timed(module: nn.Module, x: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, float]:
    """`module(x)` and its seconds; on a GPU the queue is drained on both sides so the time is the
    module's own (two syncs a step, paid only by runs that ask for this split, i.e. distillation)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = module(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


class _Tally:
    """Running cross-entropy, top-5 hits and confusion matrix of one way of scoring the images."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.num_classes, self.loss_sum, self.top5_hits, self.images = num_classes, 0.0, 0, 0
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def add(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        c = self.num_classes
        self.loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        self.top5_hits += (logits.topk(min(5, c), dim=1).indices == y[:, None]).any(1).sum().item()
        self.confusion += torch.bincount(y * c + logits.argmax(1), minlength=c**2).view(c, c)
        self.images += y.shape[0]

    def result(self) -> EvalResult:
        n, confusion = max(self.images, 1), self.confusion.cpu()
        return EvalResult(self.loss_sum / n, confusion.diag().sum().item() / n, self.top5_hits / n, confusion, self.images)


@torch.no_grad()
def evaluate_views(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                   device: torch.device, amp_dtype: torch.dtype | None, tta: str) -> tuple[EvalResult, EvalResult | None]:
    """One pass over the batches: the single-view result, and with `tta == "flip"` also the result
    of scoring each image by the mean of its own and its mirror image's logits (None otherwise)."""
    was_training = model.training
    model.eval()
    single, flipped = _Tally(num_classes, device), (_Tally(num_classes, device) if tta == "flip" else None)
    for x, y in batches:
        with autocast(device, amp_dtype):
            logits = model(x).float()
            mirrored = model(x.flip(3)).float() if flipped is not None else None
        single.add(logits, y)
        if flipped is not None:
            flipped.add((logits + mirrored) / 2, y)
    model.train(was_training)
    return single.result(), flipped.result() if flipped is not None else None


def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
             device: torch.device, amp_dtype: torch.dtype | None = None) -> EvalResult:
    """Loss, top-1, top-5 and the confusion matrix over all batches (plain cross-entropy)."""
    return evaluate_views(model, batches, num_classes, device, amp_dtype, "none")[0]


@dataclass
class FitHooks:
    """What `fit` calls out to: the run's I/O, kept out of the engine."""

    epoch_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # train batches for 0-based epoch
    validate: Callable[[nn.Module], EvalResult | None]  # None when there is no validation split
    save: Callable[[TrainState, bool], None]  # (state, is_best)
    log_epoch: Callable[[dict[str, Any]], None]
    progress: Callable[[int], Callable[[dict[str, float]], None]]  # per-epoch step callback factory
    capture_gen: Callable[[], torch.Tensor]  # data generator state before an epoch's batches are drawn
    restore_gen: Callable[[torch.Tensor], None]


def fit(parts: Parts, state: TrainState, epochs: int, hooks: FitHooks) -> TrainState:
    """Train until `epochs` are complete, validating and checkpointing after each one.

    A SIGINT/SIGTERM saves the mid-epoch state (data generator at the epoch's start plus the
    step reached) and raises `Interrupted`; resuming replays that epoch's batch draws and
    continues, so the run ends with the same weights as one never interrupted.
    """
    with StopFlag() as stop:
        while state.epoch < epochs:
            if state.epoch_gen_state is not None:
                hooks.restore_gen(state.epoch_gen_state)
            state.epoch_gen_state = hooks.capture_gen()
            try:
                stats = train_one_epoch(parts, hooks.epoch_batches(state.epoch), state, stop, hooks.progress(state.epoch + 1))
            except Interrupted:
                hooks.save(state, False)
                hooks.log_epoch({"epoch": state.epoch + 1, "interrupted": True, "step": state.step,
                                 "step_in_epoch": state.step_in_epoch, "signal": stop.signum})
                raise
            t0 = time.perf_counter()
            eval_model = parts.ema if parts.ema is not None else parts.model
            val = hooks.validate(eval_model)
            eval_s = time.perf_counter() - t0
            state.epoch += 1
            state.epoch_gen_state = None
            is_best = val is not None and val.acc > state.best_val_acc
            if is_best:
                state.best_val_acc = val.acc
            hooks.log_epoch({
                "epoch": state.epoch, "step": state.step, "lr": parts.optimizer.param_groups[0]["lr"],
                "train_loss": stats.loss, "train_acc": stats.acc,
                "val_loss": val.loss if val else None, "val_acc": val.acc if val else None,
                "val_top5": val.top5 if val else None,
                "epoch_s": stats.seconds + eval_s, "train_images_per_s": stats.images_per_s,
                "data_s": stats.data_s, "compute_s": stats.seconds - stats.data_s, "eval_s": eval_s,
                **({"teacher_s": stats.teacher_s} if parts.teacher is not None else {}),
            })
            hooks.save(state, is_best or val is None)
            stop.check()
    return state
