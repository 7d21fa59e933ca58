"""MobileNet V1/V2/V3 built from per-family architecture tables (torch only)."""

from .blocks import (
    ConvBNAct,
    DepthwiseSeparable,
    InvertedResidual,
    SqueezeExcitation,
    make_divisible,
)
from .factory import MODEL_NAMES, build_model
from .network import STEMS, ClassifierHead, MobileNet
from .weights import load_torchvision_weights, pretrained_state_dict, replace_classifier

__all__ = [
    "MODEL_NAMES",
    "STEMS",
    "ClassifierHead",
    "ConvBNAct",
    "DepthwiseSeparable",
    "InvertedResidual",
    "MobileNet",
    "SqueezeExcitation",
    "build_model",
    "load_torchvision_weights",
    "make_divisible",
    "pretrained_state_dict",
    "replace_classifier",
]
