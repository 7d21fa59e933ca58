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
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as _module

from mobilebench.models import native


class _ReLU6InPlace(torch.autograd.Function):
    """Clamp to [0, 6] in place and take the gradient mask from the output."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        x.clamp_(0.0, 6.0)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors  # type: ignore[attr-defined]
        # Zero where the output sits on a bound: the same rule as autograd's own relu6.
        return torch.ops.aten.hardtanh_backward(grad, y, 0.0, 6.0)


class ReLU6(nn.ReLU6):
    """``nn.ReLU6`` whose in-place training path does not copy its input.

    Under autograd, torch's ``relu6_`` clones the tensor before clamping it, an extra read and
    write of the largest activations in V2 (after a BN on [128, 144, 32, 32] channels_last, the
    activation's forward + backward took 7.2 ms that way against 4.8 ms here). Eval, no-grad and
    compiled or exported graphs take the stock op, so ONNX export and quantization see a plain ReLU6.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace and _eager_training(self, x):
            return _ReLU6InPlace.apply(x)
        return super().forward(x)


def _eager_training(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether a block may take its hand-written training path: eager autograd in train mode.

    Eval, no-grad and compiled graphs (and so export and quantization) take the stock modules.
    """
    return module.training and torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling()


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": ReLU6,
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


def fp32_under_cpu_autocast(in_channels: int, groups: int, kernel_size: int, stride: int) -> bool:
    """True for the convs that CPU bf16 autocast should leave in fp32: depthwise, other than 3x3 stride 1.

    oneDNN's bf16 backward for those is far slower than its fp32 one on an AVX512-BF16 CPU
    (forward + backward, batch 128, channels_last: 144 channels 3x3 stride 2 at 32px 99.6 ms
    against 8.3 ms; 72 channels 5x5 stride 2 at 16px 42.1 against 2.4; 240 channels 5x5 stride 1
    at 8px 13.6 against 5.0), while 3x3 stride 1 depthwise and every dense conv run faster in bf16.
    """
    return groups == in_channels > 1 and (kernel_size != 3 or stride != 1)


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
        self.fp32_under_cpu_autocast = fp32_under_cpu_autocast(in_channels, groups, kernel_size, stride)
        # Where oneDNN's depthwise weight gradient is slow and the native one pays: 5x5 and up
        # (3x3 layers measured 1.04-3.2x slower with it, see models/native.py).
        self.native_weight_grad = groups == in_channels == out_channels > 1 and kernel_size >= 5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp32_under_cpu_autocast and x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return self.act(self.bn(self._conv(x.float())))
        return self.act(self.bn(self._conv(x)))

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if (self.native_weight_grad and _eager_training(self, x) and _plain_conv(conv) and native.supports(x)
                and not torch.is_autocast_enabled("cpu")):
            return _DepthwiseConv.apply(x, conv.weight, conv.stride[0], conv.padding[0])
        return conv(x)


def _plain_conv(conv: nn.Module) -> bool:
    """An ``nn.Conv2d`` that calling directly would not change: no hooks (``torch.nn.utils.prune``
    recomputes the weight in one), no parametrization, and a plain depthwise weight."""
    return (type(conv) is nn.Conv2d and isinstance(conv.weight, nn.Parameter) and conv.groups == conv.weight.shape[0]
            and not (conv._forward_pre_hooks or conv._forward_hooks or _module._global_forward_pre_hooks
                     or _module._global_forward_hooks))


class _DepthwiseConv(torch.autograd.Function):
    """Bias-free depthwise conv whose weight gradient comes from :mod:`mobilebench.models.native`.

    Forward and input gradient are oneDNN's, as in ``nn.Conv2d``; an output gradient the native
    kernel cannot read (not channels_last) takes oneDNN's weight gradient too.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor, stride: int,
                padding: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding  # type: ignore[attr-defined]
        return F.conv2d(x, weight, None, stride, padding, 1, weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        s, p = ctx.stride, ctx.padding  # type: ignore[attr-defined]
        want_x, want_w = ctx.needs_input_grad[:2]  # type: ignore[attr-defined]
        native_w = want_w and native.supports(grad)
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, [s, s], [p, p], [1, 1], False, [0, 0], weight.shape[0],
            [want_x, want_w and not native_w, False])
        if native_w:
            grad_w = native.depthwise_weight_grad(grad, x, weight.shape[-1], s, p)
        return grad_x, grad_w, None, None


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
        if _eager_training(self, x) and not torch.is_autocast_enabled(x.device.type):
            return _SqueezeExcite.apply(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        scale = self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))
        return x * scale


def _se_gate(pooled: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
             b2: torch.Tensor) -> torch.Tensor:
    """SE's gate on pooled [N, C] rows, its 1x1 convs run as the matmuls they are."""
    return F.hardsigmoid(F.linear(F.relu(F.linear(pooled, w1.flatten(1), b1)), w2.flatten(1), b2))


class _SqueezeExcite(torch.autograd.Function):
    """``x * gate(mean(x))`` for training, with both of x's gradient terms formed in one pass.

    Autograd's own graph writes the pooled term's gradient out at full size, then adds it to the
    direct term's, and runs the two 1x1 convs through oneDNN on 1x1 maps. Here the gate runs as
    matmuls and its backward is autograd's on [N, C] rows. v3_small, batch 128, 32px, CL fp32 on a
    2-core EPYC, steps alternating in one process: 633 -> 678 images/s (median of 5 rounds).
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
        pooled = x.mean((2, 3))
        scale = _se_gate(pooled, w1, b1, w2, b2)[:, :, None, None]
        ctx.save_for_backward(x, pooled, scale, w1, b1, w2, b2)
        return x * scale

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, pooled, scale, *params = ctx.saved_tensors  # type: ignore[attr-defined]
        grad_scale = (grad * x).sum((2, 3))
        with torch.enable_grad():  # the gate is tiny: recompute it rather than keep its graph
            leaves = [t.detach().requires_grad_() for t in (pooled, *params)]
            grads = torch.autograd.grad(_se_gate(*leaves), leaves, grad_scale)
        # The pooled term reaches every one of the H*W positions that the mean averaged.
        grad_x = torch.addcmul(grads[0][:, :, None, None] / (x.shape[2] * x.shape[3]), grad, scale)
        return (grad_x, *grads[1:])


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
