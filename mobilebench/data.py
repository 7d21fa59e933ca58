"""Data sets as in-memory uint8 tensors, split into train / val / test.

CIFAR-sized sets fit in memory (CIFAR-10 is 180 MB as uint8), so every data set is decoded once
into one `[N, 3, H, W]` uint8 tensor plus int64 labels; batching and augmentation happen on
those tensors (see `loader.py`), never per image in PIL.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mobilebench.config import DataConfig
from mobilebench.errors import UserError
from mobilebench.runfiles import atomic_write, foreign_owner

log = logging.getLogger("mobilebench")

CACHE_VERSION = 2  # 2: the cache records its version and a checksum of its tensors


class DataError(UserError):
    """Missing, corrupt or inconsistent data."""


@dataclass
class Split:
    x: torch.Tensor  # [N, 3, H, W] uint8
    y: torch.Tensor  # [N] int64

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class DataSplits:
    train: Split
    val: Split
    test: Split
    classes: list[str]
    mean: list[float]
    std: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_data(cfg: DataConfig) -> DataSplits:
    """Load the configured data set and carve out validation and the subsets."""
    if cfg.name in ("cifar10", "cifar100"):
        train, test, classes = _load_cifar(cfg)
    elif cfg.name == "imagefolder":
        train, test, classes = _load_imagefolder(cfg)
    elif cfg.name == "synthetic":
        train, test, classes = _make_synthetic(cfg)
    else:
        raise DataError(f"data.name={cfg.name!r} is not a known data set")
    for split_name, split in (("train", train), ("test", test)):
        _check_labels(split, len(classes), f"{cfg.name} {split_name}")
        if split.x.shape[-1] != cfg.image_size or split.x.shape[-2] != cfg.image_size:
            split.x = resize_uint8(split.x, cfg.image_size)
    train, val = _hold_out(train, cfg.val_size, cfg.split_seed, cfg.name)
    train = _subset(train, cfg.train_subset, cfg.split_seed + 1)
    test = _subset(test, cfg.test_subset, cfg.split_seed + 2)
    mean, std = cfg.mean, cfg.std
    if mean is None or std is None:
        measured_mean, measured_std = channel_stats(train.x)
        mean, std = mean or measured_mean, std or measured_std
    return DataSplits(train, val, test, classes, list(mean), list(std))


def channel_stats(x: torch.Tensor, max_images: int = 10000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units, on up to `max_images` images spread over the set.

    Strided rather than the first N: image folders list images class by class.
    """
    step = max(1, len(x) // max_images)
    sample = x[::step][:max_images].float().div_(255)
    return sample.mean(dim=(0, 2, 3)).tolist(), sample.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


def resize_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    out = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _check_labels(split: Split, num_classes: int, what: str) -> None:
    if len(split) == 0:
        raise DataError(f"the {what} split has no images")
    low, high = int(split.y.min()), int(split.y.max())
    if low < 0 or high >= num_classes:
        raise DataError(f"{what} has labels in [{low}, {high}] but {num_classes} classes: the labels are corrupt")


def _hold_out(train: Split, val_size: int, seed: int, name: str) -> tuple[Split, Split]:
    if val_size >= len(train):
        raise DataError(
            f"data.val_size={val_size} leaves no training images ({name} train has {len(train)}); "
            "lower data.val_size"
        )
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:val_size].sort().values, order[val_size:].sort().values
    return Split(train.x[train_idx], train.y[train_idx]), Split(train.x[val_idx], train.y[val_idx])


def _subset(split: Split, size: int | None, seed: int) -> Split:
    if size is None or size >= len(split):
        return split
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:size].sort().values
    return Split(split.x[idx], split.y[idx])


# --- CIFAR ---------------------------------------------------------------------------------


def _load_cifar(cfg: DataConfig) -> tuple[Split, Split, list[str]]:
    from urllib.error import URLError

    from torchvision import datasets

    cls = datasets.CIFAR10 if cfg.name == "cifar10" else datasets.CIFAR100
    archive = cls.filename
    try:
        train_set = cls(cfg.root, train=True, download=cfg.download)
        test_set = cls(cfg.root, train=False, download=False)
    except (URLError, OSError, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"{cfg.name} is not in data.root={cfg.root!r} and could not be fetched ({reason}); "
            f"put {archive} there (or set MOBILEBENCH_DATA), or use data=imagefolder data.root=DIR or data=synthetic"
        ) from None
    except Exception as err:  # a truncated pickle raises whatever unpickling hits
        raise DataError(f"{cfg.name} files in {cfg.root!r} are corrupt ({type(err).__name__}: {err}); delete and re-download them") from None

    def to_split(ds) -> Split:  # noqa: ANN001 - torchvision dataset
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return Split(x, torch.as_tensor(ds.targets, dtype=torch.int64))

    return to_split(train_set), to_split(test_set), list(train_set.classes)


# --- image folders -------------------------------------------------------------------------


def _load_imagefolder(cfg: DataConfig) -> tuple[Split, Split, list[str]]:
    root = Path(cfg.root).expanduser()
    for part in ("train", "test"):
        if not (root / part).is_dir():
            raise DataError(
                f"data.root={str(root)!r} has no {part}/ folder; an imagefolder root holds "
                "train/<class>/* and test/<class>/* (e.g. the extracted CIFAR-10 JPEG archive)"
            )
    train, classes = _cached_folder(root / "train", cfg)
    test, test_classes = _cached_folder(root / "test", cfg)
    if test_classes != classes:
        raise DataError(f"{root}/train and {root}/test have different class folders")
    return train, test, classes


