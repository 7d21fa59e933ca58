"""Batches from in-memory uint8 tensors, augmented per batch with tensor ops.

The standard pipeline decodes, crops and flips each 32x32 image in PIL inside DataLoader
workers; here the whole set is one tensor (on the training device when it fits) and each batch
is cropped, flipped and cut out with a handful of batched ops (the airbench approach). Policies
that only exist per image (TrivialAugment, AutoAugment, RandomErasing, Resize(224)) use the
torchvision DataLoader path instead, chosen by `AugmentConfig.needs_dataloader`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from mobilebench.config import AugmentConfig
from mobilebench.data import Split
from mobilebench.mixing import Mixer

Batch = tuple[torch.Tensor, torch.Tensor]  # float [B, 3, H, W] normalized, int64 [B]


def norm_planes(mean: list[float], std: list[float], size: tuple[int, int], channels_last: bool,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel (scale, shift) planes [1, C, H, W] that map uint8 to (x/255 - mean) / std.

    Laid out like the batch so the multiply-add loops stay contiguous and vectorized in either
    layout (a [1, 3, 1, 1] operand on an NHWC batch is a stride-3 inner loop, several times slower).
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    plane = (1, m.shape[1], *size)
    return (1 / (255 * s)).expand(plane).contiguous(memory_format=fmt), (-m / s).expand(plane).contiguous(memory_format=fmt)


def normalize(x: torch.Tensor, planes: tuple[torch.Tensor, torch.Tensor], channels_last: bool) -> torch.Tensor:
    """uint8 [B, C, H, W] -> normalized float32, optionally in channels_last memory format."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.to(torch.float32, memory_format=fmt)  # free of a transpose when x is already in `fmt`
    return x.mul_(planes[0]).add_(planes[1])


def crop_windows(x_nhwc: torch.Tensor, padding: int, flip: bool, device: torch.device | None = None) -> torch.Tensor:
    """Every crop window of every zero-padded image, and of its mirror image when `flip`, as one
    strided view [F, N, n, n, H, W, C] (F = 2 with flip, else 1; n = 2*padding + 1).

    In NHWC a window is H runs of W*C contiguous bytes, so one advanced-indexing op over
    (mirror, image, dy, dx) gathers a whole cropped, flipped batch: no per-batch pad, crop or flip
    copies. A mirrored window at dx is the plain window at 2*padding - dx flipped, so drawing dx
    uniformly over either copy gives the usual crop + flip distribution. Costs (F * (1 + 2p/H)^2)x
    the split's memory, 3.1x for CIFAR's 32px with padding 4 and flip. Built where `x_nhwc` is and
    then moved to `device`, so the device never holds the intermediate copies (2.3x more at peak).
    """
    n_img, h, w, c = x_nhwc.shape
    padded = F.pad(x_nhwc, (0, 0, padding, padding, padding, padding))
    src = (torch.stack([padded, padded.flip(2)]) if flip else padded[None]).contiguous()
    src = src if device is None else src.to(device)
    s, n = src.stride(), 2 * padding + 1
    return src.as_strided((src.shape[0], n_img, n, n, h, w, c), (s[0], s[1], s[2], s[3], s[2], s[3], 1))


