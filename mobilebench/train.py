"""`mobilebench train`: build every part from the config, run `engine.fit`, write the run's files.

Reads top to bottom: data, model, optimizer, scheduler, resume, fit, test, summary.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mobilebench import engine
from mobilebench.checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint, inference_state_dict
from mobilebench.config import Config
from mobilebench.data import DataSplits, load_data
from mobilebench.errors import UserError
from mobilebench.loader import (DataLoaderPath, TensorLoader, eval_batches, free_memory, progressive_size,
                               resident_device, window_bytes)
from mobilebench.runtime import (PRECISION_DTYPES, World, init_world, resolve_compile, resolve_device,
                                 resolve_precision, seed_everything, set_cpu_allocator, set_threads, shared_run_dir,
                                 sync_batchnorm, world_reduce)

log = logging.getLogger("mobilebench")


def model_args(cfg: Config, num_classes: int) -> dict[str, Any]:
    m = cfg.model
    args: dict[str, Any] = {"name": m.name, "num_classes": m.num_classes or num_classes, "width_mult": m.width_mult,
                            "stem": m.stem, "dropout": m.dropout}
    if m.hidden_channels is not None:
        args["hidden_channels"] = list(m.hidden_channels)
    return args


def build(cfg: Config, num_classes: int) -> nn.Module:
    from mobilebench.models import build_model

    args = model_args(cfg, num_classes)
    model = build_model(**args)
    if cfg.model.pretrained:
        from mobilebench.models import load_torchvision_weights, pretrained_state_dict, replace_classifier

        if cfg.model.stem != "imagenet":
            raise UserError("model.pretrained=true needs model.stem=imagenet (the ImageNet weights' stem)")
        ref = build_model(cfg.model.name, num_classes=1000, width_mult=cfg.model.width_mult, stem="imagenet", dropout=cfg.model.dropout)
        try:
            load_torchvision_weights(ref, pretrained_state_dict(cfg.model.name))
        except (RuntimeError, ValueError) as err:
            raise UserError(str(err).splitlines()[0]) from None
        if args["num_classes"] != 1000:
            replace_classifier(ref, args["num_classes"])
        model = ref
    return model


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


def set_bn_momentum(model: nn.Module, momentum: float) -> None:
    """A training choice, not architecture: it changes no weight, only how fast running stats follow."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay only weight matrices and conv kernels: decaying BN scales and biases hurts accuracy."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def scaled_lr(cfg: Config, world: World) -> float:
    o = cfg.optimizer
    if o.base_batch_size is None:
        return o.lr
    return o.lr * cfg.data.batch_size * world.size / o.base_batch_size


