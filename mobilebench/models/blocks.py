"""Building blocks shared by the MobileNet family.

Every block records its channel counts (``in_channels``, ``out_channels``, ``stride``
and, for inverted residuals, ``hidden_channels``) as plain attributes so that
tooling such as channel pruning can inspect a network and rebuild a block with a
different width without reverse-engineering conv weights.

Submodules are registered in the same order as torchvision's equivalents
(conv -> BN for each conv, then expand -> depthwise -> SE -> project), which is what
lets :func:`mobilebench.models.load_torchvision_weights` pair tensors by order.
"""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "hardswish": nn.Hardswish,
}
# Hard-swish's gradient needs its input, so in place autograd would have to keep a copy of it
# anyway: out of place is the same memory and one pass less.
IN_PLACE: frozenset[str] = frozenset({"relu", "relu6"})


def make_activation(name: str) -> nn.Module:
    """Return a fresh activation module for ``name`` (one of :data:`ACTIVATIONS`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid choices: {', '.join(ACTIVATIONS)}")
    # In-place is safe here: every activation follows a BN or Linear whose output nobody else reads.
    return ACTIVATIONS[name](inplace=name in IN_PLACE)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``min_value``).

    Hardware kernels prefer channel counts that are multiples of 8. Rounding to the
    nearest multiple could shrink a layer a lot at small widths, so if the result falls
    more than 10% below ``value`` one more ``divisor`` is added (the TF/torchvision rule).
    """
    if divisor <= 0:
        raise ValueError(f"divisor must be positive, got {divisor}")
    if min_value is None:
        min_value = divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _check_positive(**channels: int) -> None:
    for name, value in channels.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_stride(stride: int) -> None:
    if stride not in (1, 2):
        raise ValueError(f"stride must be one of (1, 2), got {stride!r}")


class ConvBNAct(nn.Module):
    """Conv2d (no bias, "same" padding) -> BatchNorm2d -> optional activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        activation: str | None = "relu",
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        _check_positive(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size)
        _check_stride(stride)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        # The bias would be cancelled by BN's mean subtraction, so it only wastes params.
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=(kernel_size - 1) // 2,
            groups=groups,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum)
        self.act = make_activation(activation) if activation is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class DepthwiseSeparable(nn.Module):
    """MobileNetV1 block: depthwise kxk conv-BN-ReLU, then pointwise 1x1 conv-BN-ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.depthwise = ConvBNAct(
            in_channels, in_channels, kernel_size, stride, groups=in_channels, activation=activation
        )
        self.pointwise = ConvBNAct(in_channels, out_channels, 1, activation=activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class SqueezeExcitation(nn.Module):
    """Channel attention: global pool -> 1x1 squeeze -> ReLU -> 1x1 excite -> hard-sigmoid gate.

    V3 uses the hard sigmoid instead of the logistic one because it is cheap on
    mobile hardware and quantizes cleanly.
    """

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        _check_positive(channels=channels, squeeze_channels=squeeze_channels)
        self.in_channels = channels
        self.out_channels = channels
        self.squeeze_channels = squeeze_channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        # 1x1 convs with bias (no BN on a 1x1 map), matching torchvision's layout.
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))
        return x * scale


def se_squeeze_channels(hidden_channels: int) -> int:
    """Squeeze width of V3's SE: a quarter of the expanded width, rounded to a multiple of 8."""
    # Floor division first, as torchvision does, so that pruned (odd) widths still agree.
    return make_divisible(hidden_channels // 4, 8)


class InvertedResidual(nn.Module):
    """Inverted residual with linear bottleneck (MobileNetV2/V3).

    1x1 expand (``in -> hidden``, skipped when ``has_expand`` is False) -> depthwise kxk
    at ``stride`` -> optional SE -> 1x1 linear projection (``hidden -> out``, no activation:
    a non-linearity in the narrow bottleneck destroys information). A residual is added
    when the block keeps both resolution and width.

    ``hidden_channels`` is explicit (not an expansion ratio) so that a block whose
    expanded width was pruned can be rebuilt exactly. Without an expand conv the depthwise
    conv runs on the input itself, so ``hidden_channels`` must then equal ``in_channels``.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        out_channels: int,
        *,
        kernel_size: int = 3,
        stride: int = 1,
        has_expand: bool = True,
        use_se: bool = False,
        activation: str = "relu6",
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        _check_positive(
            in_channels=in_channels,
            hidden_channels=hidden_channels,
            out_channels=out_channels,
            kernel_size=kernel_size,
        )
        _check_stride(stride)
        if not has_expand and hidden_channels != in_channels:
            raise ValueError(
                f"a block without expand conv needs hidden_channels == in_channels "
                f"({in_channels}), got {hidden_channels}"
            )
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.has_expand = has_expand
        self.use_se = use_se
        self.activation = activation
        self.bn_eps = bn_eps
        self.bn_momentum = bn_momentum
        self.use_residual = stride == 1 and in_channels == out_channels

        bn = {"bn_eps": bn_eps, "bn_momentum": bn_momentum}
        self.expand: ConvBNAct | None = (
            ConvBNAct(in_channels, hidden_channels, 1, activation=activation, **bn) if has_expand else None
        )
        self.depthwise = ConvBNAct(
            hidden_channels,
            hidden_channels,
            kernel_size,
            stride,
            groups=hidden_channels,
            activation=activation,
            **bn,
        )
        self.se: SqueezeExcitation | None = (
            SqueezeExcitation(hidden_channels, se_squeeze_channels(hidden_channels)) if use_se else None
        )
        self.project = ConvBNAct(hidden_channels, out_channels, 1, activation=None, **bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(x) if self.expand is not None else x
        out = self.depthwise(out)
        if self.se is not None:
            out = self.se(out)
        out = self.project(out)
        if self.use_residual:
            out = out + x
        return out
