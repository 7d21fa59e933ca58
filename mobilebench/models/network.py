"""The model container shared by all MobileNets, plus helpers the family builders share.

Contract relied on by :mod:`mobilebench.profile` and the pruning tools:
``model(x) == model.head(model.features(x))``, where ``features`` is an
``nn.Sequential`` (stem, one module per table row, then for V2/V3 the final 1x1 conv)
and ``head`` is a :class:`ClassifierHead`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .blocks import InvertedResidual, make_activation

STEMS: tuple[str, ...] = ("cifar", "imagenet")


class ClassifierHead(nn.Module):
    """Global average pool -> [Linear -> activation] -> Dropout -> Linear classifier.

    The optional hidden Linear is MobileNetV3's extra 1024/1280-wide layer; the final
    Linear is always ``classifier`` so it can be swapped for a new number of classes.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        dropout: float,
        hidden_features: int | None = None,
        hidden_activation: str = "hardswish",
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        features = in_channels
        self.hidden: nn.Sequential | None = None
        if hidden_features is not None:
            self.hidden = nn.Sequential(
                nn.Linear(in_channels, hidden_features), make_activation(hidden_activation)
            )
            features = hidden_features
        self.dropout = nn.Dropout(p=dropout)
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.pool(x))
        if self.hidden is not None:
            x = self.hidden(x)
        return self.classifier(self.dropout(x))


class MobileNet(nn.Module):
    """``features`` then ``head``; metadata attributes record how it was built."""

    def __init__(
        self,
        features: nn.Sequential,
        head: ClassifierHead,
        *,
        arch: str,
        stem: str,
        width_mult: float,
    ) -> None:
        super().__init__()
        self.features = features
        self.head = head
        self.arch = arch
        self.stem = stem
        self.width_mult = width_mult
        self._init_weights()

    @property
    def num_classes(self) -> int:
        return self.head.classifier.out_features

    @property
    def hidden_channels(self) -> list[int]:
        """Expanded width of every inverted-residual block, in ``features`` order.

        Feeding this back to ``build_model(..., hidden_channels=...)`` rebuilds the same
        architecture, which is how a pruned checkpoint recreates its model.
        """
        return [m.hidden_channels for m in self.features if isinstance(m, InvertedResidual)]

    def _init_weights(self) -> None:
        # Same scheme as torchvision, so training recipes tuned there transfer.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def check_common(num_classes: int, width_mult: float, dropout: float) -> None:
    """Validate the settings every family builder takes."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(width_mult, (int, float)) or not math.isfinite(width_mult) or width_mult <= 0:
        raise ValueError(f"width_mult must be a finite number > 0, got {width_mult!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


def resolve_strides(
    row_strides: Sequence[int], stem: str, *, relax_first_downsample: bool
) -> tuple[int, list[int]]:
    """Return (stem stride, per-row strides) for ``stem``.

    The CIFAR stem keeps 32x32 inputs from collapsing to 1x1: the stem runs at stride 1
    and, if ``relax_first_downsample``, so does the first stride-2 row.
    """
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; valid choices: {', '.join(STEMS)}")
    strides = list(row_strides)
    if stem == "imagenet":
        return 2, strides
    if relax_first_downsample:
        first = strides.index(2)
        strides[first] = 1
    return 1, strides


def check_hidden_override(hidden_channels: Sequence[int] | None, num_rows: int) -> list[int] | None:
    """Validate a per-row expanded-width override (one positive int per inverted-residual row)."""
    if hidden_channels is None:
        return None
    values = list(hidden_channels)
    if len(values) != num_rows:
        raise ValueError(
            f"hidden_channels needs one entry per inverted-residual row ({num_rows}), got {len(values)}"
        )
    for i, value in enumerate(values):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"hidden_channels[{i}] must be a positive int, got {value!r}")
    return values
