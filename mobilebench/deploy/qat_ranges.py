"""Start QAT's activation ranges where post-training quantization would put them (`quantize.qat_ranges=histogram`).

torchao's QAT fake-quantizers learn each activation range as a moving average of per-batch
min/max over augmented training batches: a range set by outliers of a few batches, unlike PTQ's
HistogramObserver, which picks the range that minimises the quantization error over the
calibration images. `calibrate_activation_ranges` runs the calibration images through the
prepared graph in eval mode with fake-quantization off (what PTQ sees), fits one
HistogramObserver per activation fake-quantizer, writes its scale and zero point into the
fake-quantizer (and min/max into its observer, so convert reads the same range), and disables
those observers: the fine-tune then adapts the weights to ranges that stay fixed, while the
per-channel weight quantizers keep observing until `qat_freeze_observers`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from mobilebench.deploy.qat import bn_literals, fake_quantizers, switch_mode

PER_CHANNEL = (torch.per_channel_symmetric, torch.per_channel_affine)


def activation_quantizers(gm: nn.Module) -> list[nn.Module]:
    return [fq for fq in fake_quantizers(gm) if fq.qscheme not in PER_CHANNEL]


def _histogram_like(fq: nn.Module) -> nn.Module:
    """A HistogramObserver with the fake-quantizer's dtype, scheme and integer range."""
    from torchao.quantization.pt2e import HistogramObserver

    inner = fq.activation_post_process
    return HistogramObserver(dtype=fq.dtype, qscheme=fq.qscheme, quant_min=inner.quant_min,
                             quant_max=inner.quant_max, eps=float(inner.eps))


def _set_range(fq: nn.Module, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
    inner = fq.activation_post_process
    fq.scale.resize_(scale.shape).copy_(scale)
    fq.zero_point.resize_(zero_point.shape).copy_(zero_point)
    # The observer's min/max are what a later calculate_qparams (convert) reads: the same range.
    inner.min_val = ((inner.quant_min - zero_point) * scale).float().reshape(inner.min_val.shape)
    inner.max_val = ((inner.quant_max - zero_point) * scale).float().reshape(inner.max_val.shape)


def calibrate_activation_ranges(gm: torch.fx.GraphModule, model: nn.Module, arrays: Iterable[np.ndarray]) -> int:
    """Fit every activation fake-quantizer's range on `arrays` as PTQ does; returns how many were set.

    Leaves the graph in train mode with fake-quantization on, the activation observers off (their
    ranges fixed), ready for the fine-tune."""
    quantizers = fake_quantizers(gm)
    fitted = {id(fq): _histogram_like(fq) for fq in activation_quantizers(gm)}
    hooks = [fq.register_forward_pre_hook(lambda _m, args, obs=fitted[id(fq)]: obs(args[0].detach()))
             for fq in quantizers if id(fq) in fitted]
    literals = bn_literals(model)
    try:
        switch_mode(gm, literals, train=False)
        for fq in quantizers:
            fq.disable_fake_quant()
            fq.disable_observer()
        with torch.no_grad():
            for batch in arrays:
                gm(torch.as_tensor(batch))
    finally:
        for hook in hooks:
            hook.remove()
    for fq in quantizers:
        if id(fq) in fitted:
            _set_range(fq, *fitted[id(fq)].calculate_qparams())
        else:
            fq.enable_observer()  # weights keep observing until qat_freeze_observers
        fq.enable_fake_quant()
    switch_mode(gm, literals, train=True)
    return len(fitted)
