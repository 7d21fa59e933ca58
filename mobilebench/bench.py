"""`mobilebench bench train`: mobilebench's training path against the standard PyTorch CIFAR pipeline.

Both sides run in one process on the same uint8 images, side by side, in alternating rounds
(ABBA order) so that load from other processes on a shared machine hits both alike:

(a) data pipeline alone: `TensorLoader` (batched crop/flip on one tensor) against a torch
    Dataset of PIL images with torchvision's RandomCrop + RandomHorizontalFlip + ToTensor +
    Normalize in `DataLoader(num_workers=2, shuffle=True)`.
(b) training steps: the real engine (`engine.train_one_epoch` on `trainer.build_trainer`, as
    `train` builds it: channels_last, precision, compile, threads, the CPU fast paths) against
    the loop a plain PyTorch script runs: the plain model (no fast paths), fp32, NCHW, eager,
    torch's default optimizer implementation, over that DataLoader, with the same architecture,
    initial weights, optimizer settings, loss and batch size.

Warm-up batches and steps run before every timed chunk and are never timed; after each baseline
chunk the bench waits for its workers to refill their prefetch queues, so their work never lands
in mobilebench's timing. The baseline gets the benefit of every doubt: images are turned into
PIL once up front (torchvision's CIFAR10 does it per item) and its workers persist across
epochs (no re-spawn cost).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mobilebench import accel, engine, pictures
from mobilebench.config import BenchConfig, Config
from mobilebench.data import DataSplits, Split, load_data
from mobilebench.errors import UserError
from mobilebench.machine import cpu_has_native_bf16, device_name, load_average
from mobilebench.optim import build_optimizer, scaled_lr
from mobilebench.runfiles import write_json_atomic
from mobilebench.runtime import resolve_compile, resolve_device, resolve_precision, seed_everything, set_threads
from mobilebench.trainer import Trainer, build_from_config, build_train_loader, build_trainer
from mobilebench.validate import validate_bench

log = logging.getLogger("mobilebench")

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Timing:
    """Images and seconds summed over rounds, plus each round's own rate."""

    images: int = 0
    seconds: float = 0.0
    data_s: float = 0.0  # time spent waiting for batches (training only)
    per_round: list[float] = field(default_factory=list)
    steps: int = 0  # training steps timed
    page_faults: int | None = 0  # minor page faults of the process while they ran; None where unknown

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    def add(self, images: int, seconds: float, data_s: float = 0.0, steps: int = 0,
            page_faults: int | None = 0) -> None:
        self.images += images
        self.seconds += seconds
        self.data_s += data_s
        self.per_round.append(images / max(seconds, 1e-9))
        self.steps += steps
        self.page_faults = None if page_faults is None or self.page_faults is None else self.page_faults + page_faults

    @property
    def page_faults_per_step(self) -> float | None:
        return None if self.page_faults is None else self.page_faults / max(self.steps, 1)


def minor_page_faults() -> int | None:
    """Minor page faults of this process so far (None off Unix). The standard loop's big tensors
    are fresh mmaps each step under glibc's default policy, so its faults per step show what the
    allocator costs it."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# --- batch sources -------------------------------------------------------------------------


def forever(loader: Iterable[Batch]) -> Iterator[Batch]:
    """Batches across epoch boundaries, so a chunk may be longer than a (subset) epoch."""
    while True:
        yield from loader


class Take:
    """The next `n` batches of a shared iterator, with the `len` that `train_one_epoch` asks for."""

    def __init__(self, source: Iterator[Batch], n: int) -> None:
        self.source, self.n = source, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Batch]:
        return itertools.islice(self.source, self.n)


class PILImages(torch.utils.data.Dataset):
    """A list of PIL images and labels, transformed per item: the torchvision CIFAR10 recipe.

    The images are made once up front rather than per item, which only flatters the baseline.
    """

    def __init__(self, split: Split, transform: Callable[[Any], torch.Tensor]) -> None:
        from PIL import Image

        hwc = split.x.permute(0, 2, 3, 1).contiguous().numpy()
        self.images = [Image.fromarray(a) for a in hwc]
        self.labels = split.y.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), self.labels[i]


def standard_transform(config: Config, mean: list[float], std: list[float]) -> Callable[[Any], torch.Tensor]:
    """torchvision's classic per-image pipeline for the same crop and flip as `config.augment`."""
    from torchvision import transforms

    steps: list[Any] = []
    if config.augment.crop_padding > 0:
        steps.append(transforms.RandomCrop(config.data.image_size, padding=config.augment.crop_padding))
    if config.augment.flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


