"""MobileNetV2 (Sandler et al. 2018, Table 2), laid out exactly like torchvision's.

ImageNet stem (``stem="imagenet"``): 3x3 conv, 32 channels, stride 2, ReLU6; 17 inverted
residual rows; 1x1 conv to 1280; global pool -> Dropout(0.2) -> Linear. At width 1.0 and
1000 classes: 3,504,872 parameters, ~301M MACs at 224x224.

CIFAR stem (``stem="cifar"``): the stem conv runs at stride 1 AND the first stride-2 row
(row 1, 16 -> 24 channels) runs at stride 1; everything else is unchanged. Total stride
drops from 32 to 8, so a 32x32 input ends at 4x4x1280.

Width multiplier (torchvision's rule): stem and row outputs are
``make_divisible(c * width_mult, 8)``; the expanded width of a row is
``round(in_channels * t)`` of the already-scaled input; the last conv's 1280 is scaled
only when ``width_mult > 1`` (``make_divisible(1280 * max(1, width_mult), 8)``), because
shrinking it hurts accuracy more than it saves compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from .blocks import ConvBNAct, InvertedResidual, make_divisible
from .network import ClassifierHead, MobileNet, check_common, check_hidden_override, resolve_strides

STEM_CHANNELS = 32
LAST_CHANNELS = 1280
DEFAULT_DROPOUT = 0.2
ACTIVATION = "relu6"


@dataclass(frozen=True)
class V2Row:
    """One inverted residual block; ``expansion`` is the paper's t."""

    kernel: int
    expansion: int
    out_channels: int
    stride: int


V2_TABLE: tuple[V2Row, ...] = (
    V2Row(3, 1, 16, 1),  # end of 112x112 stage
    V2Row(3, 6, 24, 2),
    V2Row(3, 6, 24, 1),  # end of 56x56 stage
    V2Row(3, 6, 32, 2),
    V2Row(3, 6, 32, 1),
    V2Row(3, 6, 32, 1),  # end of 28x28 stage
    V2Row(3, 6, 64, 2),
    V2Row(3, 6, 64, 1),
    V2Row(3, 6, 64, 1),
    V2Row(3, 6, 64, 1),
    V2Row(3, 6, 96, 1),
    V2Row(3, 6, 96, 1),
    V2Row(3, 6, 96, 1),  # end of 14x14 stage
    V2Row(3, 6, 160, 2),
    V2Row(3, 6, 160, 1),
    V2Row(3, 6, 160, 1),
    V2Row(3, 6, 320, 1),  # end of 7x7 stage
)


def build_mobilenet_v2(
    num_classes: int = 1000,
    width_mult: float = 1.0,
    stem: str = "imagenet",
    dropout: float = DEFAULT_DROPOUT,
    hidden_channels: Sequence[int] | None = None,
) -> MobileNet:
    check_common(num_classes, width_mult, dropout)
    stem_stride, strides = resolve_strides(
        [row.stride for row in V2_TABLE], stem, relax_first_downsample=True
    )
    hidden_override = check_hidden_override(hidden_channels, len(V2_TABLE))
    channels = make_divisible(STEM_CHANNELS * width_mult)
    layers: list[nn.Module] = [ConvBNAct(3, channels, 3, stem_stride, activation=ACTIVATION)]
    for i, (row, stride) in enumerate(zip(V2_TABLE, strides)):
        out_channels = make_divisible(row.out_channels * width_mult)
        hidden = hidden_override[i] if hidden_override else int(round(channels * row.expansion))
        layers.append(
            InvertedResidual(
                channels,
                hidden,
                out_channels,
                kernel_size=row.kernel,
                stride=stride,
                has_expand=row.expansion != 1,
                activation=ACTIVATION,
            )
        )
        channels = out_channels
    last_channels = make_divisible(LAST_CHANNELS * max(1.0, width_mult))
    layers.append(ConvBNAct(channels, last_channels, 1, activation=ACTIVATION))
    head = ClassifierHead(last_channels, num_classes, dropout)
    return MobileNet(nn.Sequential(*layers), head, arch="v2", stem=stem, width_mult=width_mult)
