"""CPU fast paths for training, as one opt-in layer over the plain models.

`convert(model, ...)` swaps modules of a finished plain model in place for the stand-ins in
`modules.py`, the way `nn.SyncBatchNorm.convert_sync_batchnorm` does: it decides once per module,
keeps every parameter and buffer (so state-dict keys and checkpoints are unchanged), and leaves a
module alone when something else hooks it (any hook, `torch.nn.utils.prune`, parametrizations).
Training applies it (`trainer.cpu_kernels`); eval, export, quantization, latency and the final
test build plain models. The glibc allocator policy (`allocator.py`) belongs to this layer too.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from mobilebench.accel import native
from mobilebench.accel.allocator import set_cpu_allocator
from mobilebench.accel.modules import DepthwiseConv2d, FusedSqueezeExcitation, InPlaceReLU6
from mobilebench.config import CPU_KERNELS as SETTINGS
from mobilebench.models import SqueezeExcitation

# Each stand-in by name; `convert(paths=...)` takes a subset (the side-by-side measurements do).
PATHS = ("relu6", "se", "depthwise_native", "depthwise_fp32")

__all__ = ["PATHS", "SETTINGS", "convert", "describe", "enabled", "native_state", "set_cpu_allocator"]


def enabled(setting: str, device: torch.device, compiled: bool) -> bool:
    """Whether training should convert: `auto` for eager CPU training, where the paths were
    measured; `on` wherever the model runs eagerly; `off` never. A compiled model always takes the
    stock modules: the stand-ins' hand-written backward passes (and the ctypes call) are eager code."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown cpu_kernels setting {setting!r}; choose one of: {', '.join(SETTINGS)}")
    if compiled or setting == "off":
        return False
    return setting == "on" or device.type == "cpu"


def native_state() -> str:
    """`on`, or `off: <why>` for the native depthwise weight-gradient kernel."""
    reason = native.unavailable_reason()
    return f"off: {reason}" if reason else "on"


def describe(swapped: dict[str, int]) -> str:
    """`se x9, depthwise_native x8`, or `none` (for logs and tables)."""
    return ", ".join(f"{name} x{n}" for name, n in swapped.items() if n) or "none"


def _unhooked(*modules: nn.Module) -> bool:
    """Nothing else hooks into these modules: no hooks of any kind, no parametrization, and plain
    Parameters (`torch.nn.utils.prune` swaps a weight for a recomputed tensor and a pre-hook). A
    stand-in would run without them, so such modules keep their own forward."""
    for m in modules:
        if (m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks or m._backward_hooks
                or parametrize.is_parametrized(m)):
            return False
        tensors = (getattr(m, name, None) for name in ("weight", "bias"))
        if any(t is not None and not isinstance(t, nn.Parameter) for t in tensors):
            return False
    return True


def _plain_depthwise(conv: nn.Module) -> bool:
    """A stock, bias-free, square, undilated depthwise conv with symmetric zero padding."""
    return (type(conv) is nn.Conv2d and conv.groups == conv.in_channels == conv.out_channels > 1
            and conv.bias is None and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple) and conv.padding[0] == conv.padding[1]
            and conv.stride[0] == conv.stride[1] and conv.kernel_size[0] == conv.kernel_size[1]
            and _unhooked(conv))


def _fp32_under_autocast(conv: nn.Conv2d) -> bool:
    # Measured per shape (docs/performance.md): only 3x3 stride-1 depthwise gains from bf16.
    return conv.kernel_size[0] != 3 or conv.stride[0] != 1


def _swap(module: nn.Module, paths: frozenset[str], cpu: bool, autocast: bool,
          channels_last: bool) -> tuple[nn.Module, list[str]] | None:
    """The stand-in for `module` and the paths it takes, or None to keep it."""
    # Under bf16 autocast the stock in-place relu6 measured faster: both paths are fp32 only.
    if type(module) is nn.ReLU6 and module.inplace and "relu6" in paths and not autocast and _unhooked(module):
        return InPlaceReLU6(), ["relu6"]
    if (type(module) is SqueezeExcitation and "se" in paths and not autocast
            and _unhooked(module, *module.children())):
        return FusedSqueezeExcitation.from_plain(module), ["se"]
    if cpu and _plain_depthwise(module):
        # The native kernel reads channels_last fp32 only: under autocast, the convs kept in fp32 can take it.
        fp32 = "depthwise_fp32" in paths and autocast and _fp32_under_autocast(module)
        grad = ("depthwise_native" in paths and module.kernel_size[0] >= 5 and (fp32 or not autocast)
                and channels_last and not native.unavailable_reason())
        if fp32 or grad:
            taken = [name for name, on in (("depthwise_native", grad), ("depthwise_fp32", fp32)) if on]
            return DepthwiseConv2d.from_plain(module, native_grad=grad, fp32_autocast=fp32), taken
    return None


def convert(model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool = True,
            paths: Iterable[str] = PATHS) -> dict[str, int]:
    """Swap in the fast paths that apply on `device` at this precision and memory format, in place;
    returns how many modules took each path. The replaced modules leave the tree; the stand-ins
    hold their parameters and buffers (the same tensors), so optimizer state built before still fits."""
    chosen = frozenset(paths)
    unknown = chosen - set(PATHS)
    if unknown:
        raise ValueError(f"unknown fast path(s) {', '.join(sorted(unknown))}; choose from: {', '.join(PATHS)}")
    counts = dict.fromkeys(PATHS, 0)
    cpu, autocast = device.type == "cpu", amp_dtype is not None

    def visit(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            visit(child)
            swapped = _swap(child, chosen, cpu, autocast, channels_last)
            if swapped is not None:
                parent.add_module(name, swapped[0])
                for path in swapped[1]:
                    counts[path] += 1

    visit(model)
    return counts