def crop_flip_batch(windows: torch.Tensor, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """uint8 [B, C, H, W] (channels_last memory) of images `idx`, each at its own random window and mirror."""
    mirrors, n, b = windows.shape[0], windows.shape[2], idx.shape[0]
    draws = [torch.randint(0, m, (b,), generator=gen) for m in (mirrors, n, n)]  # CPU generator: same draws anywhere
    f, dy, dx = to_device(torch.stack(draws), idx.device)
    return windows[f, idx, dy, dx].permute(0, 3, 1, 2)  # gathered as contiguous NHWC


def cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Zero one size x size square per image (centre anywhere, clipped at the border)."""
    b, _, h, w = x.shape
    cy, cx = to_device(torch.stack([torch.randint(0, m, (b,), generator=gen) for m in (h, w)]), x.device)
    ys = torch.arange(h, device=x.device)[None, :] - cy[:, None] + size // 2  # [B, H]
    xs = torch.arange(w, device=x.device)[None, :] - cx[:, None] + size // 2  # [B, W]
    inside = ((ys >= 0) & (ys < size))[:, :, None] & ((xs >= 0) & (xs < size))[:, None, :]
    return x.masked_fill(inside[:, None], 0)


def progressive_size(epoch: int, epochs: int, full: int, min_size: int | None, ramp: float, step: int) -> int:
    """Training image size for 0-based `epoch`: min_size growing linearly to `full` over the
    first ramp*epochs epochs, rounded down to a multiple of `step` (never below min_size)."""
    ramp_epochs = round(ramp * epochs)
    if min_size is None or min_size >= full or epoch >= ramp_epochs:
        return full
    size = min_size + (full - min_size) * epoch / ramp_epochs
    return max(min_size, int(size) // step * step)


def resize_batch(x: torch.Tensor, size: int, channels_last: bool) -> torch.Tensor:
    """Antialiased bilinear downscale of a normalized float batch (a no-op at its own size)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def window_bytes(split: Split, aug: AugmentConfig) -> int:
    """Bytes the crop windows of this split keep: the padded images, twice with flip."""
    n, c, h, w = split.x.shape
    pad = aug.crop_padding
    return (2 if aug.flip else 1) * n * c * (h + 2 * pad) * (w + 2 * pad) * split.x.element_size()


def resident_device(setting: str, nbytes: int, device: torch.device, free_bytes: int | None) -> torch.device:
    """Where the uint8 crop windows live (`data.device_resident`): on the training device, or in
    host memory with each gathered batch copied over.

    `auto` keeps them on the device when they take at most half of its free memory (`free_bytes`;
    None when the device does not report it), so activations and the optimizer keep the rest.
    On CPU both places are the same memory.
    """
    if device.type == "cpu" or setting == "on":
        return device
    if setting == "off":
        return torch.device("cpu")
    return device if free_bytes is None or nbytes <= free_bytes // 2 else torch.device("cpu")


def free_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device; None elsewhere."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


class TensorLoader:
    """Shuffled, augmented training batches from a uint8 split held in memory.

    The crop windows live on `store` (default: the training device, so a batch never crosses a
    bus); with a host `store` each gathered uint8 batch is copied to `device`, a quarter of the
    bytes of the float batch. Draws all randomness from `gen` (a CPU generator) so its state,
    saved in checkpoints, fixes the data order and augmentation of every later epoch whichever
    the store. Drops the last partial batch so BatchNorm never sees a batch of one.
    """

    def __init__(self, split: Split, batch_size: int, aug: AugmentConfig, mean: list[float], std: list[float],
                 device: torch.device, gen: torch.Generator, channels_last: bool = True,
                 shard: tuple[int, int] = (0, 1), store: torch.device | None = None,
                 mixer: Mixer | None = None, keep_full: bool = False) -> None:
        store = device if store is None else store
        # keep_full: yield (x, y, x_full), x_full the batch before progressive resizing (a
        # distillation teacher's view); otherwise (x, y).
        self.mixer, self.keep_full = mixer, keep_full
        # NHWC crop windows: a batch is one gather of whole pixel rows, and comes out channels_last
        # with no transposing copy.
        self.windows = crop_windows(split.x.permute(0, 2, 3, 1), aug.crop_padding, aug.flip, store)
        self.y = split.y.to(store)
        self.device, self.copy_batches = device, store != device
        self.batch_size, self.aug, self.gen, self.channels_last = batch_size, aug, gen, channels_last
        self.planes = norm_planes(mean, std, tuple(split.x.shape[-2:]), channels_last, device)
        self.rank, self.world = shard
        per_rank = len(self.y) // self.world
        self.drop_last = per_rank > batch_size
        self.per_rank = per_rank
        self.image_size: int | None = None  # set per epoch for progressive resizing; None: native size

    def __len__(self) -> int:
        return self.per_rank // self.batch_size if self.drop_last else math.ceil(self.per_rank / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        # Every rank draws the same permutation and takes its own strided shard.
        order = torch.randperm(len(self.y), generator=self.gen)[self.rank :: self.world][: self.per_rank]
        order = order.to(self.y.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x, y = crop_flip_batch(self.windows, idx, self.gen), self.y[idx]  # x: NCHW view, channels_last memory
            if self.copy_batches:
                x, y = self._to_device(x), self._to_device(y)
            if self.aug.cutout > 0:
                x = cutout(x, self.aug.cutout, self.gen)
            x = normalize(x, self.planes, self.channels_last)
            if self.mixer is not None:
                x, y = self.mixer(x, y, self.gen)
            full = x
            if self.image_size is not None:
                x = resize_batch(x, self.image_size, self.channels_last)
            yield (x, y, full) if self.keep_full else (x, y)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return to_device(t, self.device)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; from host memory to a GPU through pinned memory, so the copy does not wait
    for the GPU's queued work (a pageable copy synchronises the stream)."""
    if t.device.type == "cpu" and device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def eval_batches(split: Split, batch_size: int, mean: list[float], std: list[float], device: torch.device,
                 channels_last: bool = True, resize: int | None = None) -> Iterator[Batch]:
    """Unaugmented batches in order (resized on the device when the pipeline asks for it)."""
    planes = norm_planes(mean, std, tuple(split.x.shape[-2:]), False, device)
    for i in range(0, len(split), batch_size):
        x = to_device(split.x[i : i + batch_size], device)
        x = normalize(x, planes, channels_last=False)
        if resize is not None and x.shape[-1] != resize:
            x = F.interpolate(x, size=(resize, resize), mode="bilinear", antialias=True, align_corners=False)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, to_device(split.y[i : i + batch_size], device)


class _PerImageDataset(torch.utils.data.Dataset):
    def __init__(self, split: Split, transform) -> None:  # noqa: ANN001 - a torchvision transform
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.split.x[i]), int(self.split.y[i])


def per_image_transform(aug: AugmentConfig, mean: list[float], std: list[float], image_size: int):  # noqa: ANN201
    """torchvision v2 pipeline on uint8 tensors for policies that exist only per image."""
    from torchvision.transforms import v2

    steps: list = []
    if aug.resize is not None:
        steps.append(v2.Resize(aug.resize, antialias=True))
    if aug.crop_padding > 0:
        steps.append(v2.RandomCrop(aug.resize or image_size, padding=aug.crop_padding))
    if aug.flip:
        steps.append(v2.RandomHorizontalFlip())
    if aug.policy == "trivialaugment":
        steps.append(v2.TrivialAugmentWide())
    elif aug.policy == "autoaugment":
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if aug.random_erasing > 0:
        steps.append(v2.RandomErasing(p=aug.random_erasing, value=0))
    return v2.Compose(steps)


class DataLoaderPath:
    """Training batches through torchvision's DataLoader, for per-image policies."""

    def __init__(self, split: Split, batch_size: int, aug: AugmentConfig, mean: list[float], std: list[float],
                 device: torch.device, gen: torch.Generator, num_workers: int, channels_last: bool = True,
                 shard: tuple[int, int] = (0, 1), mixer: Mixer | None = None) -> None:
        self.device, self.channels_last, self.mixer, self.gen = device, channels_last, mixer, gen
        dataset = _PerImageDataset(split, per_image_transform(aug, mean, std, split.x.shape[-1]))
        sampler = None
        if shard[1] > 1:
            sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=shard[1], rank=shard[0], shuffle=True,
                                                          seed=int(torch.randint(0, 2**31, (1,), generator=gen)))
        self.sampler = sampler
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, generator=gen if sampler is None else None,
            num_workers=num_workers, drop_last=len(split) // shard[1] > batch_size,
            pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
        )
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(self.device, non_blocking=True)
            if self.mixer is not None:
                x, y = self.mixer(x, y, self.gen)
            yield x, y
