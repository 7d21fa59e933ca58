"""MobileNetV1 (Howard et al. 2017, "MobileNets", Table 1), with BatchNorm after every conv.

ImageNet stem (``stem="imagenet"``): 3x3 conv, 32 channels, stride 2, then 13 depthwise
separable blocks; 224x224 in -> 7x7x1024 -> global pool -> Linear. At width 1.0 and 1000
classes: 4,231,976 parameters, ~569M MACs.

CIFAR stem (``stem="cifar"``): the only change is that the stem conv runs at stride 1.
All table strides stay as they are (4 stride-2 rows), so a 32x32 input ends at 2x2x1024.

Width multiplier: every row width and the stem are ``make_divisible(c * width_mult, 8)``
(the paper scales all layers uniformly; rounding to 8 follows V2/V3 practice).
Dropout defaults to 0.0: the paper trains V1 with little regularization because small
models overfit less.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .blocks import ConvBNAct, DepthwiseSeparable, make_divisible
from .network import ClassifierHead, MobileNet, check_common, resolve_strides

STEM_CHANNELS = 32
DEFAULT_DROPOUT = 0.0


@dataclass(frozen=True)
class V1Row:
    """One depthwise separable block."""

    kernel: int
    out_channels: int
    stride: int


V1_TABLE: tuple[V1Row, ...] = (
    V1Row(3, 64, 1),  # end of 112x112 stage
    V1Row(3, 128, 2),
    V1Row(3, 128, 1),  # end of 56x56 stage
    V1Row(3, 256, 2),
    V1Row(3, 256, 1),  # end of 28x28 stage
    V1Row(3, 512, 2),
    V1Row(3, 512, 1),
    V1Row(3, 512, 1),
    V1Row(3, 512, 1),
    V1Row(3, 512, 1),
    V1Row(3, 512, 1),  # end of 14x14 stage
    V1Row(3, 1024, 2),
    V1Row(3, 1024, 1),  # end of 7x7 stage
)


def build_mobilenet_v1(
    num_classes: int = 1000,
    width_mult: float = 1.0,
    stem: str = "imagenet",
    dropout: float = DEFAULT_DROPOUT,
) -> MobileNet:
    check_common(num_classes, width_mult, dropout)
    stem_stride, strides = resolve_strides(
        [row.stride for row in V1_TABLE], stem, relax_first_downsample=False
    )
    channels = make_divisible(STEM_CHANNELS * width_mult)
    layers: list[nn.Module] = [ConvBNAct(3, channels, 3, stem_stride, activation="relu")]
    for row, stride in zip(V1_TABLE, strides):
        out_channels = make_divisible(row.out_channels * width_mult)
        layers.append(DepthwiseSeparable(channels, out_channels, row.kernel, stride))
        channels = out_channels
    head = ClassifierHead(channels, num_classes, dropout)
    return MobileNet(nn.Sequential(*layers), head, arch="v1", stem=stem, width_mult=width_mult)
