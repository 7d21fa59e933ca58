"""Range and choice checks the type system cannot express, run before any work starts.

Every message is one line naming the key, the bad value and what is valid; `cli.py` prints it and
exits 2. All sections are checked for every command, so a mistake never waits for the command
that reads it.
"""

from __future__ import annotations

from mobilebench.config import (
    BENCH_MODES,
    CALIBRATION_METHODS,
    COMMANDS,
    COMPILE,
    CPU_ALLOCATORS,
    CPU_KERNELS,
    DATASETS,
    DEVICES,
    EXPORT_FORMATS,
    EXPORTERS,
    LATENCY_BACKENDS,
    NAN_POLICIES,
    OPTIMIZERS,
    POLICIES,
    PRECISIONS,
    PRUNE_METHODS,
    QAT_RANGES,
    QUANTIZE_GROUPS,
    QUANTIZE_METHODS,
    SCHEDULERS,
    STEMS,
    TEACHER_INPUTS,
    TTA,
    BenchConfig,
    Config,
    ConfigError,
    DistillConfig,
    ExportConfig,
    PredictConfig,
    PruneConfig,
    QuantizeConfig,
)
from mobilebench.models import MODEL_NAMES


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
    _choice("model.name", m.name, MODEL_NAMES)
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
    _at_least("augment.mixup_alpha", a.mixup_alpha, 0.0, allow_none=False)
    _at_least("augment.cutmix_alpha", a.cutmix_alpha, 0.0, allow_none=False)
    if not 0.0 <= a.mix_prob <= 1.0:
        raise ConfigError(f"augment.mix_prob={a.mix_prob} must be a probability in [0, 1]")
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
    _choice("trainer.cpu_kernels", t.cpu_kernels, CPU_KERNELS)
    _choice("summary.format", cfg.summary.format, ("table", "json"))
    validate_bench(cfg.bench)
    validate_export(cfg.export)
    validate_quantize(cfg.quantize)
    validate_prune(cfg.prune)
    validate_predict(cfg.predict)
    validate_distill(cfg.distill)


def validate_bench(b: BenchConfig) -> None:
    _choice("bench.mode", b.mode, BENCH_MODES)
    for key in ("steps", "data_batches", "rounds", "repeats", "calib_size"):
        _at_least(f"bench.{key}", getattr(b, key), 1, allow_none=False)
    for key in ("warmup_steps", "data_warmup_batches", "baseline_workers", "warmup"):
        _at_least(f"bench.{key}", getattr(b, key), 0, allow_none=False)
    _at_least("bench.baseline_threads", b.baseline_threads, 1)
    _at_least("bench.threads", b.threads, 1)
    bad = [x for x in b.backends or [] if x not in LATENCY_BACKENDS]
    if bad or b.backends == []:
        raise ConfigError(f"bench.backends has unknown backend(s) {', '.join(bad) or '(none given)'}; "
                          f"choose from: {', '.join(LATENCY_BACKENDS)}")
    if not b.batch_sizes or min(b.batch_sizes) < 1:
        raise ConfigError("bench.batch_sizes must list batch sizes >= 1, e.g. [1,32]")
    _choice("bench.exporter", b.exporter, EXPORTERS)


def validate_export(e: ExportConfig) -> None:
    _choice("export.format", e.format, EXPORT_FORMATS)
    _choice("export.exporter", e.exporter, EXPORTERS)
    if e.int8 and e.format != "executorch":
        raise ConfigError(f"export.int8=true needs format=executorch (got format={e.format}); "
                          "for an int8 ONNX model use: mobilebench quantize checkpoint=PATH method=static")
    _at_least("export.parity_images", e.parity_images, 1, allow_none=False)
    _at_least("export.batch_size", e.batch_size, 1, allow_none=False)
    _at_least("export.threads", e.threads, 1)
    if not 0.0 < e.min_agreement <= 1.0:
        raise ConfigError(f"export.min_agreement={e.min_agreement} must be in (0, 1]")
    if not 0.0 < e.int8_min_agreement <= 1.0:
        raise ConfigError(f"export.int8_min_agreement={e.int8_min_agreement} must be in (0, 1]")
    if e.atol <= 0:
        raise ConfigError(f"export.atol={e.atol} is out of range; it must be > 0")


