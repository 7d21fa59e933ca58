"""Batched tensor augmentation does what the PIL transforms do, per image, deterministically."""

from __future__ import annotations

import pytest
import torch

from mobilebench.config import AugmentConfig
from mobilebench.data import Split
from mobilebench.loader import (
    TensorLoader,
    crop_flip_batch,
    crop_windows,
    cutout,
    eval_batches,
    progressive_size,
    resident_device,
    resize_batch,
    window_bytes,
)


def _images(n: int = 8, size: int = 32) -> torch.Tensor:
    return torch.randint(1, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _crops(x: torch.Tensor, padding: int, flip: bool, seed: int) -> torch.Tensor:
    windows = crop_windows(x.permute(0, 2, 3, 1), padding, flip)
    return crop_flip_batch(windows, torch.arange(len(x)), torch.Generator().manual_seed(seed))


def _matches(image: torch.Tensor, crop: torch.Tensor, padding: int) -> list[tuple[int, int, bool]]:
    """Every (dy, dx, mirrored) window of the zero-padded image equal to `crop`."""
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    size, n = image.shape[-1], 2 * padding + 1
    return [(dy, dx, m) for dy in range(n) for dx in range(n) for m in (False, True)
            if torch.equal((padded.flip(-1) if m else padded)[:, dy:dy + size, dx:dx + size], crop)]


def test_crop_is_a_shifted_window_with_zero_fill() -> None:
    x = _images()
    out = _crops(x, 4, flip=False, seed=1)
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    for i in range(len(x)):
        assert any(not m for *_, m in _matches(x[i], out[i], 4)), f"image {i} is not a crop of its padded input"


def test_crop_offsets_vary_between_images() -> None:
    x = _images(64)
    out = _crops(x, 4, flip=False, seed=2)
    unchanged = sum(torch.equal(out[i], x[i]) for i in range(len(x)))
    assert unchanged < 10  # a centred crop has probability 1/81 per image
    offsets = {_matches(x[i], out[i], 4)[0][:2] for i in range(len(x))}
    assert len(offsets) > 30


def test_flip_mirrors_about_half() -> None:
    x = _images(200)
    out = _crops(x, 0, flip=True, seed=3)
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.equal(out[i], x[i]) for i in range(len(x))]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 60 < sum(flipped) < 140


def test_crop_and_flip_together_are_a_mirrored_or_plain_window() -> None:
    x = _images(64)
    out = _crops(x, 4, flip=True, seed=5)
    mirrored = 0
    for i in range(len(x)):
        found = _matches(x[i], out[i], 4)
        assert found, f"image {i} is neither a crop nor a mirrored crop"
        mirrored += all(m for *_, m in found)
    assert 15 < mirrored < 49


def test_no_augmentation_returns_the_images() -> None:
    x = _images(4)
    assert torch.equal(_crops(x, 0, flip=False, seed=0), x)


def test_cutout_zeroes_one_square() -> None:
    x = _images(16)
    out = cutout(x, 8, torch.Generator().manual_seed(4))
    zeroed = (out == 0).all(1).sum((1, 2))  # pixels zero in every channel (inputs are >= 1)
    assert (zeroed <= 64).all() and (zeroed > 0).all()


def test_loader_is_deterministic_and_covers_the_split() -> None:
    split = Split(_images(100), torch.arange(100) % 10)
    aug = AugmentConfig()

    def epoch(seed: int) -> list[torch.Tensor]:
        loader = TensorLoader(split, 32, aug, [0.5] * 3, [0.25] * 3, torch.device("cpu"), torch.Generator().manual_seed(seed))
        return [y for _, y in loader]

    a, b, c = epoch(0), epoch(0), epoch(1)
    assert len(a) == 3  # drop_last: 100 // 32
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))
    assert len(set(torch.cat(a).tolist())) == 10


def test_loader_shards_do_not_overlap() -> None:
    split = Split(_images(64), torch.arange(64))
    seen = []
    for rank in range(2):
        loader = TensorLoader(split, 8, AugmentConfig(), [0.5] * 3, [0.25] * 3, torch.device("cpu"),
                              torch.Generator().manual_seed(0), shard=(rank, 2))
        seen.append(set(torch.cat([y for _, y in loader]).tolist()))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 64


