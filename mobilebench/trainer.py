"""The one way to build a trainer: the model from its config, then the parts `engine.fit` runs.

`train`, prune's fine-tune and `bench train` all call `build_trainer`, so the model they train is
prepared alike: device, BatchNorm momentum, memory format, the CPU fast paths
(`trainer.cpu_kernels`), SyncBatchNorm, DDP and compile, then optimizer, schedule, scaler, loss
and EMA.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mobilebench import accel, engine
from mobilebench.config import Config, ModelConfig
from mobilebench.data import DataSplits
from mobilebench.distill import DistillationLoss
from mobilebench.errors import UserError
from mobilebench.loader import DataLoaderPath, TensorLoader, free_memory, resident_device, window_bytes
from mobilebench.mixing import Mixer
from mobilebench.optim import build_optimizer, build_scheduler, scaled_lr, warmup_ema
from mobilebench.runtime import PRECISION_DTYPES, World, resolve_compile, sync_batchnorm

log = logging.getLogger("mobilebench")


def model_args(m: ModelConfig, num_classes: int) -> dict[str, Any]:
    """The `build_model` keyword arguments of a model config; checkpoints store them."""
    args: dict[str, Any] = {"name": m.name, "num_classes": m.num_classes or num_classes, "width_mult": m.width_mult,
                            "stem": m.stem, "dropout": m.dropout}
    if m.hidden_channels is not None:
        args["hidden_channels"] = list(m.hidden_channels)
    return args


def build_from_config(m: ModelConfig, num_classes: int) -> nn.Module:
    """The plain model `m` describes, with torchvision's ImageNet weights when `m.pretrained`."""
    from mobilebench.models import build_model

    args = model_args(m, num_classes)
    if not m.pretrained:
        return build_model(**args)
    from mobilebench.models import load_torchvision_weights, pretrained_state_dict, replace_classifier

    if m.stem != "imagenet":
        raise UserError("model.pretrained=true needs model.stem=imagenet (the ImageNet weights' stem)")
    model = build_model(m.name, num_classes=1000, width_mult=m.width_mult, stem="imagenet", dropout=m.dropout)
    try:
        load_torchvision_weights(model, pretrained_state_dict(m.name))
    except (RuntimeError, ValueError) as err:
        raise UserError(str(err).splitlines()[0]) from None
    if args["num_classes"] != 1000:
        replace_classifier(model, args["num_classes"])
    return model


def set_bn_momentum(model: nn.Module, momentum: float) -> None:
    """A training choice, not architecture: it changes no weight, only how fast running stats follow."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum


def build_train_loader(cfg: Config, data: DataSplits, device: torch.device, gen: torch.Generator,
                       world: World = World(), keep_full: bool = False) -> TensorLoader | DataLoaderPath:
    """The in-memory tensor loader, or torchvision's DataLoader for per-image policies.

    `keep_full`: the tensor loader also yields each batch as it was before progressive resizing.
    """
    shared = (data.train, cfg.data.batch_size, cfg.augment, data.mean, data.std, device, gen)
    options = {"channels_last": cfg.trainer.channels_last, "shard": (world.rank, world.size),
               "mixer": Mixer.from_config(cfg.augment, data.num_classes)}
    if cfg.augment.needs_dataloader():
        return DataLoaderPath(*shared, num_workers=cfg.data.num_workers, **options)
    nbytes = window_bytes(data.train, cfg.augment)
    store = resident_device(cfg.data.device_resident, nbytes, device, free_memory(device))
    if store != device:
        log.info("training images stay in host memory (%d MB of crop windows, data.device_resident=%s); "
                 "each batch is copied to %s", nbytes // 2**20, cfg.data.device_resident, device)
    return TensorLoader(*shared, store=store, keep_full=keep_full, **options)


@dataclass
class Trainer:
    raw: nn.Module  # the unwrapped model: its state dict is what checkpoints store
    parts: engine.Parts
    fast_paths: dict[str, int] = field(default_factory=dict)  # accel.convert's swaps; {} when off


def build_trainer(cfg: Config, model: nn.Module, device: torch.device, precision: str, steps_per_epoch: int,
                  world: World = World(), teacher: nn.Module | None = None) -> Trainer:
    """Prepare a plain `model` for training on `device` and build the parts around it.

    Reads `cfg.trainer`, `cfg.optimizer`, `cfg.scheduler` and `cfg.data.batch_size`; with a
    `teacher` (distill.py's frozen module) also `cfg.distill`.
    """
    t = cfg.trainer
    raw = model.to(device)
    if t.bn_momentum is not None:
        set_bn_momentum(raw, t.bn_momentum)
    if t.channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    compiled = resolve_compile(t.compile, device)
    amp_dtype = PRECISION_DTYPES[precision]
    fast: dict[str, int] = {}
    if accel.enabled(t.cpu_kernels, device, compiled):
        fast = accel.convert(raw, device, amp_dtype, t.channels_last)
    if t.sync_bn and world.size > 1:
        raw = sync_batchnorm(raw, device)
    wrapped: nn.Module = raw
    if world.size > 1:
        wrapped = nn.parallel.DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None)
    if compiled:
        wrapped = torch.compile(wrapped)
    lr = scaled_lr(cfg.optimizer, cfg.data.batch_size * world.size)
    optimizer = build_optimizer(cfg.optimizer, raw, lr)
    ema = None
    if t.ema:
        ema = torch.optim.swa_utils.AveragedModel(raw, multi_avg_fn=warmup_ema(t.ema_decay), use_buffers=True)
    loss: nn.Module = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    if teacher is not None:
        loss = DistillationLoss(cfg.distill.alpha, cfg.distill.temperature, t.label_smoothing)
    parts = engine.Parts(
        model=wrapped, optimizer=optimizer,
        scheduler=build_scheduler(cfg.scheduler, optimizer, lr, steps_per_epoch, t.epochs),
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        loss_fn=loss, device=device, amp_dtype=amp_dtype, ema=ema,
        grad_clip=t.grad_clip, nan_policy=t.nan_policy, nan_skip_limit=t.nan_skip_limit,
        max_steps_per_epoch=t.max_steps_per_epoch, teacher=teacher)
    return Trainer(raw, parts, fast)
