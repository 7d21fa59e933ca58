"""Optimizer, learning-rate schedule and EMA: the training choices that are not the model.

Small pure functions; `trainer.build_trainer` puts them together for every command that trains.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mobilebench.config import OptimizerConfig, SchedulerConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay only weight matrices and conv kernels: decaying BN scales and biases hurts accuracy."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def scaled_lr(o: OptimizerConfig, global_batch_size: int) -> float:
    """`optimizer.lr` is per `optimizer.base_batch_size` images (when set): scale it linearly."""
    if o.base_batch_size is None:
        return o.lr
    return o.lr * global_batch_size / o.base_batch_size


def build_optimizer(o: OptimizerConfig, model: nn.Module, lr: float, fused: bool = True) -> torch.optim.Optimizer:
    """The configured optimizer over `param_groups`.

    `fused`: torch's one-kernel-per-step implementation on CPU and CUDA, where the optimizer has
    one (RMSprop takes the multi-tensor one). Same update rule; without it, torch's CPU default
    loops over parameters in Python, several times slower per step. False gives torch's defaults,
    as a plain script would (`mobilebench bench`'s baseline).
    """
    groups = param_groups(model, o.weight_decay)
    impl: dict[str, bool] = {}
    if fused and all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"]):
        impl = {"foreach" if o.name == "rmsprop" else "fused": True}  # RMSprop has no fused kernel
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0, **impl)
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=tuple(o.betas), eps=o.eps, **impl)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), eps=o.eps, **impl)
    return torch.optim.RMSprop(groups, lr=lr, alpha=o.alpha, eps=o.eps, momentum=o.momentum, **impl)


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str, eta_min_ratio: float = 0.0,
              steps_per_epoch: int = 1, step_size: int = 30, gamma: float = 0.1) -> float:
    """Multiplier of the base lr at optimizer step `step` (linear warmup, then the schedule)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return eta_min_ratio + (1 - eta_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "step":
        return gamma ** (step // (steps_per_epoch * step_size))
    return 1.0


def build_scheduler(s: SchedulerConfig, optimizer: torch.optim.Optimizer, lr: float, steps_per_epoch: int,
                    epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR: linear warmup over `s.warmup_epochs`, then `s.name` over the rest."""
    total = steps_per_epoch * epochs
    warmup = round(s.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        return lr_factor(step, total, warmup, s.name, s.eta_min / lr, steps_per_epoch, s.step_size, s.gamma)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_ema(decay: float):  # noqa: ANN201 - an AveragedModel multi_avg_fn
    """EMA whose decay ramps up as min(decay, (1 + n) / (10 + n)).

    A fixed 0.999 keeps ~5% of the first steps' weights and BatchNorm statistics after 3000
    steps, and early running variances can be orders of magnitude off; the ramp forgets them.
    """
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        if ema_params[0].is_floating_point():
            torch._foreach_lerp_(ema_params, params, weight)
        else:  # integer buffers such as num_batches_tracked
            for ema, value in zip(ema_params, params):
                ema.copy_(value)

    return update