def test_eval_batches_normalize_in_order() -> None:
    x = torch.full((5, 3, 32, 32), 255, dtype=torch.uint8)
    batches = list(eval_batches(Split(x, torch.arange(5)), 2, [0.5] * 3, [0.5] * 3, torch.device("cpu")))
    assert [len(y) for _, y in batches] == [2, 2, 1]
    assert torch.allclose(batches[0][0], torch.ones(1))
    assert batches[0][0].is_contiguous(memory_format=torch.channels_last)


def test_progressive_size_ramps_from_min_to_full_then_stays() -> None:
    sizes = [progressive_size(e, 10, 32, 16, 0.8, 4) for e in range(10)]
    assert sizes[0] == 16 and sizes[-2:] == [32, 32]
    assert sizes == sorted(sizes) and all(s % 4 == 0 and 16 <= s <= 32 for s in sizes)
    assert len(set(sizes)) >= 4  # it really ramps, not one jump
    assert [progressive_size(e, 10, 32, None, 0.8, 4) for e in range(10)] == [32] * 10
    assert [progressive_size(e, 5, 32, 16, 0.0, 4) for e in range(5)] == [32] * 5


def test_resize_batch_downscales_and_keeps_the_layout() -> None:
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    out = resize_batch(x, 16, channels_last=True)
    assert out.shape == (4, 3, 16, 16) and out.is_contiguous(memory_format=torch.channels_last)
    # A constant image stays constant through an antialiased downscale.
    flat = torch.full((1, 3, 32, 32), 0.5)
    assert torch.allclose(resize_batch(flat, 20, channels_last=False), torch.full((1, 3, 20, 20), 0.5), atol=1e-6)
    assert resize_batch(x, 32, channels_last=True) is x


def test_tensor_loader_serves_the_size_it_is_given() -> None:
    split = Split(_images(64), torch.arange(64) % 10)
    loader = TensorLoader(split, 16, AugmentConfig(), [0.5] * 3, [0.25] * 3, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert next(iter(loader))[0].shape == (16, 3, 32, 32)
    loader.image_size = 20
    x, y = next(iter(loader))
    assert x.shape == (16, 3, 20, 20) and y.shape == (16,)


def test_window_bytes_is_what_the_loader_allocates() -> None:
    split = Split(_images(10), torch.arange(10))
    for aug in (AugmentConfig(), AugmentConfig(flip=False, crop_padding=2)):
        windows = TensorLoader(split, 4, aug, [0.5] * 3, [0.25] * 3, torch.device("cpu"), torch.Generator()).windows
        assert window_bytes(split, aug) == windows.untyped_storage().nbytes()


def test_resident_device_keeps_data_on_the_gpu_only_when_it_fits() -> None:
    cuda, cpu, mb = torch.device("cuda"), torch.device("cpu"), 2**20
    assert resident_device("auto", 400 * mb, cuda, 1000 * mb) == cuda
    assert resident_device("auto", 600 * mb, cuda, 1000 * mb) == cpu  # leaves half for the training itself
    assert resident_device("on", 600 * mb, cuda, 1000 * mb) == cuda
    assert resident_device("off", 1 * mb, cuda, 1000 * mb) == cpu
    assert resident_device("auto", 600 * mb, torch.device("mps"), None) == torch.device("mps")
    assert resident_device("off", 1 * mb, cpu, None) == cpu  # one memory on CPU: nothing to choose


def test_host_store_serves_the_same_batches_as_a_device_store(monkeypatch: pytest.MonkeyPatch) -> None:
    # cpu:0 is a different device object than cpu, so the host-store path (gather, then copy) runs
    # without a GPU.
    split = Split(_images(48), torch.arange(48) % 10)
    aug = AugmentConfig(cutout=8)
    copies: list[tuple[tuple[int, ...], torch.dtype]] = []
    copy = TensorLoader._to_device
    monkeypatch.setattr(TensorLoader, "_to_device", lambda self, t: copies.append((tuple(t.shape), t.dtype)) or copy(self, t))

    def epoch(store: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = TensorLoader(split, 16, aug, [0.5] * 3, [0.25] * 3, torch.device("cpu", 0),
                              torch.Generator().manual_seed(3), store=store)
        return list(loader)

    on_device = epoch(torch.device("cpu", 0))
    assert copies == []
    on_host = epoch(torch.device("cpu"))
    # The uint8 batch and its labels cross over, not the 4x larger float batch.
    assert copies == [((16, 3, 32, 32), torch.uint8), ((16,), torch.int64)] * 3
    assert len(on_host) == 3
    for (xa, ya), (xb, yb) in zip(on_device, on_host):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xb.is_contiguous(memory_format=torch.channels_last)