def build_optimizer(cfg: Config, model: nn.Module, lr: float, fused: bool = True) -> torch.optim.Optimizer:
    """The configured optimizer over `param_groups`.

    `fused`: torch's one-kernel-per-step implementation on CPU and CUDA, where the optimizer has
    one (RMSprop takes the multi-tensor one). Same update rule; without it, torch's CPU default
    loops over parameters in Python: v3_small's SGD step 2.76 -> 0.38 ms (2-core EPYC). False gives
    torch's defaults, as a plain script would (`mobilebench bench`'s baseline).
    """
    o = cfg.optimizer
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


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, lr: float, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    s = cfg.scheduler
    total = steps_per_epoch * cfg.trainer.epochs
    warmup = round(s.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        return lr_factor(step, total, warmup, s.name, s.eta_min / lr, steps_per_epoch, s.step_size, s.gamma)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class RunFiles:
    """metrics.jsonl, summary.json and checkpoints/ of one run dir (rank 0 writes, others no-op)."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.dir, self.enabled = run_dir, enabled
        self.metrics = run_dir / "metrics.jsonl"
        self.summary = run_dir / "summary.json"
        self.last = run_dir / "checkpoints" / "last.pt"
        self.best = run_dir / "checkpoints" / "best.pt"

    def append_metrics(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(row) + "\n")

    def truncate_metrics(self, epoch: int) -> None:
        """Keep the epochs a resumed checkpoint already has; drop later and interrupted lines."""
        if not self.enabled or not self.metrics.exists():
            return
        rows = [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]
        keep = [r for r in rows if not r.get("interrupted") and r.get("epoch", 0) <= epoch]
        write_json_atomic(self.metrics, None, text="".join(json.dumps(r) + "\n" for r in keep))

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.enabled:
            write_json_atomic(self.summary, summary)

    def read_summary(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.summary.read_text())
        except (OSError, ValueError):
            return None


def write_json_atomic(path: Path, obj: Any, text: str | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text if text is not None else json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}; free disk space or pick a writable hydra.run.dir") from None


def check_run_dir(files: RunFiles, cfg: Config) -> None:
    """Refuse to clobber a finished run, and fail early on an unwritable dir."""
    try:
        files.dir.mkdir(parents=True, exist_ok=True)
        probe = files.dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"run dir {files.dir} is not writable ({err.strerror or err}); set hydra.run.dir to a writable path") from None
    previous = files.read_summary()
    if previous and previous.get("status") == "completed" and not cfg.trainer.overwrite and cfg.trainer.resume is None:
        raise UserError(f"{files.dir} already holds a finished run; pick another hydra.run.dir or set trainer.overwrite=true")
    if cfg.trainer.overwrite and cfg.trainer.resume is None:
        for path in (files.metrics, files.summary, files.last, files.best):
            path.unlink(missing_ok=True)


def make_progress(cfg: Config, world: World, steps_per_epoch: int, epochs: int, multirun: bool):  # noqa: ANN201
    """Per-epoch step callback: a tqdm bar on a terminal, plain log lines otherwise."""
    mode = cfg.trainer.progress
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() and not multirun else "log"
    steps = min(steps_per_epoch, cfg.trainer.max_steps_per_epoch or steps_per_epoch)

    def factory(epoch: int):  # noqa: ANN202
        if not world.is_main:
            return lambda info: None
        if mode == "bar":
            from tqdm import tqdm

            bar = tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", leave=False, dynamic_ncols=True)

            def update(info: dict[str, float]) -> None:
                bar.update(1)
                bar.set_postfix(loss=f"{info['loss']:.3f}", acc=f"{info['acc']:.3f}", lr=f"{info['lr']:.3g}",
                                img_s=f"{info['images'] / max(info['seconds'], 1e-9):.0f}", refresh=False)
                if bar.n >= steps:
                    bar.close()
            return update

        count = [0]

        def log_line(info: dict[str, float]) -> None:
            count[0] += 1
            if count[0] % cfg.trainer.log_every == 0 or count[0] == steps:
                log.info("epoch %d step %d/%d loss %.4f acc %.4f lr %.4g %.0f img/s", epoch, count[0], steps,
                         info["loss"], info["acc"], info["lr"], info["images"] / max(info["seconds"], 1e-9))
        return log_line

    return factory


def checkpoint_payload(cfg_dict: dict[str, Any], args: dict[str, Any], raw: nn.Module, parts: engine.Parts,
                       state: engine.TrainState, gen: torch.Generator, data: DataSplits) -> dict[str, Any]:
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


def restore(blob: dict[str, Any], path: Path, args: dict[str, Any], raw: nn.Module, parts: engine.Parts,
            gen: torch.Generator) -> engine.TrainState:
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
    return engine.TrainState(**blob["state"], epoch_gen_state=blob.get("epoch_gen_state"))


def _as_tuple(obj: Any) -> Any:
    return tuple(_as_tuple(o) for o in obj) if isinstance(obj, (list, tuple)) else obj


def build_train_loader(cfg: Config, data: DataSplits, device: torch.device, gen: torch.Generator,
                       world: World = World()) -> TensorLoader | DataLoaderPath:
    """The in-memory tensor loader, or torchvision's DataLoader for per-image policies."""
    shared = (data.train, cfg.data.batch_size, cfg.augment, data.mean, data.std, device, gen)
    options = {"channels_last": cfg.trainer.channels_last, "shard": (world.rank, world.size)}
    if cfg.augment.needs_dataloader():
        return DataLoaderPath(*shared, num_workers=cfg.data.num_workers, **options)
    nbytes = window_bytes(data.train, cfg.augment)
    store = resident_device(cfg.data.device_resident, nbytes, device, free_memory(device))
    if store != device:
        log.info("training images stay in host memory (%d MB of crop windows, data.device_resident=%s); "
                 "each batch is copied to %s", nbytes // 2**20, cfg.data.device_resident, device)
    return TensorLoader(*shared, store=store, **options)


def build_parts(cfg: Config, model: nn.Module, raw: nn.Module, device: torch.device, precision: str,
                steps_per_epoch: int, world: World = World()) -> engine.Parts:
    """Optimizer, per-step scheduler, scaler, loss and EMA around `model` (raw: its unwrapped module)."""
    lr = scaled_lr(cfg, world)
    optimizer = build_optimizer(cfg, raw, lr)
    ema = None
    if cfg.trainer.ema:
        ema = torch.optim.swa_utils.AveragedModel(raw, multi_avg_fn=warmup_ema(cfg.trainer.ema_decay), use_buffers=True)
    return engine.Parts(
        model=model, optimizer=optimizer, scheduler=build_scheduler(cfg, optimizer, lr, steps_per_epoch),
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        loss_fn=nn.CrossEntropyLoss(label_smoothing=cfg.trainer.label_smoothing), device=device,
        amp_dtype=PRECISION_DTYPES[precision], ema=ema, grad_clip=cfg.trainer.grad_clip, nan_policy=cfg.trainer.nan_policy,
        nan_skip_limit=cfg.trainer.nan_skip_limit, max_steps_per_epoch=cfg.trainer.max_steps_per_epoch)


def resume_path(cfg: Config, files: RunFiles) -> Path | None:
    r = cfg.trainer.resume
    if r is None:
        return None
    if r == "auto":
        return files.last if files.last.exists() else None
    return Path(r)


def run_train(cfg: Config, cfg_dict: dict[str, Any], run_dir: Path, multirun: bool = False) -> float:
    """Train per `cfg` into `run_dir`; returns the best validation accuracy (what sweeps optimise)."""
    world = init_world(cfg.trainer.device)
    run_dir = shared_run_dir(run_dir, world)
    files = RunFiles(run_dir, world.is_main)
    if world.is_main:
        check_run_dir(files, cfg)
    set_threads(cfg.trainer.threads)
    set_cpu_allocator(cfg.trainer.cpu_allocator)
    device = resolve_device(cfg.trainer.device, world)
    if device.type == "cuda":
        # Few distinct input shapes (one per training size, plus eval's last batch): cuDNN's
        # per-shape autotuning pays for itself within an epoch.
        torch.backends.cudnn.benchmark = True
    precision = resolve_precision(cfg.trainer.precision, device)
    seed_everything(cfg.trainer.seed + world.rank)
    t_start = time.perf_counter()

    data = load_data(cfg.data)
    cfg_dict["data"]["mean"], cfg_dict["data"]["std"] = data.mean, data.std
    args = model_args(cfg, data.num_classes)
    raw = build(cfg, data.num_classes).to(device)
    if cfg.trainer.bn_momentum is not None:
        set_bn_momentum(raw, cfg.trainer.bn_momentum)
    if cfg.trainer.channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    if cfg.trainer.sync_bn and world.size > 1:
        raw = sync_batchnorm(raw, device)
    model: nn.Module = raw
    if world.size > 1:
        model = nn.parallel.DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None)
    if resolve_compile(cfg.trainer.compile, device):
        model = torch.compile(model)

    gen = torch.Generator().manual_seed(cfg.trainer.seed)  # same on every rank: ranks shard one permutation
    train_loader = build_train_loader(cfg, data, device, gen, world)
    steps_per_epoch = min(len(train_loader), cfg.trainer.max_steps_per_epoch or len(train_loader))
    parts = build_parts(cfg, model, raw, device, precision, steps_per_epoch, world)
    amp_dtype = parts.amp_dtype

    state = engine.TrainState()
    ckpt = resume_path(cfg, files)
    if ckpt is not None:
        # Loaded to host memory: the RNG states must stay CPU byte tensors, and load_state_dict
        # moves weights and optimizer state to the parameters' device itself.
        state = restore(load_checkpoint(ckpt), ckpt, args, raw, parts, gen)
        files.truncate_metrics(state.epoch)
        log.info("resumed from %s at epoch %d step %d", ckpt, state.epoch, state.step)

    macs = _macs(raw, cfg.data.image_size if cfg.augment.resize is None else cfg.augment.resize)
    params = sum(p.numel() for p in raw.parameters())
    summary: dict[str, Any] = {
        "status": "running", "model": cfg.model.name, "width_mult": cfg.model.width_mult, "stem": cfg.model.stem,
        "data": cfg.data.name, "params": params, "macs": macs,
        "image_size": cfg.augment.resize or cfg.data.image_size, "epochs": cfg.trainer.epochs,
        "batch_size": cfg.data.batch_size, "global_batch_size": cfg.data.batch_size * world.size,
        "train_images": len(data.train), "val_images": len(data.val), "test_images": len(data.test),
        "device": _device_name(device), "precision": precision, "torch": torch.__version__,
        "seed": cfg.trainer.seed, "world_size": world.size, "threads": torch.get_num_threads(),
        "best_val_acc": None, "test_acc": None, "test_top5": None, "tta": cfg.trainer.tta, "test_acc_tta": None,
        "train_s": None, "images_per_s": None,
    }
    files.write_summary(summary)
    log.info("%s (%s params, %.1fM MACs at %dpx) on %s, %s, %d train / %d val / %d test images, global batch %d x %d = %d",
             cfg.model.name, f"{params:,}", macs / 1e6, summary["image_size"], summary["device"], precision,
             len(data.train), len(data.val), len(data.test), cfg.data.batch_size, world.size, cfg.data.batch_size * world.size)

    resize = cfg.augment.resize
    totals = {"train_s": 0.0, "data_s": 0.0, "eval_s": 0.0, "images": 0}

    def train_size(epoch: int) -> int:
        a = cfg.augment
        return progressive_size(epoch, cfg.trainer.epochs, a.resize or cfg.data.image_size, a.min_size, a.ramp, a.size_step)

    def validate(eval_model: nn.Module) -> engine.EvalResult | None:
        if len(data.val) == 0:
            return None
        return engine.evaluate(eval_model, eval_batches(data.val, cfg.data.batch_size * 2, data.mean, data.std, device,
                                                        cfg.trainer.channels_last, resize), data.num_classes, device, amp_dtype)

    def save(st: engine.TrainState, is_best: bool) -> None:
        if not world.is_main:
            return
        payload = checkpoint_payload(cfg_dict, args, raw, parts, st, gen, data)
        save_checkpoint(payload, files.last)
        if is_best:
            save_checkpoint(payload, files.best)

    def log_epoch(row: dict[str, Any]) -> None:
        if world.size > 1 and not row.get("interrupted"):  # each rank saw its own shard: report the whole batch
            row.update(world_reduce({k: row[k] for k in ("train_loss", "train_acc")}, world, device))
            row.update(world_reduce({"train_images_per_s": row["train_images_per_s"]}, world, device, op="sum"))
        if not row.get("interrupted"):
            row["train_image_size"] = train_size(row["epoch"] - 1)
        files.append_metrics(row)
        if row.get("interrupted"):
            return
        totals["train_s"] += row["epoch_s"] - row["eval_s"]
        totals["data_s"] += row["data_s"]
        totals["eval_s"] += row["eval_s"]
        totals["images"] += row["train_images_per_s"] * (row["epoch_s"] - row["eval_s"])
        if world.is_main:
            val = f"val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.4f} " if row["val_acc"] is not None else ""
            log.info("epoch %d/%d train_loss %.4f train_acc %.4f %slr %.4g %.1fs %.0f img/s at %dpx", row["epoch"],
                     cfg.trainer.epochs, row["train_loss"], row["train_acc"], val, row["lr"], row["epoch_s"],
                     row["train_images_per_s"], row["train_image_size"])

    def epoch_batches(epoch: int) -> TensorLoader | DataLoaderPath:
        if isinstance(train_loader, TensorLoader) and cfg.augment.min_size is not None:
            train_loader.image_size = train_size(epoch)
        return train_loader

    hooks = engine.FitHooks(
        epoch_batches=epoch_batches, validate=validate, save=save, log_epoch=log_epoch,
        progress=make_progress(cfg, world, len(train_loader), cfg.trainer.epochs, multirun),
        capture_gen=gen.get_state, restore_gen=gen.set_state)
    try:
        state = engine.fit(parts, state, cfg.trainer.epochs, hooks)
    except engine.Interrupted as stop:
        files.write_summary({**summary, "status": "interrupted", "epochs_done": state.epoch})
        raise UserError(f"interrupted by {stop}; state saved to {files.last} (resume with trainer.resume=auto "
                        f"hydra.run.dir={run_dir})") from None
    except BaseException:
        files.write_summary({**summary, "status": "failed", "epochs_done": state.epoch})
        raise

    t_test = time.perf_counter()
    test, test_tta = _test_best(cfg, files, raw, data, device, amp_dtype, world)
    test_s = time.perf_counter() - t_test
    train_s = totals["train_s"]
    summary.update({
        "status": "completed", "best_val_acc": state.best_val_acc if state.best_val_acc >= 0 else None,
        "test_acc": test.acc, "test_top5": test.top5, "test_loss": test.loss,
        "test_acc_tta": test_tta.acc if test_tta else None, "train_s": train_s,
        "images_per_s": totals["images"] / train_s if train_s > 0 else None,
        "data_s": totals["data_s"], "compute_s": train_s - totals["data_s"], "eval_s": totals["eval_s"], "test_s": test_s,
        "wall_s": time.perf_counter() - t_start, "epochs_done": state.epoch, "skipped_batches": state.skipped_batches,
    })
    files.write_summary(summary)
    if world.is_main:
        _print_time_report(summary)
    if world.size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return float(summary["best_val_acc"] if summary["best_val_acc"] is not None else test.acc)


def _test_best(cfg: Config, files: RunFiles, raw: nn.Module, data: DataSplits, device: torch.device,
               amp_dtype: torch.dtype | None, world: World) -> tuple[engine.EvalResult, engine.EvalResult | None]:
    """Evaluate the test set with the best checkpoint's (EMA) weights: single-view, and with `trainer.tta`."""
    from mobilebench.models import build_model

    model = build_model(**model_args(cfg, data.num_classes)).to(device)
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()  # rank 0 has finished writing best.pt
    blob = load_checkpoint(files.best, device)
    load_weights(model, inference_state_dict(blob), files.best)
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    batches = eval_batches(data.test, cfg.data.batch_size * 2, data.mean, data.std, device, cfg.trainer.channels_last, cfg.augment.resize)
    return engine.evaluate_views(model, batches, data.num_classes, device, amp_dtype, cfg.trainer.tta)


def _macs(model: nn.Module, image_size: int) -> int:
    from mobilebench.profile import count_macs

    return count_macs(model, image_size)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def _print_time_report(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{s['model']} on {s['data']}: where the time went", show_header=True)
    for col in ("", "seconds", "share"):
        table.add_column(col, justify="right" if col else "left")
    # The final test pass is its own row: with data.val_size=0 (the CIFAR-10 recipes) it is all the evaluation.
    rows = (("data (batching + augmentation)", s["data_s"]), ("forward/backward/step", s["compute_s"]),
            ("validation", s["eval_s"]), ("final test" + (f" (+ {s['tta']} TTA)" if s["test_acc_tta"] is not None else ""),
                                          s["test_s"]))
    total = sum(secs for _, secs in rows)
    for name, secs in rows:
        table.add_row(name, f"{secs:.1f}", f"{100 * secs / max(total, 1e-9):.0f}%")
    console = Console(stderr=True)
    console.print(table)
    val = f"{s['best_val_acc']:.4f}" if s["best_val_acc"] is not None else "n/a"
    console.print(f"train {s['images_per_s'] or 0:.0f} images/s ({s['device']}, {s['precision']}, {s['threads']} threads); "
                  f"best val acc {val}; test acc {s['test_acc']:.4f} (top-5 {s['test_top5']:.4f})"
                  + (f"; with {s['tta']} TTA {s['test_acc_tta']:.4f}" if s["test_acc_tta"] is not None else ""))