def _list_images(folder: Path) -> tuple[list[tuple[str, int]], list[str]]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, class_to_idx = find_classes(str(folder))
        samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as err:
        raise DataError(f"{folder}: {err}") from None
    return samples, classes


def _fingerprint(samples: list[tuple[str, int]], size: int) -> str:
    digest = hashlib.sha1(f"{CACHE_VERSION}:{size}".encode())
    for path, label in samples:
        st = os.stat(path)
        digest.update(f"{path}:{label}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def _cache_path(folder: Path, cfg: DataConfig) -> Path:
    name = f"{folder.name}_{cfg.image_size}px.pt"
    if cfg.cache_dir:
        key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:12]
        return Path(cfg.cache_dir).expanduser() / key / name
    return folder.parent / ".mobilebench_cache" / name


def tensor_checksum(x: torch.Tensor, y: torch.Tensor, classes: list[str]) -> str:
    """SHA-256 over the decoded images, labels and class names: what a cache must still hold."""
    digest = hashlib.sha256(x.contiguous().numpy())  # hashes the tensor's own buffer, no copy
    digest.update(y.contiguous().numpy())
    digest.update("\0".join(classes).encode())
    return digest.hexdigest()


def _cache_problem(blob: object, fingerprint: str) -> str | None:
    """Why a loaded cache cannot be used, or None when it is current and whole."""
    if not isinstance(blob, dict) or blob.get("version") != CACHE_VERSION:
        return "from another mobilebench version"
    if blob.get("fingerprint") != fingerprint:
        return "stale: images were added, removed or changed since it was written"
    if blob.get("checksum") != tensor_checksum(blob["x"], blob["y"], list(blob["classes"])):
        return "corrupt: its tensors do not match their checksum"
    return None


def _read_cache(cache: Path, fingerprint: str) -> tuple[Split, list[str]] | None:
    """The cached split when it is ours, whole and current; otherwise None, with one log line saying why."""
    if not cache.is_file():
        return None
    blob, owner = None, foreign_owner(cache)
    if owner is not None:
        why = f"written by another user (uid {owner})"
    else:
        try:
            blob = torch.load(cache, map_location="cpu", weights_only=True)
            why = _cache_problem(blob, fingerprint)
        except Exception:  # a stale or broken cache is rebuilt, never trusted
            why = "unreadable (truncated or corrupt)"
    if why is None:
        return Split(blob["x"], blob["y"]), list(blob["classes"])
    log.info("image cache %s is %s; decoding the images again", cache, why)
    return None


def _cached_folder(folder: Path, cfg: DataConfig) -> tuple[Split, list[str]]:
    samples, classes = _list_images(folder)
    fingerprint = _fingerprint(samples, cfg.image_size)
    cache = _cache_path(folder, cfg)
    cached = _read_cache(cache, fingerprint)
    if cached is not None:
        return cached
    x = _decode_all([path for path, _ in samples], cfg.image_size)
    split = Split(x, torch.tensor([label for _, label in samples], dtype=torch.int64))
    _write_cache(cache, {"version": CACHE_VERSION, "fingerprint": fingerprint, "x": split.x, "y": split.y,
                         "classes": classes, "checksum": tensor_checksum(split.x, split.y, classes)})
    return split, classes


def decode_image(path: str, size: int) -> torch.Tensor:
    """uint8 [3, size, size] RGB of any image PIL reads (any mode), as the imagefolder data decodes it."""
    # PIL, as torchvision's ImageFolder uses; torchvision.io's decoders are deprecated since 0.29.
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"cannot read image {path} ({reason}); remove or replace it") from None
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
    if tensor.shape[-2:] != (size, size):
        tensor = resize_uint8(tensor.unsqueeze(0), size)[0]
    return tensor


def _decode_all(paths: list[str], size: int) -> torch.Tensor:
    if not paths:
        raise DataError("no images found")
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    # PIL releases the GIL while decoding, so threads overlap without worker processes.
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        for i, img in enumerate(pool.map(lambda p: decode_image(p, size), paths, chunksize=256)):
            out[i] = img
    return out


def _write_cache(path: Path, blob: dict) -> None:
    """`atomic_write`: processes decoding the same folder at once each land a whole file."""
    try:
        atomic_write(path, lambda f: torch.save(blob, f))
    except OSError as err:  # a read-only data dir only costs the next run a re-decode
        log.info("could not write the image cache %s (%s); the next run decodes again", path, err.strerror or err)


# --- synthetic -----------------------------------------------------------------------------


def _make_synthetic(cfg: DataConfig) -> tuple[Split, Split, list[str]]:
    num_classes = cfg.num_classes or 10
    gen = torch.Generator().manual_seed(1234 + cfg.split_seed)
    # One smooth random colour pattern per class: learnable in a few steps, not trivially so.
    templates = F.interpolate(torch.randn(num_classes, 3, 4, 4, generator=gen), size=cfg.image_size, mode="bilinear", align_corners=False)
    n_train = (cfg.train_subset or 2000) + cfg.val_size
    n_test = cfg.test_subset or 500

    def make(n: int) -> Split:
        y = torch.randint(0, num_classes, (n,), generator=gen)
        noise = torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=gen)
        x = (128 + 50 * templates[y] + 40 * noise).round().clamp(0, 255).to(torch.uint8)
        return Split(x, y)

    return make(n_train), make(n_test), [f"class_{i}" for i in range(num_classes)]
