"""Name-based construction of the MobileNet family."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from . import mobilenet_v1, mobilenet_v2, mobilenet_v3
from .network import STEMS

MODEL_NAMES: tuple[str, ...] = ("v1", "v2", "v3_small", "v3_large")

# Paper/torchvision defaults used when dropout=None.
_DEFAULT_DROPOUT: dict[str, float] = {
    "v1": mobilenet_v1.DEFAULT_DROPOUT,
    "v2": mobilenet_v2.DEFAULT_DROPOUT,
    "v3_small": mobilenet_v3.DEFAULT_DROPOUT,
    "v3_large": mobilenet_v3.DEFAULT_DROPOUT,
}
_INVERTED_RESIDUAL_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "v2": mobilenet_v2.build_mobilenet_v2,
    "v3_small": mobilenet_v3.build_mobilenet_v3_small,
    "v3_large": mobilenet_v3.build_mobilenet_v3_large,
}


def build_model(
    name: str,
    num_classes: int = 10,
    width_mult: float = 1.0,
    stem: str = "cifar",
    dropout: float | None = None,
    *,
    hidden_channels: Sequence[int] | None = None,
) -> nn.Module:
    """Build a MobileNet by name.

    Args:
        name: one of :data:`MODEL_NAMES`.
        num_classes: size of the final Linear.
        width_mult: channel multiplier (> 0); see each family module for rounding rules.
        stem: ``"cifar"`` (for 32x32 inputs) or ``"imagenet"`` (paper layout); the exact
            changes are in each family module's docstring.
        dropout: dropout before the classifier; None = paper/torchvision default
            (V1 0.0, V2 0.2, V3 0.2).
        hidden_channels: V2/V3 only: the expanded width of each inverted-residual row in
            order (as returned by ``model.hidden_channels``), used to rebuild pruned models.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model name {name!r}; valid choices: {', '.join(MODEL_NAMES)}")
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; valid choices: {', '.join(STEMS)}")
    if dropout is None:
        dropout = _DEFAULT_DROPOUT[name]
    if name == "v1":
        if hidden_channels is not None:
            raise ValueError(
                "hidden_channels applies to inverted-residual models only "
                f"({', '.join(_INVERTED_RESIDUAL_BUILDERS)}); v1 has none"
            )
        return mobilenet_v1.build_mobilenet_v1(num_classes, width_mult, stem, dropout)
    return _INVERTED_RESIDUAL_BUILDERS[name](num_classes, width_mult, stem, dropout, hidden_channels)
