"""Batched tensor augmentation does what the PIL transforms do, per image, deterministically."""

from __future__ import annotations

import torch

from mobilebench.config import AugmentConfig
from mobilebench.data import Split
from mobilebench.loader import TensorLoader, cutout, eval_batches, random_crop, random_flip


def _images(n: int = 8, size: int = 32) -> torch.Tensor:
    return torch.randint(1, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_random_crop_is_a_shift_with_zero_fill() -> None:
    x = _images()
    out = random_crop(x, 4, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):
        # Each output must equal exactly one of the 81 windows of its padded image.
        windows = [(dy, dx) for dy in range(9) for dx in range(9) if torch.equal(padded[i, :, dy:dy + 32, dx:dx + 32], out[i])]
        assert windows, f"image {i} is not a crop of its padded input"


def test_crop_offsets_vary_between_images() -> None:
    x = _images(64)
    out = random_crop(x, 4, torch.Generator().manual_seed(2))
    unchanged = sum(torch.equal(out[i], x[i]) for i in range(len(x)))
    assert unchanged < 10  # a centred crop has probability 1/81 per image


def test_flip_mirrors_about_half() -> None:
    x = _images(200)
    out = random_flip(x, torch.Generator().manual_seed(3))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.equal(out[i], x[i]) for i in range(len(x))]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 60 < sum(flipped) < 140


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
