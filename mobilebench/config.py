"""The structured schema every composed config is checked against before any work starts.

Plain dataclasses (no Hydra import): `cli.py` merges the composed YAML into
`OmegaConf.structured(Config)`, which rejects unknown keys and wrong types, then `validate`
checks ranges and choices. Each group has one dataclass holding the fields of all its options,
so a typo in any option is an error rather than a silently ignored key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from mobilebench.errors import UserError

MODELS = ("v1", "v2", "v3_small", "v3_large")
STEMS = ("cifar", "imagenet")
DATASETS = ("cifar10", "cifar100", "imagefolder", "synthetic")
POLICIES = ("none", "trivialaugment", "autoaugment")
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULERS = ("cosine", "step", "none")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE = ("auto", "on", "off")
CPU_ALLOCATORS = ("cache", "system")
NAN_POLICIES = ("stop", "skip")
TTA = ("none", "flip")
COMMANDS = ("train", "eval", "summary", "bench", "export", "quantize", "prune")


@dataclass
class ModelConfig:
    name: str = "v3_small"
    width_mult: float = 1.0
    stem: str = "cifar"
    dropout: Optional[float] = None  # None: the paper's value
    pretrained: bool = False
    num_classes: Optional[int] = None  # None: taken from the data set
    # Expanded width of each inverted-residual row, set by channel pruning so a pruned
    # checkpoint rebuilds its own (smaller) model.
    hidden_channels: Optional[list[int]] = None


@dataclass
class DataConfig:
    name: str = "cifar10"
    root: str = "data"
    download: bool = True
    val_size: int = 5000
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    image_size: int = 32
    batch_size: int = 128
    num_workers: int = 2
    num_classes: Optional[int] = None  # synthetic only; others read it from the files
    mean: Optional[list[float]] = None  # None: measured on the training split
    std: Optional[list[float]] = None
    split_seed: int = 0  # fixed so every seed of a sweep validates on the same images
    cache_dir: Optional[str] = None  # imagefolder decode cache; None: beside the data
    device_resident: str = "auto"  # keep the uint8 set on the training device: auto|on|off


@dataclass
class AugmentConfig:
    name: str = "basic"
    crop_padding: int = 4  # 0 disables the random crop
    flip: bool = True
    cutout: int = 0  # side of a zeroed square, 0 disables
    policy: str = "none"  # per-image policy; needs the DataLoader path
    random_erasing: float = 0.0  # probability; needs the DataLoader path
    resize: Optional[int] = None  # the tutorial's Resize(224); needs the DataLoader path
    # Progressive resizing (the FFCV / fast.ai trick): early epochs train on batches downscaled
    # to `min_size`, growing linearly to data.image_size over the first `ramp` fraction of the
    # epochs; later epochs and all evaluation run at full size. null disables.
    min_size: Optional[int] = None
    ramp: float = 0.8
    size_step: int = 4  # sizes are rounded down to a multiple of this

    def needs_dataloader(self) -> bool:
        """Whether a policy exists only per image (the torchvision DataLoader path), not batched."""
        return self.policy != "none" or self.random_erasing > 0 or self.resize is not None


@dataclass
class OptimizerConfig:
    name: str = "sgd"
    lr: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    nesterov: bool = True
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    alpha: float = 0.99  # RMSprop smoothing
    # lr is given for this batch size and scaled linearly with data.batch_size * world size.
    base_batch_size: Optional[int] = None


@dataclass
class SchedulerConfig:
    name: str = "cosine"
    warmup_epochs: float = 0.0
    eta_min: float = 0.0  # absolute lr at the end of the cosine
    step_size: int = 30  # epochs, step scheduler
    gamma: float = 0.1


@dataclass
class TrainerConfig:
    epochs: int = 10
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    compile: str = "off"
    grad_clip: float = 0.0  # max grad norm, 0 disables
    label_smoothing: float = 0.0
    ema: bool = False
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 50  # steps between plain log lines
    max_steps_per_epoch: Optional[int] = None  # cap for smoke tests and benchmarks
    resume: Optional[str] = None  # auto, or a checkpoint path
    overwrite: bool = False
    nan_policy: str = "stop"
    nan_skip_limit: int = 10
    threads: Optional[int] = None  # torch intra-op threads; None: torch's default
    cpu_allocator: str = "cache"  # cache: glibc keeps freed tensor memory for reuse; system: glibc's own policy
    progress: str = "auto"  # auto|bar|log
    sync_bn: bool = False
    bn_momentum: Optional[float] = 0.1  # None: each model's own (V3: 0.01)
    # Test-time augmentation for the final test pass (train) and `mobilebench eval`: flip averages
    # the logits of each image and its mirror. test_acc stays the single-view figure; the
    # averaged one is reported beside it as test_acc_tta. Validation is always single-view.
    tta: str = "none"


@dataclass
class SummaryConfig:
    format: str = "table"  # table|json


@dataclass
class Config:
    command: str = "train"
    checkpoint: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    summary: SummaryConfig = field(default_factory=SummaryConfig)
    # Sections owned by the deployment, benchmark and report commands; checked there.
    bench: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)
    quantize: dict[str, Any] = field(default_factory=dict)
    prune: dict[str, Any] = field(default_factory=dict)


class ConfigError(UserError):
    """A user mistake in the configuration; the CLI prints it as one line and exits 2."""


def _choice(key: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}")


def _at_least(key: str, value: float | int | None, low: float, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value is None or value < low:
        raise ConfigError(f"{key}={value} is out of range; it must be >= {low}")


def validate(cfg: Config) -> None:
    """Range and choice checks the type system cannot express. Raises ConfigError."""
    _choice("command", cfg.command, COMMANDS)
    m, d, a, o, s, t = cfg.model, cfg.data, cfg.augment, cfg.optimizer, cfg.scheduler, cfg.trainer
    _choice("model.name", m.name, MODELS)
    _choice("model.stem", m.stem, STEMS)
    if m.width_mult <= 0:
        raise ConfigError(f"model.width_mult={m.width_mult} is out of range; it must be > 0")
    if m.dropout is not None and not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout={m.dropout} is out of range; it must be in [0, 1)")
    _at_least("model.num_classes", m.num_classes, 2)
    _choice("data.name", d.name, DATASETS)
    _at_least("data.val_size", d.val_size, 0, allow_none=False)
    _at_least("data.train_subset", d.train_subset, 1)
    _at_least("data.test_subset", d.test_subset, 1)
    _at_least("data.image_size", d.image_size, 8, allow_none=False)
    _at_least("data.batch_size", d.batch_size, 1, allow_none=False)
    _at_least("data.num_workers", d.num_workers, 0, allow_none=False)
    _at_least("data.num_classes", d.num_classes, 2)
    _choice("data.device_resident", d.device_resident, ("auto", "on", "off"))
    for key, stats in (("data.mean", d.mean), ("data.std", d.std)):
        if stats is not None and len(stats) != 3:
            raise ConfigError(f"{key} must list 3 values (one per RGB channel), got {len(stats)}")
    if d.std is not None and min(d.std) <= 0:
        raise ConfigError("data.std values must be > 0")
    _choice("augment.policy", a.policy, POLICIES)
    _at_least("augment.crop_padding", a.crop_padding, 0, allow_none=False)
    _at_least("augment.cutout", a.cutout, 0, allow_none=False)
    if not 0.0 <= a.random_erasing <= 1.0:
        raise ConfigError(f"augment.random_erasing={a.random_erasing} must be a probability in [0, 1]")
    _at_least("augment.resize", a.resize, 8)
    _at_least("augment.min_size", a.min_size, 8)
    _at_least("augment.size_step", a.size_step, 1, allow_none=False)
    if not 0.0 <= a.ramp <= 1.0:
        raise ConfigError(f"augment.ramp={a.ramp} must be a fraction of the epochs in [0, 1]")
    if a.min_size is not None and a.min_size > d.image_size:
        raise ConfigError(f"augment.min_size={a.min_size} is above data.image_size={d.image_size}; lower it or set augment.min_size=null")
    if a.min_size is not None and a.needs_dataloader():
        raise ConfigError("augment.min_size (progressive resizing) needs the in-memory loader: "
                          "set augment.policy=none, augment.random_erasing=0 and augment.resize=null, or augment.min_size=null")
    _choice("optimizer.name", o.name, OPTIMIZERS)
    if o.lr <= 0:
        raise ConfigError(f"optimizer.lr={o.lr} is out of range; it must be > 0")
    _at_least("optimizer.weight_decay", o.weight_decay, 0.0, allow_none=False)
    _at_least("optimizer.base_batch_size", o.base_batch_size, 1)
    if len(o.betas) != 2:
        raise ConfigError(f"optimizer.betas must list 2 values, got {len(o.betas)}")
    _choice("scheduler.name", s.name, SCHEDULERS)
    _at_least("scheduler.warmup_epochs", s.warmup_epochs, 0.0, allow_none=False)
    _at_least("scheduler.step_size", s.step_size, 1, allow_none=False)
    _at_least("trainer.epochs", t.epochs, 1, allow_none=False)
    _choice("trainer.device", t.device, DEVICES)
    _choice("trainer.precision", t.precision, PRECISIONS)
    # Hydra parses `trainer.compile=true` as a bool; accept it as "on".
    t.compile = {"true": "on", "false": "off"}.get(str(t.compile).lower(), str(t.compile).lower())
    _choice("trainer.compile", t.compile, COMPILE)
    _choice("trainer.nan_policy", t.nan_policy, NAN_POLICIES)
    _choice("trainer.progress", t.progress, ("auto", "bar", "log"))
    _at_least("trainer.grad_clip", t.grad_clip, 0.0, allow_none=False)
    if not 0.0 <= t.label_smoothing < 1.0:
        raise ConfigError(f"trainer.label_smoothing={t.label_smoothing} must be in [0, 1)")
    if not 0.0 < t.ema_decay < 1.0:
        raise ConfigError(f"trainer.ema_decay={t.ema_decay} must be in (0, 1)")
    _at_least("trainer.log_every", t.log_every, 1, allow_none=False)
    _at_least("trainer.max_steps_per_epoch", t.max_steps_per_epoch, 1)
    _at_least("trainer.threads", t.threads, 1)
    _choice("trainer.cpu_allocator", t.cpu_allocator, CPU_ALLOCATORS)
    _choice("trainer.tta", t.tta, TTA)
    if t.bn_momentum is not None and not 0.0 < t.bn_momentum <= 1.0:
        raise ConfigError(f"trainer.bn_momentum={t.bn_momentum} must be in (0, 1] or null")
    _choice("summary.format", cfg.summary.format, ("table", "json"))
