"""Parameter / MAC counting and per-block summaries."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mobilebench.models import MODEL_NAMES, build_model
from mobilebench.profile import count_macs, count_params, layer_summary


def test_count_params_and_macs_on_known_layers() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(8 * 8 * 8, 5))
    assert count_params(model) == 3 * 8 * 9 + 512 * 5 + 5
    # conv: 8 outputs x 27 taps x 64 positions; linear: 512 x 5
    assert count_macs(model, 8) == 8 * 27 * 64 + 512 * 5


def test_count_macs_restores_each_module_mode() -> None:
    model = build_model("v3_small").train()
    frozen_bn = model.features[0].bn.eval()
    count_macs(model, 32)
    assert model.training and model.features[1].training
    assert not frozen_bn.training
    assert torch.is_grad_enabled()


def test_count_macs_in_channels() -> None:
    conv = nn.Conv2d(1, 4, 1, bias=False)
    assert count_macs(conv, 4, in_channels=1) == 4 * 16


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_layer_summary_sums_to_totals(name: str) -> None:
    model = build_model(name)
    rows = layer_summary(model, 32)
    assert len(rows) == len(model.features) + 1
    assert sum(row["params"] for row in rows) == count_params(model)
    assert sum(row["macs"] for row in rows) == count_macs(model, 32)
    assert rows[0]["block"] == "features.0 ConvBNAct"
    assert rows[-1]["block"] == "head ClassifierHead"
    assert rows[-1]["output_shape"] == (1, 10)
    side = 2 if name == "v1" else 4
    assert rows[-2]["output_shape"] == (1, model.head.in_channels, side, side)
    assert all(set(row) == {"block", "output_shape", "params", "macs"} for row in rows)


def test_layer_summary_block_names() -> None:
    rows = layer_summary(build_model("v2", stem="imagenet", num_classes=1000), 224)
    assert rows[3]["block"] == "features.3 InvertedResidual"
    assert rows[3]["output_shape"] == (1, 24, 56, 56)  # row 2: 24 channels at stride 4


def test_layer_summary_needs_features_and_head() -> None:
    with pytest.raises(TypeError, match="features"):
        layer_summary(nn.Linear(2, 2), 8)
