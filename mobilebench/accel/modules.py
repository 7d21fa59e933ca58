"""Training-speed stand-ins for plain modules: same parameters, same state-dict keys, same outputs.

Each class subclasses the module it replaces and holds the same parameters and buffers under the
same names, so `isinstance` checks and `state_dict` keep working; `mobilebench.accel.convert`
decides once per module which stand-in (if any) it gets, and swaps no module that carries hooks.
Why each one pays, and by how much, is in docs/performance.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable

from mobilebench.accel import native
from mobilebench.models import SqueezeExcitation


class _ReLU6InPlace(torch.autograd.Function):
    """Clamp to [0, 6] in place and take the gradient mask from the output."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        x.clamp_(0.0, 6.0)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors  # type: ignore[attr-defined]
        # Zero where the output sits on a bound: the same rule as autograd's own relu6.
        return torch.ops.aten.hardtanh_backward(grad, y, 0.0, 6.0)


class InPlaceReLU6(nn.ReLU6):
    """`nn.ReLU6(inplace=True)` whose autograd path does not copy its input.

    Under autograd, torch's `relu6_` clones the tensor before clamping it: an extra read and
    write of V2's largest activations.
    """

    def __init__(self) -> None:
        super().__init__(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReLU6InPlace.apply(x)


def _se_gate(pooled: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
             b2: torch.Tensor) -> torch.Tensor:
    """SE's gate on pooled [N, C] rows, its 1x1 convs run as the matmuls they are."""
    return F.hardsigmoid(F.linear(F.relu(F.linear(pooled, w1.flatten(1), b1)), w2.flatten(1), b2))


class _SqueezeExcite(torch.autograd.Function):
    """`x * gate(mean(x))` with both of x's gradient terms formed in one pass.

    Autograd's own graph writes the pooled term's gradient out at full size, then adds it to the
    direct term's, and runs the two 1x1 convs through oneDNN on 1x1 maps. Here the gate runs as
    matmuls and its backward is autograd's on [N, C] rows.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                b2: torch.Tensor) -> torch.Tensor:
        pooled = x.mean((2, 3))  # [N, C]
        scale = _se_gate(pooled, w1, b1, w2, b2)[:, :, None, None]
        ctx.save_for_backward(x, pooled, scale, w1, b1, w2, b2)
        return x * scale

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, pooled, scale, *params = ctx.saved_tensors  # type: ignore[attr-defined]
        grad_scale = (grad * x).sum((2, 3))
        with torch.enable_grad():  # the gate is tiny: recompute it rather than keep its graph
            leaves = [t.detach().requires_grad_() for t in (pooled, *params)]
            grads = torch.autograd.grad(_se_gate(*leaves), leaves, grad_scale)
        # The pooled term reaches every one of the H*W positions that the mean averaged.
        grad_x = torch.addcmul(grads[0][:, :, None, None] / (x.shape[2] * x.shape[3]), grad, scale)
        return (grad_x, *grads[1:])


class FusedSqueezeExcitation(SqueezeExcitation):
    """SqueezeExcitation with a one-pass backward; fp32 only (convert skips it under autocast)."""

    @classmethod
    def from_plain(cls, se: SqueezeExcitation) -> FusedSqueezeExcitation:
        with torch.device("meta"):  # the new 1x1 convs are dropped at once for the plain module's own
            new = cls(se.in_channels, se.squeeze_channels)
        for name, child in se.named_children():
            new.add_module(name, child)
        return new.train(se.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SqueezeExcite.apply(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)


class _DepthwiseConv(torch.autograd.Function):
    """Bias-free depthwise conv whose weight gradient comes from `mobilebench.accel.native`.

    Forward and input gradient are oneDNN's, as in `nn.Conv2d`; an output gradient the native
    kernel cannot read (not channels_last fp32) takes oneDNN's weight gradient too.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding  # type: ignore[attr-defined]
        return F.conv2d(x, weight, None, stride, padding, 1, weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        s, p = ctx.stride, ctx.padding  # type: ignore[attr-defined]
        want_x, want_w = ctx.needs_input_grad[:2]  # type: ignore[attr-defined]
        native_w = want_w and native.supports(grad) and native.supports(x)
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, [s, s], [p, p], [1, 1], False, [0, 0], weight.shape[0],
            [want_x, want_w and not native_w, False])
        if native_w:
            grad_w = native.depthwise_weight_grad(grad, x, weight.shape[-1], s, p)
        return grad_x, grad_w, None, None


class DepthwiseConv2d(nn.Conv2d):
    """A bias-free depthwise `nn.Conv2d` with up to two CPU training paths, chosen at conversion.

    `native_grad`: the weight gradient from the native C kernel (V3's 5x5 layers).
    `fp32_autocast`: trains in fp32 under CPU autocast. oneDNN's bf16 backward of depthwise convs
    other than 3x3 stride 1 is many times slower than its fp32 one on AVX512-BF16 CPUs, while dense
    and 3x3 stride-1 depthwise convs gain from bf16. The output is fp32; the BN and activation
    after it stay fp32 under autocast, and the next conv casts back to bf16. In eval mode (the
    validation pass) it runs as the plain model does, so validation and the final test, which
    uses a plain model, see the same numerics.
    """

    native_grad: bool = False
    fp32_autocast: bool = False

    @classmethod
    def from_plain(cls, conv: nn.Conv2d, native_grad: bool, fp32_autocast: bool) -> DepthwiseConv2d:
        with torch.device("meta"):
            new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      groups=conv.groups, bias=False)
        new.weight = conv.weight  # the same Parameter: optimizer, EMA and state dict see one tensor
        new.native_grad, new.fp32_autocast = native_grad, fp32_autocast
        return new.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp32_autocast and self.training:
            with torch.autocast("cpu", enabled=False):
                return self._conv(x.float())
        return self._conv(x)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        if self.native_grad:
            return _DepthwiseConv.apply(x, self.weight, self.stride[0], self.padding[0])
        return super().forward(x)