def standard_loader(config: Config, data: DataSplits, workers: int, seed: int) -> torch.utils.data.DataLoader:
    dataset = PILImages(data.train, standard_transform(config, data.mean, data.std))
    return torch.utils.data.DataLoader(
        dataset, batch_size=config.data.batch_size, shuffle=True, num_workers=workers, drop_last=True,
        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed))


def mobilebench_side(config: Config, data: DataSplits, device: torch.device, precision: str,
                     batches: Iterator[Batch], steps_per_epoch: int) -> EngineSide:
    """The training path exactly as `mobilebench train` builds it: `trainer.build_trainer`."""
    model = build_from_config(config.model, data.num_classes)
    return EngineSide(build_trainer(config, model, device, precision, steps_per_epoch), batches)


def standard_side(config: Config, data: DataSplits, device: torch.device, batches: Iterator[Batch]) -> BaselineSide:
    """What a plain PyTorch script trains: the plain model, fp32, NCHW, eager, torch's default optimizer."""
    model = build_from_config(config.model, data.num_classes).to(device)
    optimizer = build_optimizer(config.optimizer, model, scaled_lr(config.optimizer, config.data.batch_size), fused=False)
    return BaselineSide(model, optimizer, nn.CrossEntropyLoss(label_smoothing=config.trainer.label_smoothing),
                        batches, device)


class EngineSide:
    """Timed chunks of `engine.train_one_epoch` on the engine's own batches."""

    def __init__(self, trainer: Trainer, batches: Iterator[Batch]) -> None:
        self.parts, self.batches, self.fast_paths = trainer.parts, batches, trainer.fast_paths
        self.state, self.stop = engine.TrainState(), engine.StopFlag()  # StopFlag unentered: no signal handlers

    def run(self, steps: int) -> engine.EpochStats:
        return engine.train_one_epoch(self.parts, Take(self.batches, steps), self.state, self.stop, lambda info: None)


class BaselineSide:
    """The tutorial loop: fp32, NCHW, eager, batches straight from the DataLoader."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                 batches: Iterator[Batch], device: torch.device) -> None:
        self.model, self.optimizer, self.loss_fn, self.batches, self.device = model, optimizer, loss_fn, batches, device

    def run(self, steps: int) -> engine.EpochStats:
        self.model.train()
        images, data_s, loss_sum = 0, 0.0, 0.0
        t_start = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            x, y = next(self.batches)
            x, y = x.to(self.device), y.to(self.device)
            data_s += time.perf_counter() - t0
            self.optimizer.zero_grad()
            loss = self.loss_fn(self.model(x), y)
            loss.backward()
            self.optimizer.step()
            loss_sum += loss.item()  # the tutorial's running loss; also what the engine syncs on
            images += y.shape[0]
        seconds = time.perf_counter() - t_start
        return engine.EpochStats(loss_sum / max(steps, 1), 0.0, images, seconds, data_s)


def time_batches(batches: Iterator[Batch], n: int, device: torch.device) -> tuple[int, float]:
    """Images and seconds to draw `n` batches (synchronizing an accelerator at the end)."""
    images = 0
    t0 = time.perf_counter()
    for x, _ in itertools.islice(batches, n):
        images += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images, time.perf_counter() - t0


def settle(workers: int, batch_size: int, images_per_s: float) -> None:
    """Wait while the baseline's workers refill their prefetch queues (2 batches each, DataLoader's
    default), so that work does not run during the other side's next timed chunk."""
    if workers > 0 and images_per_s > 0:
        time.sleep(min(10.0, 1.5 * 2 * workers * batch_size / images_per_s))


def alternate(rounds: int, first: Callable[[], None], second: Callable[[], None]) -> None:
    """ABBA order: a steady drift in machine load biases neither side."""
    for r in range(rounds):
        for fn in ((first, second) if r % 2 == 0 else (second, first)):
            fn()


