"""Checkpoints in the format mobilebench wrote before the plain-model / fast-path split (e2dd53f).

torch only: the state-dict layout comes from `data/pre_refactor_v1.json`, recorded by that code,
and the weights from a seeded generator, so the file a user saved then can be rebuilt here byte
for byte in content without shipping a checkpoint. The logits that code gave on it are in the
same JSON file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

FIXTURE = Path(__file__).parent / "data" / "pre_refactor_v1.json"


def fixture() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text())


def legacy_weights(layout: list[list[Any]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic weights for a recorded [key, shape, dtype] layout, in its order."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for key, shape, dtype in layout:
        if dtype == "torch.int64":
            weights[key] = torch.tensor(3)  # num_batches_tracked
        elif key.endswith("running_var"):
            weights[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            weights[key] = torch.randn(shape, generator=gen) * 0.1
    return weights


def legacy_input() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def write_legacy_checkpoint(path: Path, model: str) -> Path:
    """The weights-and-metadata part of a training checkpoint as e2dd53f saved it (format version 1)."""
    entry = fixture()["models"][model]
    payload = {"format_version": 1, "model_args": entry["model_args"], "model": legacy_weights(entry["layout"]),
               "ema": None, "config": {"model": {"name": model}, "augment": {"resize": None}},
               "data": {"classes": [f"class_{i}" for i in range(10)], "mean": [0.5] * 3, "std": [0.25] * 3,
                        "image_size": 32}}
    torch.save(payload, path)
    return path
