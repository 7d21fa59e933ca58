"""Architecture fidelity (vs papers and torchvision), shapes, weight transfer and errors."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from mobilebench.models import (
    MODEL_NAMES,
    STEMS,
    InvertedResidual,
    build_model,
    load_torchvision_weights,
    make_divisible,
    pretrained_state_dict,
    replace_classifier,
)
from mobilebench.models import weights as weights_module
from mobilebench.models.blocks import ConvBNAct, SqueezeExcitation, make_activation
from mobilebench.profile import count_macs, count_params

TORCHVISION = {
    "v2": torchvision.models.mobilenet_v2,
    "v3_small": torchvision.models.mobilenet_v3_small,
    "v3_large": torchvision.models.mobilenet_v3_large,
}
PAPER_PARAMS = {"v1": 4_231_976, "v2": 3_504_872, "v3_small": 2_542_856, "v3_large": 5_483_032}
PAPER_MACS = {"v1": 569e6, "v2": 301e6, "v3_small": 56.5e6, "v3_large": 217e6}
# Final feature-map side at 32x32 with the CIFAR stem.
CIFAR_FMAP = {"v1": 2, "v2": 4, "v3_small": 4, "v3_large": 4}
NUM_IR_ROWS = {"v2": 17, "v3_small": 11, "v3_large": 15}


def imagenet(name: str, width_mult: float = 1.0) -> nn.Module:
    return build_model(name, num_classes=1000, width_mult=width_mult, stem="imagenet")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_paper_params_and_macs(name: str) -> None:
    model = imagenet(name)
    assert count_params(model) == PAPER_PARAMS[name]
    assert count_macs(model, 224) == pytest.approx(PAPER_MACS[name], rel=0.02)


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_matches_torchvision_params_and_macs(name: str) -> None:
    ours, theirs = imagenet(name), TORCHVISION[name](weights=None)
    assert count_params(ours) == count_params(theirs)
    assert count_macs(ours, 224) == pytest.approx(count_macs(theirs, 224), rel=0.02)


@pytest.mark.parametrize("width_mult", [0.35, 0.5, 0.75, 1.25, 1.5])
@pytest.mark.parametrize("name", list(TORCHVISION))
def test_width_scaling_matches_torchvision(name: str, width_mult: float) -> None:
    # Covers make_divisible everywhere, including V2/V3's different last-channel rules.
    theirs = TORCHVISION[name](weights=None, width_mult=width_mult)
    assert count_params(imagenet(name, width_mult)) == count_params(theirs)


def test_make_divisible() -> None:
    assert make_divisible(32 * 0.5) == 16
    assert make_divisible(1280 * 1.25) == 1600
    assert make_divisible(3) == 8  # never below the divisor
    assert make_divisible(20) == 24  # 16 would drop more than 10%
    assert make_divisible(44) == 48
    assert make_divisible(35 * 0.35) == 16  # 12.25 -> 8 would be a 35% cut


@pytest.mark.parametrize("width_mult", [0.5, 1.0, 1.25])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_cifar_shapes(name: str, width_mult: float) -> None:
    model = build_model(name, width_mult=width_mult).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fmap = model.features(x)
        out = model(x)
    assert fmap.shape[-2:] == (CIFAR_FMAP[name], CIFAR_FMAP[name])
    assert fmap.shape[1] == model.head.in_channels
    assert out.shape == (2, 10)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_imagenet_shapes(name: str) -> None:
    model = imagenet(name).eval()
    with torch.no_grad():
        assert model.features(torch.zeros(1, 3, 224, 224)).shape[-2:] == (7, 7)
        for width_mult in (0.5, 1.25):  # other widths at a small input: total stride 32
            small = build_model(name, 7, width_mult, stem="imagenet").eval()
            assert small.features(torch.zeros(1, 3, 64, 64)).shape[-2:] == (2, 2)
            assert small(torch.zeros(1, 3, 64, 64)).shape == (1, 7)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_features_layout(name: str) -> None:
    model = build_model(name)
    assert isinstance(model.features, nn.Sequential)
    rows = NUM_IR_ROWS.get(name, 13)
    # stem + one per table row (+ final 1x1 conv for V2/V3)
    assert len(model.features) == 1 + rows + (name != "v1")
    for block in list(model.features)[1:]:
        assert block.in_channels > 0 and block.out_channels > 0 and block.stride in (1, 2)
    if name != "v1":
        assert len(model.hidden_channels) == rows


def test_stems_differ_only_in_strides() -> None:
    for name in MODEL_NAMES:
        cifar, inet = build_model(name, stem="cifar"), build_model(name, stem="imagenet")
        assert count_params(cifar) == count_params(inet)
        downsamples = [sum(getattr(b, "stride", 1) == 2 for b in m.features) for m in (cifar, inet)]
        assert downsamples[1] - downsamples[0] == (1 if name == "v1" else 2)
    assert STEMS == ("cifar", "imagenet")


def _randomize_bn(model: nn.Module) -> None:
    # Fresh BN is an identity map, which would hide a mis-paired BN tensor.
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_weight_transfer(name: str) -> None:
    torch.manual_seed(0)
    theirs = TORCHVISION[name](weights=None).eval()
    _randomize_bn(theirs)
    ours = imagenet(name).eval()
    load_torchvision_weights(ours, theirs.state_dict())
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        expected, actual = theirs(x), ours(x)
    assert expected.abs().max() > 1e-3  # a non-trivial output
    assert (expected - actual).abs().max().item() <= 1e-5


def test_weight_transfer_errors() -> None:
    v2_state = TORCHVISION["v2"](weights=None).state_dict()
    with pytest.raises(ValueError, match="does not match ours"):
        load_torchvision_weights(imagenet("v3_small"), v2_state)
    with pytest.raises(ValueError, match="replace_classifier"):
        load_torchvision_weights(build_model("v2", num_classes=10, stem="imagenet"), v2_state)
    truncated = dict(list(v2_state.items())[:-2])
    with pytest.raises(ValueError, match="tensor count differs.*head.classifier.weight"):
        load_torchvision_weights(imagenet("v2"), truncated)


def test_replace_classifier() -> None:
    model = imagenet("v3_small")
    old = model.head.classifier
    replace_classifier(model, 1000)
    assert model.head.classifier is old  # same size: untouched
    replace_classifier(model, 10)
    assert model.head.classifier.out_features == 10 and model.num_classes == 10
    assert model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 10)
    with pytest.raises(ValueError, match="num_classes"):
        replace_classifier(model, 0)


def test_pretrained_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="v2, v3_small, v3_large"):
        pretrained_state_dict("v1")
    with pytest.raises(ValueError, match="valid choices"):
        pretrained_state_dict("resnet")

    def offline(weights: object) -> dict:
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(weights_module, "_download", offline)
    with pytest.raises(RuntimeError) as info:
        pretrained_state_dict("v2")
    message = str(info.value)
    assert "\n" not in message
    assert "failed" in message and "mobilenet_v2-b0353104.pth" in message
    assert "hub/checkpoints" in message and "model.pretrained=false" in message


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_backward(name: str) -> None:
    model = build_model(name).train()
    out = model(torch.randn(2, 3, 32, 32))
    nn.functional.cross_entropy(out, torch.tensor([1, 2])).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_activation_in_place_only_where_it_saves_a_copy() -> None:
    assert make_activation("relu").inplace and make_activation("relu6").inplace
    assert not make_activation("hardswish").inplace  # its gradient needs the input


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_blocks_are_the_plain_torch_modules(name: str) -> None:
    """What a reader of torchvision expects: stock layers only, in conv -> BN -> activation order."""
    model = build_model(name)
    stock = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.Identity, nn.Linear,
             nn.Dropout, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Sequential)
    leaves = [m for m in model.modules() if not list(m.children())]
    assert all(type(m) in stock for m in leaves), {type(m).__name__ for m in leaves if type(m) not in stock}
    for block in (m for m in model.modules() if isinstance(m, ConvBNAct)):
        assert [type(c) for c in block.children()][:2] == [nn.Conv2d, nn.BatchNorm2d]
    relu6 = [m for m in model.modules() if isinstance(m, nn.ReLU6)]
    assert all(type(m) is nn.ReLU6 and m.inplace for m in relu6) and (len(relu6) > 0) == (name == "v2")
    for se in (m for m in model.modules() if isinstance(m, SqueezeExcitation)):
        assert [type(c) for c in se.children()] == [nn.AdaptiveAvgPool2d, nn.Conv2d, nn.ReLU, nn.Conv2d, nn.Hardsigmoid]


def test_default_dropout() -> None:
    assert build_model("v1").head.dropout.p == 0.0
    assert build_model("v2").head.dropout.p == 0.2
    assert build_model("v3_large").head.dropout.p == 0.2
    assert build_model("v3_small", dropout=0.5).head.dropout.p == 0.5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "v4"}, "v1, v2, v3_small, v3_large"),
        ({"name": "v2", "stem": "tiny"}, "cifar, imagenet"),
        ({"name": "v2", "width_mult": 0.0}, "width_mult"),
        ({"name": "v1", "width_mult": -1.0}, "width_mult"),
        ({"name": "v2", "dropout": 1.0}, "dropout"),
        ({"name": "v2", "num_classes": 0}, "num_classes"),
        ({"name": "v1", "hidden_channels": [8] * 13}, "v1 has none"),
        ({"name": "v2", "hidden_channels": [32] * 3}, "one entry per"),
        ({"name": "v3_small", "hidden_channels": [0] * 11}, "positive int"),
        # Row 0 of V2 has no expand conv, so its hidden width is pinned to its input.
        ({"name": "v2", "hidden_channels": [24] + [96] * 16}, "hidden_channels == in_channels"),
    ],
)
def test_build_model_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(**kwargs)


def test_block_errors() -> None:
    with pytest.raises(ValueError, match="relu, relu6, hardswish"):
        InvertedResidual(16, 64, 16, activation="gelu")
    with pytest.raises(ValueError, match="stride"):
        InvertedResidual(16, 64, 16, stride=3)


@pytest.mark.parametrize("name", list(NUM_IR_ROWS))
def test_hidden_channels_override(name: str) -> None:
    base = build_model(name)
    assert build_model(name, hidden_channels=base.hidden_channels).hidden_channels == base.hidden_channels
    pruned_widths = [
        h if not block.has_expand else max(1, h // 2)
        for h, block in zip(base.hidden_channels, (b for b in base.features if isinstance(b, InvertedResidual)))
    ]
    pruned = build_model(name, hidden_channels=pruned_widths)
    assert pruned.hidden_channels == pruned_widths
    assert count_params(pruned) < count_params(base)
    assert pruned(torch.randn(1, 3, 32, 32)).shape == (1, 10)