# --- report --------------------------------------------------------------------------------


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    r = result
    title = (f"bench train: {r['model']} ({r['stem']} stem, width {r['width_mult']}) on {r['data']}, "
             f"batch {r['batch_size']}")
    table = Table(title=title, show_header=True)
    for col in ("images/s", "mobilebench", "standard PyTorch", "ratio"):
        table.add_column(col, justify="left" if col == "images/s" else "right")
    table.add_row("data pipeline alone", f"{r['data_images_per_s']:,.0f}", f"{r['data_baseline_images_per_s']:,.0f}",
                  f"{r['data_ratio']:.1f}x")
    table.add_row("training steps", f"{r['train_images_per_s']:,.1f}", f"{r['train_baseline_images_per_s']:,.1f}",
                  f"{r['train_ratio']:.2f}x")
    console = Console()
    console.print(table)
    console.print(
        f"mobilebench: {r['precision']}, channels_last={r['channels_last']}, compile={r['compile']}, "
        f"{r['threads']} threads, allocator {r['cpu_allocator']}, fast paths {accel.describe(r['cpu_kernels']['swapped'])}; baseline: plain model, fp32, NCHW, eager, "
        f"DataLoader(num_workers={r['baseline_workers']}), {r['baseline_threads']} threads, allocator "
        f"{r['baseline_cpu_allocator']}. {r['device']}, torch {r['torch']}, load average {r['load_average']}.")
    console.print(f"Time waiting for data during training: mobilebench {100 * r['train_data_share']:.0f}%, "
                  f"baseline {100 * r['train_baseline_data_share']:.0f}%.")
    if r["train_page_faults_per_step"] is not None:
        console.print(f"Page faults per training step: mobilebench {r['train_page_faults_per_step']:,.0f}, "
                      f"baseline {r['train_baseline_page_faults_per_step']:,.0f}.")


# --- the command ---------------------------------------------------------------------------


def run_bench_train(config: Config, run_dir: Path) -> dict[str, Any]:
    """Measure (a) and (b), print the table, write `bench.json` into `run_dir`; returns its content."""
    settings = config.bench
    validate_bench(settings)  # the CLI checked it already; a direct caller gets the same one-line errors
    initial_threads = torch.get_num_threads()  # torch's default unless an earlier in-process run changed it
    baseline_threads = settings.baseline_threads or initial_threads
    set_threads(config.trainer.threads)
    threads = torch.get_num_threads()
    device = resolve_device(config.trainer.device)
    precision = resolve_precision(config.trainer.precision, device)
    seed_everything(config.trainer.seed)
    load_start = load_average()
    data = load_data(config.data)
    if len(data.train) < config.data.batch_size:
        raise UserError(f"bench needs at least one full batch: {len(data.train)} training images < "
                        f"data.batch_size={config.data.batch_size}; raise data.train_subset or lower data.batch_size")
    glibc = accel.set_cpu_allocator("system")
    try:
        timings, fast_paths = measure(config, settings, data, device, precision, threads, baseline_threads)
    finally:
        torch.set_num_threads(initial_threads)
    result = {
        "model": config.model.name, "width_mult": config.model.width_mult, "stem": config.model.stem,
        "data": config.data.name, "train_images": len(data.train), "batch_size": config.data.batch_size,
        "augment": {"crop_padding": config.augment.crop_padding, "flip": config.augment.flip,
                    "cutout": config.augment.cutout},
        "optimizer": config.optimizer.name,
        **summarize(*timings),
        "device": device_name(device), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native_bf16(), "cpu_count": os.cpu_count(),
        "precision": precision, "channels_last": config.trainer.channels_last,
        "compile": resolve_compile(config.trainer.compile, device), "threads": threads,
        "cpu_kernels": {"setting": config.trainer.cpu_kernels, "swapped": fast_paths},
        "native_kernels": accel.native_state() if fast_paths.get("depthwise_native") else "off: not used by this model",
        "cpu_allocator": config.trainer.cpu_allocator if glibc else "n/a (not glibc)",
        "baseline_cpu_allocator": "system" if glibc else "n/a (not glibc)",
        "baseline_threads": baseline_threads, "baseline_workers": settings.baseline_workers,
        "baseline": "plain model (no fast paths), fp32, NCHW, eager, torchvision DataLoader + PIL transforms",
        "torch": torch.__version__, "load_average": load_start, "load_average_end": load_average(),
        "settings": asdict(settings),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / settings.json, result)
    pictures.draw(run_dir / "bench.png", pictures.bench, result)
    print_table(result)
    return result


