"""Parameter, MAC and per-block cost counting (torch only).

MACs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and
matrix multiplies; a multiply-add is 2 FLOPs, so MACs = FLOPs / 2). Pooling, activations,
BN and residual adds are not counted, matching how the MobileNet papers report mult-adds.

:func:`layer_summary` relies on the model contract of :mod:`mobilebench.models`:
``model(x) == model.head(model.features(x))`` with ``features`` an ``nn.Sequential``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    # Restore each module's own flag (not model.train(...)) so that, e.g., BN layers a
    # caller froze in eval mode stay frozen after profiling.
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _zeros_input(model: nn.Module, image_size: int, in_channels: int) -> torch.Tensor:
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    reference = next(model.parameters(), None)
    device = reference.device if reference is not None else None
    dtype = reference.dtype if reference is not None else None
    return torch.zeros(1, in_channels, image_size, image_size, device=device, dtype=dtype)


def _flops(fn: Any, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    counter = FlopCounterMode(display=False)
    with counter:
        out = fn(x)
    return out, counter.get_total_flops()


def count_macs(model: nn.Module, image_size: int, in_channels: int = 3) -> int:
    """Multiply-accumulates of one forward pass on a 1 x C x image_size x image_size input."""
    x = _zeros_input(model, image_size, in_channels)
    with _inference(model):
        _, flops = _flops(model, x)
    return flops // 2


def layer_summary(model: nn.Module, image_size: int, in_channels: int = 3) -> list[dict[str, Any]]:
    """One row per top-level block of ``model.features`` plus one for ``model.head``.

    Each row has ``block`` (e.g. ``"features.3 InvertedResidual"``), ``output_shape``
    (full tensor shape for a batch of 1), ``params`` and ``macs``; the rows sum to
    :func:`count_params` and :func:`count_macs` for the models of ``mobilebench.models``.
    """
    features = getattr(model, "features", None)
    head = getattr(model, "head", None)
    if not isinstance(features, nn.Sequential) or not isinstance(head, nn.Module):
        raise TypeError(
            "layer_summary needs a model with `features` (nn.Sequential) and `head` "
            "such that model(x) == head(features(x))"
        )
    stages = [(f"features.{name} {type(block).__name__}", block) for name, block in features.named_children()]
    stages.append((f"head {type(head).__name__}", head))
    rows: list[dict[str, Any]] = []
    x = _zeros_input(model, image_size, in_channels)
    with _inference(model):
        for label, block in stages:
            x, flops = _flops(block, x)
            rows.append(
                {
                    "block": label,
                    "output_shape": tuple(x.shape),
                    "params": count_params(block),
                    "macs": flops // 2,
                }
            )
    return rows