def validate_quantize(q: QuantizeConfig) -> None:
    _choice("quantize.method", q.method, QUANTIZE_METHODS)
    _choice("quantize.calib_method", q.calib_method, CALIBRATION_METHODS)
    _choice("quantize.exporter", q.exporter, EXPORTERS)
    _choice("quantize.qat_ranges", q.qat_ranges, QAT_RANGES)
    bad = [g for g in q.exclude or [] if g not in QUANTIZE_GROUPS]
    if bad:
        raise ConfigError(f"quantize.exclude has unknown group(s) {', '.join(bad)}; choose from: {', '.join(QUANTIZE_GROUPS)}")
    for key in ("calib_size", "calib_batch", "eval_batch", "repeats"):
        _at_least(f"quantize.{key}", getattr(q, key), 1, allow_none=False)
    _at_least("quantize.warmup", q.warmup, 0, allow_none=False)
    _at_least("quantize.qat_epochs", q.qat_epochs, 1, allow_none=False)
    _at_least("quantize.qat_batch", q.qat_batch, 1, allow_none=False)
    _at_least("quantize.qat_steps", q.qat_steps, 1)
    if q.qat_lr <= 0:
        raise ConfigError(f"quantize.qat_lr={q.qat_lr} is out of range; it must be > 0")
    for key in ("qat_freeze_observers", "qat_freeze_bn"):
        if not 0.0 <= getattr(q, key) <= 1.0:
            raise ConfigError(f"quantize.{key}={getattr(q, key)} must be a fraction of the QAT steps in [0, 1]")
    if not 0.0 <= q.qat_distill <= 1.0:
        raise ConfigError(f"quantize.qat_distill={q.qat_distill} must be a weight in [0, 1] (0: labels only)")
    _at_least("quantize.test_images", q.test_images, 1)
    _at_least("quantize.threads", q.threads, 1)
    if not q.latency_batches or min(q.latency_batches) < 1:
        raise ConfigError("quantize.latency_batches must list batch sizes >= 1, e.g. [1,32]")


def validate_prune(p: PruneConfig) -> None:
    _choice("prune.method", p.method, PRUNE_METHODS)
    if not 0.0 < p.amount < 1.0:
        raise ConfigError(f"prune.amount={p.amount} is out of range; it must be in (0, 1), e.g. 0.2")
    _at_least("prune.finetune_epochs", p.finetune_epochs, 0, allow_none=False)
    if p.finetune_lr <= 0:
        raise ConfigError(f"prune.finetune_lr={p.finetune_lr} is out of range; it must be > 0")
    for key in ("finetune_batch", "eval_batch"):
        _at_least(f"prune.{key}", getattr(p, key), 1, allow_none=False)
    _at_least("prune.bn_calib_images", p.bn_calib_images, 0, allow_none=False)
    _at_least("prune.finetune_steps", p.finetune_steps, 1)
    _at_least("prune.test_images", p.test_images, 1)
    _at_least("prune.weight_decay", p.weight_decay, 0.0, allow_none=False)
    _at_least("prune.threads", p.threads, 1)


def validate_predict(p: PredictConfig) -> None:
    for key in ("top_k", "batch_size"):
        _at_least(f"predict.{key}", getattr(p, key), 1, allow_none=False)
    _at_least("predict.table_rows", p.table_rows, 0, allow_none=False)
    _at_least("predict.threads", p.threads, 1)


def validate_distill(d: DistillConfig) -> None:
    if not 0.0 <= d.alpha <= 1.0:
        raise ConfigError(f"distill.alpha={d.alpha} is out of range; it must be in [0, 1] (0: labels only, 1: teacher only)")
    if d.temperature <= 0:
        raise ConfigError(f"distill.temperature={d.temperature} is out of range; it must be > 0")
    _choice("distill.teacher_input", d.teacher_input, TEACHER_INPUTS)
