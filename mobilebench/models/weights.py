"""Interop with torchvision's ImageNet MobileNets: weight transfer and head replacement.

Our modules register parameters and buffers in the same order as torchvision's
(only the names differ), so tensors are paired by position and every pair is checked
for matching kind (weight/bias/running_mean/...) and shape before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .factory import MODEL_NAMES

# torchvision weights enum and member for each of our names (V1 has no torchvision model).
_TORCHVISION_WEIGHTS: dict[str, tuple[str, str]] = {
    "v2": ("MobileNet_V2_Weights", "IMAGENET1K_V1"),
    "v3_small": ("MobileNet_V3_Small_Weights", "IMAGENET1K_V1"),
    "v3_large": ("MobileNet_V3_Large_Weights", "IMAGENET1K_V1"),
}


def _classifier(model: nn.Module) -> nn.Linear:
    head = getattr(model, "head", None)
    classifier = getattr(head, "classifier", None)
    if not isinstance(classifier, nn.Linear):
        raise ValueError("model has no head.classifier Linear; build it with build_model()")
    return classifier


def load_torchvision_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy a torchvision ``mobilenet_v2`` / ``mobilenet_v3_small`` / ``mobilenet_v3_large``
    state dict into the matching model from :func:`build_model`.

    Build the model with ``num_classes=1000`` and the same ``width_mult``; call
    :func:`replace_classifier` afterwards for another number of classes. The stem only
    changes strides, so the weights also load into a CIFAR-stem model (for fine-tuning);
    outputs equal torchvision's only with ``stem="imagenet"``.

    Raises ValueError naming the first tensor pair whose kind or shape differ.
    """
    ours = list(model.state_dict().items())
    theirs = list(state_dict.items())
    classifier_keys = {f"head.classifier.{suffix}" for suffix in ("weight", "bias")}
    for index, ((our_key, our_value), (their_key, their_value)) in enumerate(zip(ours, theirs)):
        same_kind = our_key.rsplit(".", 1)[-1] == their_key.rsplit(".", 1)[-1]
        if same_kind and tuple(our_value.shape) == tuple(their_value.shape):
            continue
        hint = (
            "; build with num_classes=1000, load, then call replace_classifier()"
            if our_key in classifier_keys and same_kind
            else "; check that model name and width_mult match the torchvision model"
        )
        raise ValueError(
            f"torchvision tensor #{index} {their_key!r} {tuple(their_value.shape)} does not match "
            f"ours {our_key!r} {tuple(our_value.shape)}{hint}"
        )
    if len(ours) != len(theirs):
        extra = (
            f"ours has extra {ours[len(theirs)][0]!r}"
            if len(ours) > len(theirs)
            else f"torchvision has extra {theirs[len(ours)][0]!r}"
        )
        raise ValueError(
            f"tensor count differs (torchvision {len(theirs)}, ours {len(ours)}): {extra}; "
            "check that model name and width_mult match the torchvision model"
        )
    model.load_state_dict({key: value for (key, _), (_, value) in zip(ours, theirs)}, strict=True)


def _download(weights: Any) -> dict[str, torch.Tensor]:
    # Separate function so tests can simulate a failed download without touching the network.
    return weights.get_state_dict(progress=False, check_hash=True)


def pretrained_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet-1k state dict for ``name`` (downloaded into the torch hub cache).

    Raises ValueError for V1 (torchvision has no V1) and unknown names, and RuntimeError
    with a one-line fix when the download fails.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model name {name!r}; valid choices: {', '.join(MODEL_NAMES)}")
    if name not in _TORCHVISION_WEIGHTS:
        raise ValueError(
            f"no pretrained weights for {name!r} (torchvision has no MobileNetV1); "
            f"pretrained weights exist for: {', '.join(_TORCHVISION_WEIGHTS)}"
        )
    import torchvision.models  # imported lazily: only this function needs torchvision

    enum_name, member = _TORCHVISION_WEIGHTS[name]
    weights = getattr(getattr(torchvision.models, enum_name), member)
    try:
        return _download(weights)
    except OSError as exc:  # URLError, socket errors and missing-file errors are all OSErrors
        filename = weights.url.rsplit("/", 1)[-1]
        target = f"{torch.hub.get_dir()}/checkpoints/{filename}"
        reason = " ".join(str(exc).split())
        raise RuntimeError(
            f"downloading ImageNet weights for {name!r} from {weights.url} failed ({reason}); "
            f"place the file at {target} ($TORCH_HOME/hub/checkpoints/{filename}) "
            "or set model.pretrained=false"
        ) from exc


def replace_classifier(model: nn.Module, num_classes: int) -> None:
    """Put a freshly initialised final Linear with ``num_classes`` outputs (no-op if equal)."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    old = _classifier(model)
    if old.out_features == num_classes:
        return
    new = nn.Linear(old.in_features, num_classes, device=old.weight.device, dtype=old.weight.dtype)
    nn.init.normal_(new.weight, 0, 0.01)
    nn.init.zeros_(new.bias)
    model.head.classifier = new
