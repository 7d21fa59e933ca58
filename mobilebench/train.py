"""`mobilebench train`: build the parts from the config, run `engine.fit`, test, write the run's files.

Reads top to bottom: run dir, device, data, trainer, resume, fit, final test, summary.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mobilebench import accel, engine, pictures, tracking
from mobilebench.checkpoint import (
    checkpoint_payload,
    inference_state_dict,
    load_checkpoint,
    load_weights,
    resolve_checkpoint,
    restore,
    save_checkpoint,
)
from mobilebench.config import Config
from mobilebench.data import DataSplits, load_data
from mobilebench.distill import Teacher, check_same_teacher, load_teacher
from mobilebench.errors import UserError
from mobilebench.loader import (
    DataLoaderPath,
    TensorLoader,
    eval_batches,
    progressive_size,
)
from mobilebench.machine import cpu_name, device_name
from mobilebench.progress import make_progress, print_time_report
from mobilebench.results import eval_report, write_eval_files
from mobilebench.runfiles import RunFiles, check_run_dir
from mobilebench.runtime import (
    World,
    init_world,
    resolve_device,
    resolve_precision,
    seed_everything,
    set_threads,
    shared_run_dir,
    world_reduce,
)
from mobilebench.trainer import (
    build_from_config,
    build_train_loader,
    build_trainer,
    model_args,
)

log = logging.getLogger("mobilebench")


def resume_path(cfg: Config, files: RunFiles) -> Path | None:
    r = cfg.trainer.resume
    if r is None:
        return None
    if r == "auto":
        return files.last if files.last.exists() else None
    return resolve_checkpoint(r, prefer=("last.pt",))  # a run dir resumes from where it stopped


def run_train(cfg: Config, cfg_dict: dict[str, Any], run_dir: Path, multirun: bool = False) -> float:
    """Train per `cfg` into `run_dir`; returns the best validation accuracy (what sweeps optimise)."""
    t = cfg.trainer
    world = init_world(t.device)
    run_dir = shared_run_dir(run_dir, world)
    files = RunFiles(run_dir, world.is_main)
    if world.is_main:
        check_run_dir(files, t.overwrite, t.resume)
        tracking.require_libraries(cfg.logger)  # before any work: a missing extra is one line
    set_threads(t.threads)
    accel.set_cpu_allocator(t.cpu_allocator)
    device = resolve_device(t.device, world)
    if device.type == "cuda":
        # Few distinct input shapes (one per training size, plus eval's last batch): cuDNN's
        # per-shape autotuning pays for itself within an epoch.
        torch.backends.cudnn.benchmark = True
    precision = resolve_precision(t.precision, device)
    seed_everything(t.seed + world.rank)
    t_start = time.perf_counter()

    data = load_data(cfg.data)
    cfg_dict["data"]["mean"], cfg_dict["data"]["std"] = data.mean, data.std
    args = model_args(cfg.model, data.num_classes)
    gen = torch.Generator().manual_seed(t.seed)  # same on every rank: ranks shard one permutation
    teacher = open_teacher(cfg, data, device) if cfg.distill.teacher else None
    teacher_record = teacher.record if teacher else None  # for summary.json, checkpoints and the resume check
    train_loader = build_train_loader(cfg, data, device, gen, world,
                                      keep_full=teacher is not None and cfg.distill.teacher_input == "full")
    steps_per_epoch = min(len(train_loader), t.max_steps_per_epoch or len(train_loader))
    trainer = build_trainer(cfg, build_from_config(cfg.model, data.num_classes), device, precision,
                            steps_per_epoch, world, teacher.module if teacher else None)
    raw, parts = trainer.raw, trainer.parts

    state = engine.TrainState()
    ckpt = resume_path(cfg, files)
    if ckpt is not None:
        # Loaded to host memory: the RNG states must stay CPU byte tensors, and load_state_dict
        # moves weights and optimizer state to the parameters' device itself.
        blob = load_checkpoint(ckpt)
        check_same_teacher(teacher_record, blob.get("teacher"), ckpt)
        state = restore(blob, ckpt, args, raw, parts, gen)
        files.truncate_metrics(state.epoch)
        log.info("resumed from %s at epoch %d step %d", ckpt, state.epoch, state.step)

    summary = start_summary(cfg, raw, data, device, precision, world, trainer.fast_paths)
    summary["teacher"] = teacher_record
    files.write_summary(summary)
    trackers = tracking.open_trackers(cfg.logger, run_dir, state.step if ckpt is not None else None, t.log_every,
                                      world.is_main)
    trackers.start(cfg_dict)
    log.info("%s (%s params, %.1fM MACs at %dpx) on %s, %s, %d train / %d val / %d test images, global batch %d x %d = %d",
             cfg.model.name, f"{summary['params']:,}", summary["macs"] / 1e6, summary["image_size"], summary["device"],
             precision, len(data.train), len(data.val), len(data.test), cfg.data.batch_size, world.size,
             summary["global_batch_size"])
    if trainer.fast_paths:
        log.info("CPU fast paths (trainer.cpu_kernels=%s): %s", t.cpu_kernels, accel.describe(trainer.fast_paths))

    totals = {"train_s": 0.0, "data_s": 0.0, "eval_s": 0.0, "teacher_s": 0.0, "images": 0.0}
    a = cfg.augment

    def train_size(epoch: int) -> int:
        return progressive_size(epoch, t.epochs, a.resize or cfg.data.image_size, a.min_size, a.ramp, a.size_step)

    def validate(eval_model: nn.Module) -> engine.EvalResult | None:
        if len(data.val) == 0:
            return None
        batches = eval_batches(data.val, cfg.data.batch_size * 2, data.mean, data.std, device, t.channels_last, a.resize)
        return engine.evaluate(eval_model, batches, data.num_classes, device, parts.amp_dtype)

    def save(st: engine.TrainState, is_best: bool) -> None:
        if not world.is_main:
            return
        payload = checkpoint_payload(cfg_dict, args, raw, parts, st, gen, data)
        payload["teacher"] = teacher_record
        save_checkpoint(payload, files.last)
        if is_best:
            save_checkpoint(payload, files.best)

    def log_epoch(row: dict[str, Any]) -> None:
        if row.get("interrupted"):
            files.append_metrics(row)
            return
        if world.size > 1:  # each rank saw its own shard: report the whole batch
            row.update(world_reduce({k: row[k] for k in ("train_loss", "train_acc")}, world, device))
            row.update(world_reduce({"train_images_per_s": row["train_images_per_s"]}, world, device, op="sum"))
        row["train_image_size"] = train_size(row["epoch"] - 1)
        files.append_metrics(row)
        trackers.epoch(row)
        add_epoch(totals, row)
        if world.is_main:
            val = f"val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.4f} " if row["val_acc"] is not None else ""
            log.info("epoch %d/%d train_loss %.4f train_acc %.4f %slr %.4g %.1fs %.0f img/s at %dpx", row["epoch"],
                     t.epochs, row["train_loss"], row["train_acc"], val, row["lr"], row["epoch_s"],
                     row["train_images_per_s"], row["train_image_size"])

    def epoch_batches(epoch: int) -> TensorLoader | DataLoaderPath:
        if isinstance(train_loader, TensorLoader) and a.min_size is not None:
            train_loader.image_size = train_size(epoch)
        return train_loader

    show = make_progress(t, world, len(train_loader), multirun)

    def progress(epoch: int) -> Callable[[dict[str, float]], None]:
        update = show(epoch)

        def step(info: dict[str, float]) -> None:
            update(info)
            trackers.step(info, steps_per_epoch)
        return step

    hooks = engine.FitHooks(epoch_batches=epoch_batches, validate=validate, save=save, log_epoch=log_epoch,
                            progress=progress, capture_gen=gen.get_state, restore_gen=gen.set_state)
    try:
        state = engine.fit(parts, state, t.epochs, hooks)
    except engine.Interrupted as stop:
        files.write_summary({**summary, "status": "interrupted", "epochs_done": state.epoch})
        trackers.finish("KILLED", cfg_dict, {}, run_pictures(files, cfg, summary))
        raise UserError(f"interrupted by {stop}; state saved to {files.last} (resume with trainer.resume=auto "
                        f"hydra.run.dir={run_dir})") from None
    except BaseException:
        files.write_summary({**summary, "status": "failed", "epochs_done": state.epoch})
        trackers.finish("FAILED", cfg_dict, {}, run_pictures(files, cfg, summary))
        raise

    t_test = time.perf_counter()
    tested = files.best if files.best.exists() else files.last
    if tested == files.last:
        log.info("no best.pt in %s (the best epoch is in the run this one resumed from); testing last.pt", files.dir)
    test, test_tta = test_final(cfg, tested, data, device, parts.amp_dtype, world)
    train_s = totals["train_s"]
    summary.update({
        "status": "completed", "best_val_acc": state.best_val_acc if state.best_val_acc >= 0 else None,
        "test_acc": test.acc, "test_top5": test.top5, "test_loss": test.loss,
        "test_acc_tta": test_tta.acc if test_tta else None, "test_checkpoint": tested.name, "train_s": train_s,
        "images_per_s": totals["images"] / train_s if train_s > 0 else None,
        "data_s": totals["data_s"], "compute_s": train_s - totals["data_s"], "eval_s": totals["eval_s"],
        "teacher_s": totals["teacher_s"] if teacher else None,
        "test_s": time.perf_counter() - t_test, "wall_s": time.perf_counter() - t_start, "epochs_done": state.epoch,
        "skipped_batches": state.skipped_batches,
    })
    files.write_summary(summary)
    if world.is_main:
        report = eval_report(str(tested), {"model_args": args}, cfg.data, data.classes, test, t.tta, test_tta)
        written = write_eval_files(run_dir, report) + run_pictures(files, cfg, summary)
        trackers.finish("FINISHED", cfg_dict, summary, [files.summary, *written])
        print_time_report(summary)
    if world.size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return float(summary["best_val_acc"] if summary["best_val_acc"] is not None else test.acc)


def run_pictures(files: RunFiles, cfg: Config, summary: dict[str, Any]) -> list[Path]:
    """curves.png from metrics.jsonl (main rank; also for a stopped run, up to where it got)."""
    if not files.enabled or not files.metrics.is_file():
        return []
    try:
        rows = [json.loads(line) for line in files.metrics.read_text().splitlines() if line.strip()]
        title = f"{cfg.model.name} on {cfg.data.name}: {summary['train_images']:,} training images, seed {cfg.trainer.seed}"
        path = pictures.draw(files.dir / "curves.png", pictures.curves, rows, title, summary)
    except Exception as err:  # a picture must never hide how the run ended
        log.warning("curves.png not drawn: %s", err)
        return []
    return [path] if path is not None else []


def start_summary(cfg: Config, raw: nn.Module, data: DataSplits, device: torch.device, precision: str, world: World,
                  fast_paths: dict[str, int]) -> dict[str, Any]:
    """summary.json as it stands before the first epoch; the figures come at the end."""
    from mobilebench.profile import count_macs

    image_size = cfg.augment.resize or cfg.data.image_size
    return {
        "status": "running", "model": cfg.model.name, "width_mult": cfg.model.width_mult, "stem": cfg.model.stem,
        "data": cfg.data.name, "params": sum(p.numel() for p in raw.parameters()), "macs": count_macs(raw, image_size),
        "image_size": image_size, "epochs": cfg.trainer.epochs,
        "batch_size": cfg.data.batch_size, "global_batch_size": cfg.data.batch_size * world.size,
        "train_images": len(data.train), "val_images": len(data.val), "test_images": len(data.test),
        "device": device_name(device, cpu_model=False), "cpu": cpu_name(), "precision": precision,
        "torch": torch.__version__,
        "seed": cfg.trainer.seed, "world_size": world.size, "threads": torch.get_num_threads(),
        "cpu_kernels": {"setting": cfg.trainer.cpu_kernels, "swapped": fast_paths,
                        "native": accel.native_state() if fast_paths.get("depthwise_native") else None},
        "best_val_acc": None, "test_acc": None, "test_top5": None, "tta": cfg.trainer.tta, "test_acc_tta": None,
        "train_s": None, "images_per_s": None,
    }


def add_epoch(totals: dict[str, float], row: dict[str, Any]) -> None:
    """Running totals for the end-of-run time table (training time excludes validation)."""
    train_s = row["epoch_s"] - row["eval_s"]
    totals["train_s"] += train_s
    totals["data_s"] += row["data_s"]
    totals["eval_s"] += row["eval_s"]
    totals["teacher_s"] += row.get("teacher_s", 0.0)
    totals["images"] += row["train_images_per_s"] * train_s


def open_teacher(cfg: Config, data: DataSplits, device: torch.device) -> Teacher:
    """The frozen teacher of `distill.teacher`, with its accuracy on this run's test split recorded.

    Every rank builds its own copy (a teacher is small beside the data, and DDP only wraps the student).
    """
    teacher = load_teacher(cfg.distill, data.classes, device, cfg.trainer.channels_last, (data.mean, data.std))
    batches = eval_batches(data.test, cfg.data.batch_size * 2, data.mean, data.std, device, cfg.trainer.channels_last,
                           cfg.augment.resize)
    teacher.record["test_acc"] = engine.evaluate(teacher.module, batches, data.num_classes, device).acc
    r = teacher.record
    log.info("teacher %s (%s, %s params, sha256 %s...): test acc %.4f; distill.alpha=%g, distill.temperature=%g, "
             "distill.teacher_input=%s", r["path"], r["model"], f"{r['params']:,}", r["sha256"][:12], r["test_acc"],
             r["alpha"], r["temperature"], r["input"])
    return teacher


def test_final(cfg: Config, path: Path, data: DataSplits, device: torch.device, amp_dtype: torch.dtype | None,
               world: World) -> tuple[engine.EvalResult, engine.EvalResult | None]:
    """The test set on a plain model rebuilt from checkpoint `path` (its EMA weights when kept).

    A run resumed from another run dir's checkpoint may never beat that run's best validation
    accuracy, so it has no best.pt of its own: the caller passes its last.pt then.
    """
    from mobilebench.models import build_model

    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()  # rank 0 has finished writing the checkpoints
    model = build_model(**model_args(cfg.model, data.num_classes)).to(device)
    load_weights(model, inference_state_dict(load_checkpoint(path, device)), path)
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    batches = eval_batches(data.test, cfg.data.batch_size * 2, data.mean, data.std, device, cfg.trainer.channels_last,
                           cfg.augment.resize)
    return engine.evaluate_views(model, batches, data.num_classes, device, amp_dtype, cfg.trainer.tta)
