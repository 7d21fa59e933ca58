"""MobileNetV3-Small and -Large (Howard et al. 2019, Tables 1 and 2), laid out like torchvision.

ImageNet stem (``stem="imagenet"``): 3x3 conv, 16 channels, stride 2, h-swish; the table
rows; 1x1 conv to 6x the last row's width (576 Small / 960 Large) with h-swish; head =
global pool -> Linear to 1024 (Small) / 1280 (Large) -> h-swish -> Dropout(0.2) -> Linear.
SE blocks squeeze to ``make_divisible(expanded // 4, 8)`` with ReLU and a hard-sigmoid
gate. BatchNorm uses eps=1e-3, momentum=0.01 (the TF reference values torchvision keeps).
At width 1.0, 1000 classes, 224x224: Small 2,542,856 params / ~57M MACs, Large
5,483,032 params / ~217M MACs.

CIFAR stem (``stem="cifar"``): the stem conv runs at stride 1 AND the first stride-2
row runs at stride 1 (Small: row 0, 16 -> 16 with SE; Large: row 1, 16 -> 24).
Total stride drops from 32 to 8, so a 32x32 input ends at 4x4.

Width multiplier (torchvision's rule): stem, every row's expanded and output width and
the head's hidden Linear (1024/1280) are all ``make_divisible(c * width_mult, 8)`` --
unlike V2, V3 scales its last width below 1.0 as well. The last conv is 6x the scaled
last row width. A row has an expand conv only when its scaled expanded width differs
from its scaled input width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from .blocks import ConvBNAct, InvertedResidual, make_divisible
from .network import ClassifierHead, MobileNet, check_common, check_hidden_override, resolve_strides

STEM_CHANNELS = 16
LAST_CONV_EXPANSION = 6
DEFAULT_DROPOUT = 0.2
BN_EPS = 1e-3
BN_MOMENTUM = 0.01


@dataclass(frozen=True)
class V3Row:
    """One bneck block: ``expanded`` is the paper's "exp size"."""

    kernel: int
    expanded: int
    out_channels: int
    use_se: bool
    activation: str  # "relu" (paper's RE) or "hardswish" (HS)
    stride: int


RE, HS = "relu", "hardswish"

V3_SMALL_TABLE: tuple[V3Row, ...] = (
    V3Row(3, 16, 16, True, RE, 2),  # end of 56x56 stage
    V3Row(3, 72, 24, False, RE, 2),
    V3Row(3, 88, 24, False, RE, 1),  # end of 28x28 stage
    V3Row(5, 96, 40, True, HS, 2),
    V3Row(5, 240, 40, True, HS, 1),
    V3Row(5, 240, 40, True, HS, 1),
    V3Row(5, 120, 48, True, HS, 1),
    V3Row(5, 144, 48, True, HS, 1),  # end of 14x14 stage
    V3Row(5, 288, 96, True, HS, 2),
    V3Row(5, 576, 96, True, HS, 1),
    V3Row(5, 576, 96, True, HS, 1),  # end of 7x7 stage
)
V3_SMALL_LAST_CHANNELS = 1024

V3_LARGE_TABLE: tuple[V3Row, ...] = (
    V3Row(3, 16, 16, False, RE, 1),  # end of 112x112 stage
    V3Row(3, 64, 24, False, RE, 2),
    V3Row(3, 72, 24, False, RE, 1),  # end of 56x56 stage
    V3Row(5, 72, 40, True, RE, 2),
    V3Row(5, 120, 40, True, RE, 1),
    V3Row(5, 120, 40, True, RE, 1),  # end of 28x28 stage
    V3Row(3, 240, 80, False, HS, 2),
    V3Row(3, 200, 80, False, HS, 1),
    V3Row(3, 184, 80, False, HS, 1),
    V3Row(3, 184, 80, False, HS, 1),
    V3Row(3, 480, 112, True, HS, 1),
    V3Row(3, 672, 112, True, HS, 1),  # end of 14x14 stage
    V3Row(5, 672, 160, True, HS, 2),
    V3Row(5, 960, 160, True, HS, 1),
    V3Row(5, 960, 160, True, HS, 1),  # end of 7x7 stage
)
V3_LARGE_LAST_CHANNELS = 1280


def _build_v3(
    arch: str,
    table: tuple[V3Row, ...],
    last_channels: int,
    num_classes: int,
    width_mult: float,
    stem: str,
    dropout: float,
    hidden_channels: Sequence[int] | None,
) -> MobileNet:
    check_common(num_classes, width_mult, dropout)
    stem_stride, strides = resolve_strides([row.stride for row in table], stem, relax_first_downsample=True)
    hidden_override = check_hidden_override(hidden_channels, len(table))
    bn = {"bn_eps": BN_EPS, "bn_momentum": BN_MOMENTUM}
    channels = make_divisible(STEM_CHANNELS * width_mult)
    layers: list[nn.Module] = [ConvBNAct(3, channels, 3, stem_stride, activation=HS, **bn)]
    for i, (row, stride) in enumerate(zip(table, strides)):
        expanded = make_divisible(row.expanded * width_mult)
        out_channels = make_divisible(row.out_channels * width_mult)
        layers.append(
            InvertedResidual(
                channels,
                hidden_override[i] if hidden_override else expanded,
                out_channels,
                kernel_size=row.kernel,
                stride=stride,
                has_expand=expanded != channels,
                use_se=row.use_se,
                activation=row.activation,
                **bn,
            )
        )
        channels = out_channels
    last_conv = LAST_CONV_EXPANSION * channels
    layers.append(ConvBNAct(channels, last_conv, 1, activation=HS, **bn))
    head = ClassifierHead(
        last_conv,
        num_classes,
        dropout,
        hidden_features=make_divisible(last_channels * width_mult),
        hidden_activation=HS,
    )
    return MobileNet(nn.Sequential(*layers), head, arch=arch, stem=stem, width_mult=width_mult)


def build_mobilenet_v3_small(
    num_classes: int = 1000,
    width_mult: float = 1.0,
    stem: str = "imagenet",
    dropout: float = DEFAULT_DROPOUT,
    hidden_channels: Sequence[int] | None = None,
) -> MobileNet:
    return _build_v3(
        "v3_small", V3_SMALL_TABLE, V3_SMALL_LAST_CHANNELS,
        num_classes, width_mult, stem, dropout, hidden_channels,
    )


def build_mobilenet_v3_large(
    num_classes: int = 1000,
    width_mult: float = 1.0,
    stem: str = "imagenet",
    dropout: float = DEFAULT_DROPOUT,
    hidden_channels: Sequence[int] | None = None,
) -> MobileNet:
    return _build_v3(
        "v3_large", V3_LARGE_TABLE, V3_LARGE_LAST_CHANNELS,
        num_classes, width_mult, stem, dropout, hidden_channels,
    )
