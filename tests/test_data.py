"""Data sets load into the right uint8 tensors, splits are disjoint, and bad data fails clearly."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mobilebench.config import DataConfig
from mobilebench.data import DataError, load_data


def _write_cifar10(root: Path, per_batch: int = 20, n_test: int = 30) -> tuple[np.ndarray, list[int]]:
    """A tiny CIFAR-10 in the official python format (pickled dicts of row-major RGB planes)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    first_data = None
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        if first_data is None:
            first_data, first_labels = data, labels
        with open(folder / name, "wb") as f:
            # Official files are Python 2 pickles whose str keys load as str under encoding="latin1".
            pickle.dump({"data": data, "labels": labels}, f)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    return first_data, first_labels


def test_cifar10_from_official_format_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, labels = _write_cifar10(tmp_path)
    # The tiny files cannot match the official md5 sums; everything else is torchvision's real reader.
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    data = load_data(DataConfig(name="cifar10", root=str(tmp_path), download=False, val_size=0))
    assert data.train.x.shape == (100, 3, 32, 32) and data.train.x.dtype == torch.uint8
    assert data.test.x.shape == (30, 3, 32, 32)
    assert data.classes[0] == "airplane" and data.num_classes == 10
    # Official layout: 1024 red, then 1024 green, then 1024 blue values, row-major.
    expected = torch.from_numpy(first[0].reshape(3, 32, 32))
    assert torch.equal(data.train.x[0], expected)
    assert data.train.y[:20].tolist() == labels


def test_cifar10_missing_offline_names_root_and_fixes(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_data(DataConfig(name="cifar10", root=str(tmp_path / "nothing"), download=False))
    msg = str(err.value)
    assert "nothing" in msg and "cifar-10-python.tar.gz" in msg and "data=synthetic" in msg and "\n" not in msg


def test_cifar10_download_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from urllib.error import URLError

    from torchvision.datasets import CIFAR10

    def offline(self: object) -> None:
        raise URLError("no network")

    monkeypatch.setattr(CIFAR10, "download", offline)
    with pytest.raises(DataError, match="could not be fetched"):
        load_data(DataConfig(name="cifar10", root=str(tmp_path), download=True))


def _write_folder(root: Path, classes: int = 3, per_class: int = 6, size: int = 32) -> None:
    gen = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                img = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=gen).numpy()
                Image.fromarray(img).save(folder / (f"{i}.png" if i % 2 else f"{i}.jpg"))


def test_imagefolder_decodes_once_then_uses_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_folder(tmp_path)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), val_size=3, mean=None, std=None)
    first = load_data(cfg)
    assert first.classes == ["class0", "class1", "class2"]
    assert len(first.train) + len(first.val) == 18 and len(first.val) == 3 and len(first.test) == 18
    assert len(first.mean) == 3 and all(0 < s for s in first.std)
    assert list((tmp_path / ".mobilebench_cache").glob("*.pt"))

    import mobilebench.data as data_mod

    def no_decode(*args: object) -> None:
        raise AssertionError("second load must come from the cache")

    monkeypatch.setattr(data_mod, "_decode_all", no_decode)
    second = load_data(cfg)
    assert torch.equal(first.train.x, second.train.x) and torch.equal(first.test.y, second.test.y)


def test_imagefolder_resizes_to_image_size(tmp_path: Path) -> None:
    _write_folder(tmp_path, classes=2, per_class=2, size=40)
    data = load_data(DataConfig(name="imagefolder", root=str(tmp_path), val_size=1, image_size=32, cache_dir=str(tmp_path / "c")))
    assert data.train.x.shape[-2:] == (32, 32)


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    _write_folder(tmp_path, classes=2, per_class=2)
    bad = tmp_path / "train" / "class1" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        load_data(DataConfig(name="imagefolder", root=str(tmp_path), val_size=1))


def test_imagefolder_without_test_split(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no test/ folder"):
        load_data(DataConfig(name="imagefolder", root=str(tmp_path)))


def test_splits_are_disjoint_and_subsets_cap() -> None:
    cfg = DataConfig(name="synthetic", train_subset=100, val_size=40, test_subset=30, num_classes=4)
    data = load_data(cfg)
    assert (len(data.train), len(data.val), len(data.test)) == (100, 40, 30)
    train_rows = {bytes(x.numpy()) for x in data.train.x}
    assert not any(bytes(x.numpy()) in train_rows for x in data.val.x)
    assert set(data.train.y.tolist()) <= set(range(4))


def test_val_size_too_large_is_explained(tmp_path: Path) -> None:
    _write_folder(tmp_path, classes=2, per_class=2)
    with pytest.raises(DataError, match="lower data.val_size"):
        load_data(DataConfig(name="imagefolder", root=str(tmp_path), val_size=4))


def test_labels_out_of_range_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_cifar10(tmp_path)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        batch = pickle.load(f)
    batch["labels"][0] = 42
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
        pickle.dump(batch, f)
    with pytest.raises(DataError, match="labels"):
        load_data(DataConfig(name="cifar10", root=str(tmp_path), download=False, val_size=0))