def measure(config: Config, settings: BenchConfig, data: DataSplits, device: torch.device, precision: str,
            threads: int, baseline_threads: int) -> tuple[tuple[Timing, Timing, Timing, Timing], dict[str, int]]:
    """(data ours, data baseline, train ours, train baseline), each side at its own thread count,
    and the fast paths mobilebench's side trained with."""
    seed = config.trainer.seed
    our_loader = build_train_loader(config, data, device, torch.Generator().manual_seed(seed))
    ours = forever(our_loader)
    theirs = forever(standard_loader(config, data, settings.baseline_workers, seed))

    data_ours, data_theirs = Timing(), Timing()

    workers, batch_size = settings.baseline_workers, config.data.batch_size

    def side_settings(baseline: bool) -> None:
        # Process-wide settings each side runs under: thread count and glibc's allocator policy.
        torch.set_num_threads(baseline_threads if baseline else threads)
        accel.set_cpu_allocator("system" if baseline else config.trainer.cpu_allocator)

    def data_chunk(batches: Iterator[Batch], timing: Timing, baseline: bool) -> Callable[[], None]:
        def chunk() -> None:
            side_settings(baseline)
            for _ in itertools.islice(batches, settings.data_warmup_batches):
                pass
            timing.add(*time_batches(batches, settings.data_batches, device))
            if baseline:
                settle(workers, batch_size, timing.per_round[-1])
        return chunk

    log.info("data pipeline: %d rounds of %d batches per side", settings.rounds, settings.data_batches)
    alternate(settings.rounds, data_chunk(ours, data_ours, False), data_chunk(theirs, data_theirs, True))

    torch.manual_seed(seed)  # both models start from the same weights
    ours_side = mobilebench_side(config, data, device, precision, ours, len(our_loader))
    torch.manual_seed(seed)
    theirs_side = standard_side(config, data, device, theirs)
    train_ours, train_theirs = Timing(), Timing()

    def train_chunk(side: EngineSide | BaselineSide, timing: Timing, name: str) -> Callable[[], None]:
        def chunk() -> None:
            side_settings(side is theirs_side)
            if settings.warmup_steps:
                side.run(settings.warmup_steps)
            faults = minor_page_faults()
            stats = side.run(settings.steps)
            faults = None if faults is None else minor_page_faults() - faults  # None: not countable here
            timing.add(stats.images, stats.seconds, stats.data_s, settings.steps, faults)
            log.info("%s: %d steps, %.1f images/s (loss %.3f)", name, settings.steps, stats.images_per_s, stats.loss)
            if side is theirs_side:
                settle(workers, batch_size, data_theirs.images_per_s)
        return chunk

    log.info("training: %d rounds of %d steps per side (+%d warm-up each)", settings.rounds, settings.steps,
             settings.warmup_steps)
    alternate(settings.rounds, train_chunk(ours_side, train_ours, "mobilebench"),
              train_chunk(theirs_side, train_theirs, "baseline"))
    return (data_ours, data_theirs, train_ours, train_theirs), ours_side.fast_paths


def summarize(data_ours: Timing, data_theirs: Timing, train_ours: Timing, train_theirs: Timing) -> dict[str, Any]:
    return {
        "data_images_per_s": data_ours.images_per_s, "data_baseline_images_per_s": data_theirs.images_per_s,
        "data_ratio": ratio(data_ours.images_per_s, data_theirs.images_per_s),
        "train_images_per_s": train_ours.images_per_s, "train_baseline_images_per_s": train_theirs.images_per_s,
        "train_ratio": ratio(train_ours.images_per_s, train_theirs.images_per_s),
        "train_data_share": train_ours.data_s / max(train_ours.seconds, 1e-9),
        "train_baseline_data_share": train_theirs.data_s / max(train_theirs.seconds, 1e-9),
        "train_page_faults_per_step": train_ours.page_faults_per_step,
        "train_baseline_page_faults_per_step": train_theirs.page_faults_per_step,
        "rounds": {"data": data_ours.per_round, "data_baseline": data_theirs.per_round,
                   "train": train_ours.per_round, "train_baseline": train_theirs.per_round},
    }
